"""quantframe.optim.state8bit: the dynamic code map, blockwise 8-bit numerics, OptimState8bit's ops."""

import copy
import io

import pytest
import torch
from expecttest import assert_expected_inline

from quantframe.optim import OptimState8bit, create_dynamic_map
from quantframe.optim.state8bit import BLOCK_SIZE, dequantize_8bit, quantize_8bit


def _blocks(x):
    """x flattened into [blocks, 256], zero padded."""
    flat = x.reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)


def _same(a, b):
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype and a.signed == b.signed
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.qmap, b.qmap)


# ---- the map ---------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_is_256_sorted_codes_with_0_and_1(signed):
    q = create_dynamic_map(signed)
    assert q.shape == (256,) and q.dtype == torch.float32
    assert bool((q[1:] > q[:-1]).all())  # strictly increasing: 256 distinct codes
    assert 0.0 in q.tolist() and q[-1].item() == 1.0
    assert q[0].item() == (-1.0 if signed else 0.0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_reaches_down_seven_decades(signed):
    q = create_dynamic_map(signed)
    magnitudes = q.abs()[q != 0]
    assert magnitudes.min() < 1e-6
    # codes per decade grow towards 1: 128 in [0.1, 1) (signed: 64 of each sign), 16 in [1e-4, 1e-3)
    assert ((magnitudes >= 0.1) & (magnitudes < 1)).sum().item() == 128
    assert ((magnitudes >= 1e-4) & (magnitudes < 1e-3)).sum().item() == 16


def test_signed_map_is_symmetric_but_for_its_smallest_codes():
    q = create_dynamic_map(True)
    pos, neg = q[q > 0], -q[q < 0].flip(0)
    assert pos.numel() == 127 and neg.numel() == 128
    assert torch.equal(pos, neg[1:])  # -1 took the slot of +5.5e-7, the smallest positive code
    assert neg[0].item() == pytest.approx(5.5e-7) and neg[-1].item() == 1.0


# ---- numerics --------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_round_trip_error_is_at_most_half_a_code_gap_of_the_block_absmax(signed):
    x = torch.randn(7, 300) * torch.logspace(-3, 2, 7)[:, None]  # blocks of very different sizes
    x = x if signed else x.abs()
    qmap = create_dynamic_map(signed)
    codes, scale = quantize_8bit(x, qmap)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scale.shape == (-(-x.numel() // 256),)
    err = _blocks(dequantize_8bit(codes, scale, qmap) - x).abs().amax(1)
    half_gap = (qmap[1:] - qmap[:-1]).max() / 2  # 0.9 / 64 / 2 signed, 0.9 / 128 / 2 unsigned
    assert bool((err <= half_gap * scale * (1 + 1e-6)).all())


def test_small_values_keep_precision_better_than_a_linear_map():
    # Moments of one block span decades: one large value, the rest 1e-4..1e-1 of it.
    torch.manual_seed(0)
    x = torch.logspace(-4, -1, 255) * torch.randn(255).sign()
    x = torch.cat([torch.tensor([1.0]), x])
    dynamic = OptimState8bit.from_float(x).dequantize()
    step = x.abs().max() / 127  # a linear int8 grid on the same absmax
    linear = torch.round(x / step) * step
    rel = lambda y: ((y - x).abs() / x.abs())[1:]  # noqa: E731  relative error of the 255 small values
    small = (x.abs() < 1e-2)[1:]
    assert rel(dynamic).max() < 0.3  # every value keeps its order of magnitude
    assert rel(linear).median() == 1.0  # most of them round to 0 on a linear grid
    assert rel(dynamic)[small].mean() < 0.1 < 0.8 < rel(linear)[small].mean()  # 7% vs 87% here
    assert rel(dynamic)[~small].mean() < 0.5 * rel(linear)[~small].mean()  # 2.6% vs 8.4% at 1e-2..1e-1


def test_partial_last_block_has_its_own_absmax():
    x = torch.randn(300)
    x[256:] *= 0.01  # the last block (44 elements) is much smaller than the first
    s = OptimState8bit.from_float(x)
    assert s.scale.shape == (2,)
    assert s.scale.tolist() == [x[:256].abs().max().item(), x[256:].abs().max().item()]
    tail_err = (s.dequantize()[256:] - x[256:]).abs().max()
    assert tail_err <= 0.0071 * x[256:].abs().max()  # precise relative to its own block


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_block_absmax_element_round_trips_exactly_whatever_its_sign(sign):
    x = torch.rand(256) * 0.5
    x[17] = 3.0 * sign
    assert OptimState8bit.from_float(x).dequantize()[17].item() == 3.0 * sign


def test_zeros_are_exact():
    z = OptimState8bit.zeros((3, 100), signed=True)
    assert torch.equal(z.dequantize(), torch.zeros(3, 100))
    assert torch.equal(z.scale, torch.full((2,), 1e-12))
    u = OptimState8bit.zeros((0, 4), signed=False)
    assert u.shape == (0, 4) and u.scale.shape == (0,) and u.dequantize().shape == (0, 4)


def test_states_share_one_map_per_signedness_and_device():
    a, b = OptimState8bit.zeros((4,), True), OptimState8bit.zeros((8,), True)
    c = OptimState8bit.zeros((4,), False)
    assert a.qmap.data_ptr() == b.qmap.data_ptr() != c.qmap.data_ptr()


# ---- ops -------------------------------------------------------------------------------------
def test_copy_from_float_requantizes_and_from_a_state_copies_codes():
    x, y = torch.randn(4, 128), torch.randn(4, 128)
    s = OptimState8bit.zeros((4, 128))
    s.copy_(x)
    _same(s, OptimState8bit.from_float(x))
    t = OptimState8bit.from_float(y)
    s.copy_(t)
    _same(s, t)
    u = OptimState8bit.zeros((4, 128), signed=False)  # another map: the value is re-quantized
    u.copy_(OptimState8bit.from_float(y.abs()))
    _same(u, OptimState8bit.from_float(OptimState8bit.from_float(y.abs()).dequantize(), signed=False))
    plain = torch.empty(4, 128)
    plain.copy_(t)
    assert torch.equal(plain, t.dequantize())


def test_copy_of_another_shape_raises():
    with pytest.raises(ValueError, match=r"OptimState8bit: cannot write a \(3,\) tensor into \(4,\)"):
        OptimState8bit.zeros((4,)).copy_(torch.zeros(3))


@pytest.mark.parametrize(
    "op",
    [
        lambda t, g: t.lerp_(g, 0.1),
        lambda t, g: t.mul_(0.9),
        lambda t, g: t.addcmul_(g, g, value=0.01),
        lambda t, g: t.add_(g),
    ],
    ids=["lerp_", "mul_", "addcmul_", "add_"],
)
def test_inplace_math_is_fp32_then_one_requantization(op):
    x, g = torch.randn(2, 200), torch.randn(2, 200)
    s = OptimState8bit.from_float(x)
    expected = s.dequantize().clone()
    op(expected, g)
    assert op(s, g) is s
    _same(s, OptimState8bit.from_float(expected))


def test_reading_a_state_gives_plain_fp32():
    x = torch.rand(300)
    s = OptimState8bit.from_float(x, signed=False)
    root = s.sqrt()
    assert type(root) is torch.Tensor and torch.equal(root, s.dequantize().sqrt())
    p = torch.ones(300)
    p.addcdiv_(s, root + 1, value=-0.5)  # torch's AdamW: param.addcdiv_(exp_avg, denom)
    assert torch.equal(p, torch.ones(300).addcdiv_(s.dequantize(), root + 1, value=-0.5))


def test_to_detach_clone_keep_the_codes():
    s = OptimState8bit.from_float(torch.randn(3, 100))
    b = s.to(torch.bfloat16)
    assert type(b) is OptimState8bit and b.dtype == torch.bfloat16 and torch.equal(b.codes, s.codes)
    assert b.dequantize(torch.float32).equal(s.dequantize())
    _same(s.detach(), s)
    c = s.clone()
    _same(c, s)
    assert c.codes.data_ptr() != s.codes.data_ptr()
    _same(copy.deepcopy(s), s)
    names, attrs = s.__tensor_flatten__()
    _same(OptimState8bit.__tensor_unflatten__({n: getattr(s, n) for n in names}, attrs, s.shape, s.stride()), s)


def test_view_keeps_blocks():
    s = OptimState8bit.from_float(torch.randn(3, 100))
    v = s.view(6, 50)
    assert v.shape == (6, 50) and v.codes.data_ptr() == s.codes.data_ptr()
    assert torch.equal(v.dequantize(), s.dequantize().view(6, 50))
    assert torch.equal(s.reshape(-1).dequantize(), s.dequantize().reshape(-1))


def test_dim0_slice_on_block_boundaries_is_a_view():
    s = OptimState8bit.from_float(torch.randn(5, 128))  # 640 elements: blocks of 2 rows, last one partial
    tail = s[2:5]
    assert tail.scale.shape == (2,) and tail.codes.data_ptr() == s.codes[2:].data_ptr()
    assert torch.equal(tail.dequantize(), s.dequantize()[2:5])
    assert torch.equal(s[0:2].dequantize(), s.dequantize()[:2])


@pytest.mark.parametrize(
    "index, msg",
    [
        (lambda s: s[1:3], r"slice \[1:3\] of shape \[5, 128\] covers elements \[128, 384\), not whole blocks of 256"),
        (lambda s: s[:, :64], r"slice supports dim 0 with step 1, got dim=1, step=1"),
        (lambda s: s[0:4:2], r"slice supports dim 0 with step 1, got dim=0, step=2"),
    ],
    ids=["unaligned", "dim1", "step2"],
)
def test_slices_that_split_blocks_raise(index, msg):
    with pytest.raises(NotImplementedError, match=msg):
        index(OptimState8bit.from_float(torch.randn(5, 128)))


def test_unsupported_op_raises_naming_class_and_op():
    with pytest.raises(NotImplementedError, match=r"OptimState8bit does not support aten\.cos\.default; supported: "):
        torch.cos(OptimState8bit.zeros((4,)))


def test_bad_inner_tensors_raise():
    qmap = create_dynamic_map(True)
    with pytest.raises(TypeError, match="codes must be uint8 and scale/qmap float32, got torch.int8"):
        OptimState8bit(torch.zeros(4, dtype=torch.int8), torch.ones(1), qmap, True)
    with pytest.raises(ValueError, match=r"300 codes need scale \[2\] and qmap \[256\], got \[1\] and \[256\]"):
        OptimState8bit(torch.zeros(300, dtype=torch.uint8), torch.ones(1), qmap, True)
    with pytest.raises(TypeError, match="from_float: expected a float tensor, got torch.int64"):
        OptimState8bit.from_float(torch.zeros(4, dtype=torch.long))


def test_state_dict_loads_with_weights_only():
    state = {"exp_avg": OptimState8bit.from_float(torch.randn(3, 100)),
             "exp_avg_sq": OptimState8bit.from_float(torch.rand(3, 100), signed=False)}  # fmt: skip
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for name in state:
        _same(loaded[name], state[name])


# ---- snapshots: what review should see as a diff ---------------------------------------------
def test_repr_snapshot():
    assert_expected_inline(
        repr(OptimState8bit.zeros((3, 100), signed=False)),
        """\
OptimState8bit(shape=[3, 100], dtype=torch.float32, device=cpu, codes=torch.uint8[3, 100], \
scale=torch.float32[2], qmap=torch.float32[256], signed=False)""",
    )


def test_op_table_snapshot():
    assert_expected_inline("\n".join(OptimState8bit.supported_ops()), """\
_c10d_functional._wrap_tensor_autograd.default
_c10d_functional.all_gather_into_tensor.default
_c10d_functional.wait_tensor.default
aten._pin_memory.default
aten._to_copy.default
aten._unsafe_view.default
aten.abs.default
aten.add.Tensor
aten.add_.Scalar
aten.add_.Tensor
aten.addcdiv_.default
aten.addcmul_.default
aten.alias.default
aten.clone.default
aten.copy_.default
aten.detach.default
aten.div.Scalar
aten.div.Tensor
aten.div_.Tensor
aten.empty_like.default
aten.is_pinned.default
aten.lerp_.Scalar
aten.lerp_.Tensor
aten.maximum.default
aten.mul.Scalar
aten.mul.Tensor
aten.mul_.Scalar
aten.mul_.Tensor
aten.neg.default
aten.ones_like.default
aten.reshape.default
aten.sign.default
aten.slice.Tensor
aten.sqrt.default
aten.sub.Tensor
aten.sub_.Tensor
aten.view.default
aten.zeros_like.default
torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")
