"""quantframe.kernels.int8_rowwise: reference vs primitives and hand-worked values; Triton vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import torch

from quantframe.kernels import int8_rowwise
from quantframe.kernels.int8_rowwise import (
    quantize_rowwise_int8,
    quantize_rowwise_int8_reference,
    quantize_rowwise_int8_triton,
)
from quantframe.primitives import quantize_rowwise_int8 as primitives_quantize_rowwise_int8

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [(1, 1), (7, 33), (33, 7), (16, 64), (5, 127)]
IMPLS = {"reference": quantize_rowwise_int8_reference, "triton": quantize_rowwise_int8_triton}


def _case_list():
    for n, k in SHAPES:
        for name, dtype in DTYPES.items():
            yield pytest.param(n, k, dtype, id=f"N{n}-K{k}-{name}")


CASES = list(_case_list())


def _weight(n, k, dtype):
    w = torch.randn(n, k).to(dtype)
    w[0, 0] = 0.0  # a zero inside a row must stay code 0
    return w


# Reference


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("n, k, dtype", CASES)
def test_reference_matches_primitives(n, k, dtype, stochastic):
    w = _weight(n, k, dtype)
    noise = torch.rand(n, k) if stochastic else None
    q, s = quantize_rowwise_int8_reference(w, stochastic, noise)
    q_p, s_p = primitives_quantize_rowwise_int8(w, stochastic, noise)
    assert q.dtype == torch.int8 and q.shape == (n, k)
    assert s.dtype == torch.float32 and s.shape == (n,)
    assert torch.equal(q, q_p)
    assert torch.equal(s, s_p)


# Hand-worked rows. Scales: 1.27 / 127 rounds to fp32(0.01); 254 / 127 = 2; 127 / 127 = 1; an
# all-zero row gets eps = 1e-12. Codes: w / scale rounded half to even, like torch.round:
# -0.635 / 0.01 = -63.5 -> -64; 62.5 -> 62; 2.5 -> 2; 1.5 -> 2; 0.5 -> 0; -0.5 -> 0.
HAND_W = [
    [1.27, -0.635, 0.0, 0.0, 0.0, 0.0, 0.0],
    [254.0, -127.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    [127.0, 62.5, -62.5, 2.5, 1.5, 0.5, -0.5],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
]
HAND_Q = [
    [127, -64, 0, 0, 0, 0, 0],
    [127, -64, 0, 0, 0, 0, 0],
    [127, 62, -62, 2, 2, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
]
HAND_SCALE = [0.01, 2.0, 1.0, 1e-12]


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_hand_worked_values(impl):
    q, s = impl(torch.tensor(HAND_W))
    assert q.tolist() == HAND_Q
    assert torch.equal(s, torch.tensor(HAND_SCALE))  # both sides rounded to fp32


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_scale_is_correctly_rounded_division(impl):
    # For these absmax values fp32 absmax / 127 != absmax * (1 / 127): a kernel that multiplies
    # by the reciprocal (or divides approximately) gets other scales, and then other codes.
    absmax = torch.tensor([1.902235984802246, 1.753777027130127, 2.6405396461486816])
    assert torch.all(absmax / 127 != absmax * (1 / torch.tensor(127.0)))
    w = torch.stack([absmax, -0.3 * absmax], dim=1)
    _, s = impl(w)
    assert torch.equal(s, absmax / 127)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_stochastic_rounding_keeps_whole_numbers_whole(impl):
    # scale = 1. With u just below 1, fp32 floor(v + u) would give 128, -126 and 64.5 -> 65 here;
    # floor(v) + [u < v - floor(v)] keeps whole numbers whole; 63.5 goes up only for u < 0.5.
    w = torch.tensor([[127.0, -127.0, 63.5]])
    noise = torch.full((1, 3), 1.0 - 2.0**-24)
    q, _ = impl(w, stochastic=True, noise=noise)
    assert q.tolist() == [[127, -127, 63]]


# Triton vs reference


@pytest.mark.parametrize("n, k, dtype", CASES)
def test_triton_matches_reference(n, k, dtype):
    w = _weight(n, k, dtype)
    q, s = quantize_rowwise_int8_triton(w)
    q_ref, s_ref = quantize_rowwise_int8_reference(w)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n, k, dtype", CASES)
def test_triton_matches_reference_with_noise(n, k, dtype):
    w = _weight(n, k, dtype)
    noise = torch.rand(n, k)
    q, s = quantize_rowwise_int8_triton(w, stochastic=True, noise=noise)
    q_ref, s_ref = quantize_rowwise_int8_reference(w, stochastic=True, noise=noise)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_triton_loops_over_rows_longer_than_block(monkeypatch, stochastic):
    monkeypatch.setattr(int8_rowwise, "_MAX_BLOCK_K", 16)  # K = 127: 8 chunks, the last ragged
    w = _weight(5, 127, torch.float32)
    w[3, 120] = 9.0  # the row absmax sits in the last chunk
    noise = torch.rand(5, 127) if stochastic else None
    q, s = quantize_rowwise_int8_triton(w, stochastic, noise)
    q_ref, s_ref = quantize_rowwise_int8_reference(w, stochastic, noise)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


def test_triton_takes_non_contiguous_input():
    w = torch.randn(33, 7).T  # [7, 33], column-major
    q, s = quantize_rowwise_int8_triton(w)
    q_ref, s_ref = quantize_rowwise_int8_reference(w)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


# Stochastic rounding with in-kernel Philox noise


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_stochastic_codes_are_floor_or_ceil(dtype):
    w = _weight(16, 64, dtype)
    q, s = quantize_rowwise_int8_triton(w, stochastic=True, seed=1234)
    v = w.float() / s[:, None]  # the exact pre-rounding value, computed as the kernel does
    q = q.float()
    assert torch.all((q == torch.floor(v)) | (q == torch.ceil(v)))


def test_stochastic_rounding_is_unbiased():
    # The absmax 127 makes scale = 1, so w / scale = w exactly. The row is tiled to [16, 1024]
    # (few wide rows: the interpreter's cost is per program): 2048 draws per value. Per value the
    # codes are floor(v) + Bernoulli(v - floor(v)), so the mean has std <= 0.5 / sqrt(2048) = 0.011;
    # 0.06 is > 5 std, while nearest rounding misses by 0.125 to 0.5 here.
    row = torch.tensor([127.0, 0.25, -0.5, 2.75, 10.5, -3.25, 0.125, -60.875])
    w = row.repeat(16, 128)
    q, s = quantize_rowwise_int8_triton(w, stochastic=True, seed=2024)
    assert torch.all(s == 1.0)
    per_value_mean = q.float().view(16, 128, 8).mean(dim=(0, 1))
    torch.testing.assert_close(per_value_mean, row, atol=0.06, rtol=0)
    assert (torch.round(row) - row).abs()[1:].min() >= 0.125  # so the check can tell the two apart


def test_stochastic_same_seed_same_codes():
    w = _weight(7, 33, torch.float32)
    a, _ = quantize_rowwise_int8_triton(w, stochastic=True, seed=7)
    b, _ = quantize_rowwise_int8_triton(w, stochastic=True, seed=7)
    c, _ = quantize_rowwise_int8_triton(w, stochastic=True, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stochastic_default_seed_follows_torch_manual_seed():
    w = _weight(7, 33, torch.float32)
    torch.manual_seed(5)
    a, _ = quantize_rowwise_int8_triton(w, stochastic=True)
    torch.manual_seed(5)
    b, _ = quantize_rowwise_int8_triton(w, stochastic=True)
    assert torch.equal(a, b)


# Dispatch and errors


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_dispatch_uses_reference_on_cpu(stochastic):
    w = _weight(7, 33, torch.bfloat16)
    noise = torch.rand(7, 33) if stochastic else None
    q, s = quantize_rowwise_int8(w, stochastic, noise)
    q_ref, s_ref = quantize_rowwise_int8_reference(w, stochastic, noise)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


BAD_INPUTS = [
    pytest.param(dict(w=torch.randn(8)), ValueError, r"2-D \[N, K\].*\(8,\)", id="1d"),
    pytest.param(dict(w=torch.randn(4, 0)), ValueError, r"K >= 1.*\(4, 0\)", id="empty-row"),
    pytest.param(dict(w=torch.ones(4, 8, dtype=torch.int32)), TypeError, "w.dtype=torch.int32", id="int"),
    pytest.param(dict(w=torch.randn(4, 8).double()), TypeError, "w.dtype=torch.float64", id="fp64"),
    pytest.param(
        dict(w=torch.randn(4, 8), stochastic=True, noise=torch.rand(4, 8).double()),
        TypeError,
        "noise.dtype=torch.float64",
        id="noise-fp64",
    ),
    pytest.param(
        dict(w=torch.randn(4, 8), stochastic=True, noise=torch.rand(8, 4)),
        ValueError,
        r"noise \(shape \(8, 4\).*must match w \(shape \(4, 8\)",
        id="noise-shape",
    ),
    pytest.param(dict(w=torch.randn(4, 8), col_scale=torch.ones(4)), ValueError, r"col_scale must be float32 \[8\]",
                 id="col-scale-shape"),
    pytest.param(dict(w=torch.randn(4, 8), col_scale=torch.ones(8).double()), ValueError,
                 r"col_scale must be float32 \[8\]", id="col-scale-fp64"),
]


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_input_raises(impl, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        impl(**kwargs)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("n, k, dtype", CASES)
def test_column_scale_quantizes_the_fp32_product_without_writing_it(n, k, dtype, stochastic):
    # col_scale: the codes and scales of w * col_scale (fp32 product, as torch computes bf16 * fp32),
    # which INT8 mixed precision's grad-input quantizes (g * W.scale) without materializing it.
    w, col_scale = _weight(n, k, dtype), torch.rand(k) * 0.02 + 1e-3
    noise = torch.rand(n, k) if stochastic else None
    expected = quantize_rowwise_int8_reference(w * col_scale, stochastic, noise)
    assert (w * col_scale).dtype == torch.float32
    for impl in IMPLS.values():
        q, s = impl(w, stochastic, noise, col_scale=col_scale)
        assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])
