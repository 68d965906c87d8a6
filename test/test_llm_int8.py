import io
import math

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from quantframe.kernels import int8_mm
from quantframe.kernels.int8_mm import int8_scaled_mm_reference
from torch import nn

from quantframe import primitives as P
from quantframe.api import quantize_
from quantframe.llm_int8 import LLMInt8Config, LLMInt8Weight, llm_int8
from quantframe.testing import QuantTensorContract, assert_close_at_scale, sqnr


class TestLLMInt8Contract(QuantTensorContract):
    sqnr_floor = 43.0  # per-row int8, as the affine int8 per-row layout (measured 44.3)

    def make(self, w):
        return LLMInt8Weight.from_float(w, threshold=6.0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_linear_matches_dequantized(self, dtype):
        # The non-outlier activations are quantized too: compare at INT8 accuracy...
        q = self.make(self.weight(dtype))
        x = torch.randn(3, 5, self.shape[1], dtype=dtype)
        ref = F.linear(x.float(), q.dequantize(torch.float32))
        y = F.linear(x, q)
        assert y.dtype == dtype and y.shape == (3, 5, self.shape[0])
        assert sqnr(ref, y.float()) > 38
        # ...and, with every column an outlier (tiny threshold), at float accuracy.
        q_all = LLMInt8Weight.from_float(self.weight(dtype), threshold=1e-30)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(F.linear(x, q_all), F.linear(x.float(), q_all.dequantize(torch.float32)).to(dtype), atol=tol, rtol=tol)


def _x_with_outliers(m=6, k=64, cols=(3, 17, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for c in cols:
        x[c % m, c] = 20.0 + c  # one big entry makes the whole column an outlier column
    return x


def _manual(x, w, t):
    """Split by hand with boolean indexing (dynamic shapes): the bitsandbytes formulation."""
    outl = (x.abs() > t).any(0)
    keep = ~outl
    xq, xs = P.quantize_rowwise_int8(x * keep)  # outlier columns excluded from the absmax too
    y = int8_scaled_mm_reference(xq, w.qdata * keep.to(torch.int8), xs, w.scale, out_dtype=torch.float32)
    return y + x[:, outl] @ w.dequantize(torch.float32)[:, outl].T, outl


def test_no_outliers_with_infinite_threshold_equals_the_pure_int8_path():
    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=math.inf)
    x = _x_with_outliers()
    xq, xs = P.quantize_rowwise_int8(x)
    ref = int8_scaled_mm_reference(xq, w.qdata, xs, w.scale, out_dtype=torch.float32)
    assert torch.equal(F.linear(x, w), ref)


def test_outlier_columns_are_computed_in_float_and_match_a_manual_split():
    w_float = torch.randn(32, 64)
    w = LLMInt8Weight.from_float(w_float, threshold=6.0)
    x = _x_with_outliers()
    ref, outl = _manual(x, w, 6.0)
    assert outl.nonzero().flatten().tolist() == [3, 17, 40]
    torch.testing.assert_close(F.linear(x, w), ref, rtol=1e-6, atol=1e-5)
    # The outliers are exact: a weight that is zero outside the outlier columns gives x @ W.T in fp32.
    w_dense = torch.zeros(32, 64)
    w_dense[:, outl] = torch.randn(32, 3)
    wo = LLMInt8Weight.from_float(w_dense, threshold=6.0)
    assert torch.equal(F.linear(x, wo), x[:, outl] @ wo.dequantize(torch.float32)[:, outl].T)
    # ...while the pure int8 path loses them (the 20+ entries wreck the absmax of their rows).
    inf = LLMInt8Weight.from_float(w_float, threshold=math.inf)  # same codes, no outliers
    dense = x @ w.dequantize(torch.float32).T
    assert (F.linear(x, w) - dense).abs().max() < (F.linear(x, inf) - dense).abs().max() / 4


def test_runs_int8_scaled_mm_without_outlier_columns(monkeypatch):
    calls = []

    def spy(a, b, *args, **kwargs):
        calls.append((a.clone(), b.clone()))
        return int8_scaled_mm_reference(a, b, *args, **kwargs)

    monkeypatch.setattr(int8_mm, "int8_scaled_mm", spy)
    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=6.0)
    F.linear(_x_with_outliers(), w)
    (a, b), = calls
    assert a.dtype == b.dtype == torch.int8
    assert (a[:, [3, 17, 40]] == 0).all()  # the outlier columns are not in the INT8 product...
    assert torch.equal(b, w.qdata)  # ...because x_q is zero there: W goes in as stored, no masked copy


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_empty_batch(shape):
    w = LLMInt8Weight.from_float(torch.randn(32, 64))
    x = torch.randn(shape, requires_grad=True)
    y = F.linear(x, w, torch.randn(32))
    assert y.shape == (*shape[:-1], 32)
    y.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_grad_matches_dense_and_bias_added_once(dtype):
    w = LLMInt8Weight.from_float(torch.randn(32, 64, dtype=dtype))
    bias = torch.randn(32, dtype=dtype, requires_grad=True)
    x = _x_with_outliers().to(dtype).reshape(2, 3, 64).requires_grad_()
    y = F.linear(x, w, bias)
    assert y.dtype == dtype
    ref = _manual(x.detach().float().reshape(6, 64), w, 6.0)[0] + bias.detach().float()
    torch.testing.assert_close(y.float(), ref.reshape(2, 3, 32).to(dtype).float())
    g = torch.randn(2, 3, 32, dtype=dtype)
    y.backward(g)
    wd = w.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, (g.float() @ wd).to(dtype))
    torch.testing.assert_close(bias.grad, g.sum((0, 1)))


def test_compile_fullgraph_with_outliers_matches_eager():
    torch._dynamo.reset()
    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=6.0)
    compiled = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
    for seed, cols in ((0, (3, 17)), (1, (5, 6, 50))):  # different outlier columns, same graph
        x = _x_with_outliers(cols=cols, seed=seed)
        torch.testing.assert_close(compiled(x, w), F.linear(x, w))


def test_compile_fullgraph_backward_and_empty_batch_match_eager():
    torch._dynamo.reset()
    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=6.0)
    compiled = torch.compile(lambda x, w, b: F.linear(x, w, b), fullgraph=True)
    x, b = _x_with_outliers().requires_grad_(), torch.randn(32, requires_grad=True)
    g = torch.randn(6, 32)
    compiled(x, w, b).backward(g)
    grads = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    F.linear(x, w, b).backward(g)
    torch.testing.assert_close(grads, (x.grad, b.grad))
    assert compiled(torch.zeros(0, 64), w, b).shape == (0, 32)


def test_quantize_swaps_frozen_weights_and_state_dict_round_trips():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = _x_with_outliers()
    ref = model(x)
    quantize_(model, llm_int8(threshold=6.0))
    assert isinstance(model[0].weight.data, LLMInt8Weight) and not model[0].weight.requires_grad
    assert model[0].weight.threshold == 6.0
    torch.testing.assert_close(model(x), ref, atol=0.05, rtol=0.05)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["0.weight"].threshold == 6.0


def test_errors():
    for bad in (0, -1.0, math.nan, True, "6"):
        with pytest.raises(ValueError, match=r"llm_int8: threshold=.* must be a number > 0"):
            llm_int8(bad)
    with pytest.raises(ValueError, match=r"LLMInt8Weight.from_float: threshold=0 must be a number > 0"):
        LLMInt8Weight.from_float(torch.randn(4, 4), threshold=0)
    with pytest.raises(TypeError, match=r"LLMInt8Weight.from_float: weight must be floating point"):
        LLMInt8Weight.from_float(torch.ones(4, 4, dtype=torch.int32))
    w = LLMInt8Weight.from_float(torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"F.linear: input has 63 features, weight expects 64"):
        F.linear(torch.randn(2, 63), w)
    with pytest.raises(TypeError, match=r"F.linear: the input must be a plain float tensor, got Tensor torch.int64"):
        F.linear(torch.ones(2, 64, dtype=torch.long), w)


def test_repr_and_op_table():
    assert LLMInt8Config.frozen and llm_int8() == LLMInt8Config(6.0)
    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=6.0)
    assert_expected_inline(repr(w), """LLMInt8Weight(shape=[32, 64], dtype=torch.float32, device=cpu, qdata=torch.int8[32, 64], scale=torch.float32[32], threshold=6.0)""")
    assert_expected_inline(", ".join(LLMInt8Weight.supported_ops()), """aten._pin_memory.default, aten._to_copy.default, aten._unsafe_view.default, aten.abs.default, aten.add.Tensor, aten.alias.default, aten.clone.default, aten.copy_.default, aten.detach.default, aten.div.Scalar, aten.div.Tensor, aten.empty_like.default, aten.is_pinned.default, aten.maximum.default, aten.mul.Scalar, aten.mul.Tensor, aten.neg.default, aten.ones_like.default, aten.sign.default, aten.slice.Tensor, aten.sqrt.default, aten.sub.Tensor, aten.view.default, aten.zeros_like.default, torch._C._nn.linear, torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")


@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_cuda_paths_equal_the_decomposition(monkeypatch, m):
    """The CUDA branches (one row: one weight-only pass over W, the affine int8 GEMV kernel; more rows:
    the INT8 GEMM plus the outlier part, on the affine skinny GEMM kernel up to 16 rows, both affine
    kernels interpreted here), run here with the kernels' CPU references otherwise: the
    decomposition's result, up to fp32 rounding (16-bit x: the outlier part rounded to x's dtype
    from 2 rows on)."""
    import quantframe.kernels

    from quantframe.llm_int8 import llm_int8_mm

    w = LLMInt8Weight.from_float(torch.randn(32, 64), threshold=6.0)
    x = torch.randn(m, 64)
    x[:, [3, 17]] *= 8  # outlier columns
    ref = llm_int8_mm(x, w.qdata, w.scale, 6.0)
    monkeypatch.setattr(quantframe.kernels, "use_triton", lambda t: True)
    from quantframe.testing import patch_interpreter_loop_bounds

    undo = patch_interpreter_loop_bounds()  # the affine kernels run interpreted here
    try:
        torch.testing.assert_close(llm_int8_mm(x, w.qdata, w.scale, 6.0), ref, rtol=1e-5, atol=1e-4)
        xb = x.bfloat16()
        got = llm_int8_mm(xb, w.qdata, w.scale, 6.0)
    finally:
        if undo is not None:
            undo()
    monkeypatch.undo()
    # from 2 rows on the outlier part is one bf16 rounding of a partial sum: at most ~1 ulp of |y|
    assert_close_at_scale(got, llm_int8_mm(xb, w.qdata, w.scale, 6.0), rel=2**-7, min_sqnr=45)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_decode_paths_match_the_reference_on_cuda(m):
    # One token takes the affine int8 GEMV with fp32 x, 16 rows the INT8 GEMM plus the skinny GEMM on
    # the outlier columns: both equal the CPU decomposition up to fp32 summation order.
    from quantframe.llm_int8 import llm_int8_mm

    w = LLMInt8Weight.from_float(torch.randn(4096, 4096), threshold=6.0)
    x = torch.randn(m, 4096)
    x[:, [3, 17, 2000]] *= 8  # outlier columns
    ref = llm_int8_mm(x, w.qdata, w.scale, 6.0)
    got = llm_int8_mm(x.cuda(), w.qdata.cuda(), w.scale.cuda(), 6.0).cpu()
    assert_close_at_scale(got, ref, rel=1e-5, min_sqnr=80)
