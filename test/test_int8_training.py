import math

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline

from quantframe import Int8QTLinearWeight
from quantframe.primitives import dequantize_rowwise_int8
from quantframe.testing import QuantTensorContract


class TestInt8QTContract(QuantTensorContract):
    sqnr_floor = 38.0  # 8-bit per-row on Gaussian rows: ~40 dB

    def make(self, w):
        return Int8QTLinearWeight.from_float(w)


def make(n=8, k=16, dtype=torch.float32):
    return Int8QTLinearWeight.from_float(torch.randn(n, k, dtype=dtype))


# ---- from_float ----------------------------------------------------------------------------
def test_from_float_is_per_row_absmax_over_127_round_to_nearest():
    w = torch.tensor([[1.27, -0.635, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    q = Int8QTLinearWeight.from_float(w)
    torch.testing.assert_close(q.scale, torch.tensor([0.01, 1e-12]))
    # -0.635 / 0.01 = -63.5 in exact arithmetic; fp32 gives -63.4999..., rounds to -63
    assert q.int_data.tolist() == [[127, round(-0.635 / 0.01), 0, 30], [0, 0, 0, 0]]
    assert torch.equal(q.int_data, Int8QTLinearWeight.from_float(w).int_data)  # deterministic


def test_from_float_codes_stay_in_symmetric_range():
    q = make(64, 64)
    assert q.int_data.dtype == torch.int8
    assert q.int_data.min() >= -127 and q.int_data.max() <= 127
    assert (q.int_data.abs().amax(dim=1) == 127).all()  # every row's absmax maps exactly to 127


@pytest.mark.parametrize(
    "w, err, msg",
    [
        (torch.ones(4, 4, dtype=torch.int32), TypeError, r"must be floating point .* got torch\.int32"),
        (torch.ones(4), ValueError, r"must be 2-D .* got shape \(4,\)"),
        (torch.ones(2, 3, 4), ValueError, r"must be 2-D .* got shape \(2, 3, 4\)"),
        (torch.ones(0, 4), ValueError, r"weight is empty \(shape \(0, 4\)\)"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or Inf"),
        ([[1.0]], TypeError, "expected a torch.Tensor weight, got list"),
    ],
    ids=["int", "1d", "3d", "empty", "nan", "inf", "list"],
)
def test_from_float_rejects_bad_weights(w, err, msg):
    with pytest.raises(err, match=msg):
        Int8QTLinearWeight.from_float(w)


# ---- linear and its gradients ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_gradients_match_dense_with_dequantized_weight(dtype, bias):
    q = make(12, 20, dtype).requires_grad_()
    b = torch.randn(12, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 20, dtype=dtype, requires_grad=True)
    w_ref = q.dequantize().detach().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 3, 12, dtype=dtype)
    F.linear(x, q, b).backward(g)
    F.linear(x_ref, w_ref, b_ref).backward(g)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert type(q.grad) is torch.Tensor and q.grad.dtype == dtype  # dense, activation dtype
    torch.testing.assert_close(q.grad, w_ref.grad, **tol)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, **tol)


def test_linear_rejects_mixed_devices():
    q = make()
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        F.linear(torch.randn(2, 16, device="meta"), q)


def test_linear_rejects_wrong_in_features():
    with pytest.raises(ValueError, match="input has 15 features, weight expects 16"):
        F.linear(torch.randn(2, 15), make())


def test_linear_rejects_a_non_2d_view():
    with pytest.raises(ValueError, match=r"must be a 2-D \[out, in\] weight, got shape \(128,\)"):
        F.linear(torch.randn(2, 128), make().view(-1))


def test_unsupported_op_lists_supported_ops():
    with pytest.raises(NotImplementedError) as e:
        make().t()
    assert str(e.value).startswith("Int8QTLinearWeight does not support aten.t.default; supported: ")
    assert "aten.copy_.default" in str(e.value)


# ---- in-place updates requantize with unbiased stochastic rounding ---------------------------
def test_copy_from_float_is_unbiased_stochastic_rounding():
    # One row whose absmax fixes the scale at 1/127; the other values sit between grid points.
    target = torch.tensor([[1.0, 0.3 / 127, 10.25 / 127, -40.6 / 127]]).repeat(4000, 1)
    q = Int8QTLinearWeight.from_float(torch.ones(4000, 4))
    q.copy_(target)
    codes = q.int_data.float()
    exact = target * 127
    assert ((codes == exact.floor()) | (codes == exact.ceil())).all()  # only the two neighbours
    torch.testing.assert_close(codes.mean(0), exact[0], atol=0.03, rtol=0)  # E[code] = exact value
    assert 0 < (codes[:, 2] == 11).float().mean() < 1  # genuinely random, not round-to-nearest


def test_copy_between_quantized_tensors_copies_codes_and_scales():
    a, b = make(), make()
    a.copy_(b)
    assert torch.equal(a.int_data, b.int_data) and torch.equal(a.scale, b.scale)


def test_copy_into_plain_tensor_dequantizes():
    q, out = make(), torch.empty(8, 16)
    out.copy_(q)
    torch.testing.assert_close(out, q.dequantize())


@pytest.mark.parametrize(
    "op",
    [
        lambda w, d: w.add_(d),
        lambda w, d: w.sub_(d),
        lambda w, d: w.mul_(0.5),
        lambda w, d: w.addcdiv_(d, torch.full_like(d, 2.0), value=-1.0),
        lambda w, d: w.addcmul_(d, d, value=0.5),
        lambda w, d: w.lerp_(d, 0.25),
    ],
    ids=["add_", "sub_", "mul_", "addcdiv_", "addcmul_", "lerp_"],
)
def test_inplace_ops_requantize_the_dense_result(op):
    q = make()
    delta = torch.randn(8, 16) * 0.1
    expected = op(q.dequantize().clone(), delta)
    out = op(q, delta)
    assert out is q and isinstance(q, Int8QTLinearWeight)
    step = q.scale.view(-1, 1)
    assert ((q.dequantize() - expected).abs() <= step * 1.0001).all()  # within one SR step


def test_out_of_place_math_returns_a_plain_dequantized_tensor():
    q = make()
    g = torch.randn(8, 16)
    out = g.add(q, alpha=0.1)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, g + 0.1 * q.dequantize())


def test_zeros_like_is_a_plain_tensor_of_the_outer_dtype():
    z = torch.zeros_like(make(dtype=torch.bfloat16))
    assert type(z) is torch.Tensor and z.dtype == torch.bfloat16 and z.shape == (8, 16) and not z.any()


# ---- views with real semantics ---------------------------------------------------------------
def test_flat_view_round_trips_and_aliases():
    q = make()
    flat = q.view(-1)
    assert isinstance(flat, Int8QTLinearWeight) and flat.shape == (128,)
    torch.testing.assert_close(flat.dequantize(), q.dequantize().view(-1))
    back = flat.view(8, 16)
    torch.testing.assert_close(back.dequantize(), q.dequantize())
    back.copy_(torch.zeros(8, 16))  # a write through the view reaches the original
    assert not q.int_data.any()


def test_as_strided_selects_whole_rows():
    q = make()
    window = torch.as_strided(q, (3, 16), (16, 1), 32)
    torch.testing.assert_close(window.dequantize(), q.dequantize()[2:5])
    with pytest.raises(NotImplementedError, match=r"whole rows of 16 elements \(got elements \[8, 56\)\)"):
        torch.as_strided(q, (3, 16), (16, 1), 8)
    with pytest.raises(NotImplementedError, match="contiguous row-aligned windows only"):
        torch.as_strided(q, (16, 8), (1, 16), 0)


def test_split_and_cat_along_rows():
    q = make()
    parts = q.split(3)
    assert [p.shape[0] for p in parts] == [3, 3, 2]
    torch.testing.assert_close(torch.cat(parts).dequantize(), q.dequantize())
    with pytest.raises(NotImplementedError, match="split supports dim 0"):
        q.split(4, dim=1)


def test_column_slice_is_refused():
    with pytest.raises(NotImplementedError, match="slice supports dim 0 with step 1"):
        make()[:, 2:4]


def test_new_zeros_gives_quantized_zeros():
    z = make().new_zeros((4, 16))
    assert isinstance(z, Int8QTLinearWeight) and not z.dequantize().any()
    with pytest.raises(NotImplementedError, match="not whole rows of 16"):
        make().new_zeros((3, 5))


def test_empty_row_slice_dequantizes_to_empty():
    e = make()[8:]
    assert e.shape == (0, 16) and e.dequantize().shape == (0, 16)


# ---- snapshots --------------------------------------------------------------------------------
def test_repr_snapshot():
    q = Int8QTLinearWeight.from_float(torch.randn(4, 8, dtype=torch.bfloat16))
    assert_expected_inline(
        repr(q),
        """Int8QTLinearWeight(shape=[4, 8], dtype=torch.bfloat16, device=cpu, int_data=torch.int8[4, 8], scale=torch.float32[4])""",
    )


def test_op_table_snapshot():
    assert_expected_inline("\n".join(Int8QTLinearWeight.supported_ops()), """\
_c10d_functional._wrap_tensor_autograd.default
_c10d_functional.all_gather_into_tensor.default
_c10d_functional.wait_tensor.default
aten._foreach_add.List
aten._foreach_add.Scalar
aten._foreach_add_.List
aten._foreach_add_.Scalar
aten._foreach_add_.ScalarList
aten._foreach_add_.Tensor
aten._foreach_addcdiv_.Scalar
aten._foreach_addcdiv_.ScalarList
aten._foreach_addcdiv_.Tensor
aten._foreach_addcmul_.Scalar
aten._foreach_addcmul_.ScalarList
aten._foreach_addcmul_.Tensor
aten._foreach_copy_.default
aten._foreach_div_.List
aten._foreach_div_.Scalar
aten._foreach_div_.ScalarList
aten._foreach_lerp_.List
aten._foreach_lerp_.Scalar
aten._foreach_mul.List
aten._foreach_mul.Scalar
aten._foreach_mul_.List
aten._foreach_mul_.Scalar
aten._foreach_mul_.ScalarList
aten._foreach_mul_.Tensor
aten._foreach_neg.default
aten._foreach_sub.List
aten._foreach_sub_.List
aten._foreach_sub_.Scalar
aten._foreach_sub_.ScalarList
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
aten.as_strided.default
aten.cat.default
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
aten.new_zeros.default
aten.ones_like.default
aten.reshape.default
aten.sign.default
aten.slice.Tensor
aten.split.Tensor
aten.sqrt.default
aten.sub.Tensor
aten.sub_.Tensor
aten.view.default
aten.zeros_like.default
torch._C._nn.linear
torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")


def test_dequantize_matches_primitive():
    q = make()
    torch.testing.assert_close(q.dequantize(), dequantize_rowwise_int8(q.int_data, q.scale))
    assert math.isclose(q.nbytes_packed, 8 * 16 + 8 * 4)
