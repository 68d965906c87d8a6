import pytest
import torch

from quantframe import primitives as P


def test_qrange():
    assert P.qrange(8, True) == (-127, 127)
    assert P.qrange(4, True) == (-7, 7)
    assert P.qrange(8, False) == (0, 255)
    with pytest.raises(ValueError, match=r"bits=9 must be in \[1, 8\]"):
        P.qrange(9, True)


@pytest.mark.parametrize("granularity, shape", [("tensor", (1, 1)), ("row", (6, 1)), (4, (6, 3))])
def test_symmetric_scale_is_absmax_over_qmax(granularity, shape):
    x = torch.randn(6, 12)
    scale, zp = P.choose_qparams(x, bits=8, granularity=granularity)
    assert zp is None and scale.shape == shape
    groups = {"tensor": x.reshape(1, 1, -1), "row": x.reshape(6, 1, 12), 4: x.reshape(6, 3, 4)}[granularity]
    torch.testing.assert_close(scale, groups.abs().amax(-1) / 127)


@pytest.mark.parametrize("bits, symmetric, floor_db", [(8, True, 38), (8, False, 38), (4, True, 14), (4, False, 16)])
@pytest.mark.parametrize("granularity", ["tensor", "row", 8])
def test_round_trip_error_is_small(bits, symmetric, floor_db, granularity):
    x = torch.randn(16, 32)
    scale, zp = P.choose_qparams(x, bits, granularity, symmetric)
    q = P.quantize(x, scale, zp, bits)
    qmin, qmax = P.qrange(bits, symmetric)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert q.int().min() >= qmin and q.int().max() <= qmax
    y = P.dequantize(q, scale, zp)
    err = (x - y).abs()
    # round to nearest: never more than half a step off (within the representable range)
    from quantframe.primitives import _expand

    assert (err <= _expand(scale, x.shape) * 0.5 + 1e-6).all()
    snr = 10 * torch.log10(x.square().sum() / (x - y).square().sum())
    assert snr > floor_db


def test_asymmetric_grid_contains_zero_exactly():
    x = torch.rand(4, 8) + 1.0  # all positive: the grid must still include 0
    scale, zp = P.choose_qparams(x, 8, "row", symmetric=False)
    zero = P.dequantize(P.quantize(torch.zeros(4, 8), scale, zp), scale, zp)
    assert not zero.any()


def test_bad_granularity_and_group_size():
    with pytest.raises(ValueError, match="group_size=5 must divide the row length 12"):
        P.choose_qparams(torch.randn(2, 12), granularity=5)
    with pytest.raises(ValueError, match="granularity='col'"):
        P.choose_qparams(torch.randn(2, 12), granularity="col")
    with pytest.raises(ValueError, match=r"expected a 2-D tensor, got shape \(12,\)"):
        P.choose_qparams(torch.randn(12))


def test_stochastic_round_goes_up_when_noise_is_below_the_fraction():
    x = torch.tensor([0.2, 0.2, -1.5, -1.5, 127.0])
    noise = torch.tensor([0.7, 0.1, 0.4, 0.6, 1.0 - 2.0**-24])
    # 127 + (1 - 2**-24) would round to 128 in fp32; a whole number must stay put
    assert P.stochastic_round(x, noise).tolist() == [0.0, 1.0, -1.0, -2.0, 127.0]


def test_stochastic_round_is_unbiased():
    x = torch.full((200_000,), 2.3)
    r = P.stochastic_round(x)
    assert set(r.unique().tolist()) == {2.0, 3.0}
    assert abs(r.mean().item() - 2.3) < 0.005


def test_rowwise_int8_matches_hand_worked_values():
    q, s = P.quantize_rowwise_int8(torch.tensor([[2.54, -1.27, 0.01]]))
    torch.testing.assert_close(s, torch.tensor([0.02]))
    assert q.tolist() == [[127, -64, 0]]  # -63.5 rounds half to even: -64
    torch.testing.assert_close(P.dequantize_rowwise_int8(q, s), torch.tensor([[2.54, -1.28, 0.0]]))


def test_bf16_stochastic_rounding_is_exact_and_unbiased():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    x = torch.full((100_000,), (lo.float() + 0.25 * (hi.float() - lo.float())).item())
    r = P.fp32_to_bf16_stochastic(x)
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {lo.item(), hi.item()}
    assert abs((r == hi).float().mean().item() - 0.25) < 0.01
    with pytest.raises(TypeError, match="expects float32"):
        P.fp32_to_bf16_stochastic(x.double())
