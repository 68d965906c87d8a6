"""quantframe.kernels.int8_weight_mm: reference vs float64 dequantize-then-matmul; Triton vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import torch

from quantframe.kernels.int8_weight_mm import (
    dequantize_rowwise_int8_reference,
    dequantize_rowwise_int8_triton,
    int8_weight_mm,
    int8_weight_mm_dense,
    int8_weight_mm_reference,
    int8_weight_mm_triton,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) of Triton vs reference: both accumulate in fp32 but sum in another order, so
# outputs differ by fp32 noise, which can flip the final rounding to x.dtype by one ulp.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
# (transpose, has_bias): the input gradient (transpose=True) takes no bias.
LAYOUTS = {"fwd": (False, False), "fwd-bias": (False, True), "bwd": (True, False)}
IMPLS = {"reference": int8_weight_mm_reference, "triton": int8_weight_mm_triton, "dense": int8_weight_mm_dense}
# The dense path rounds W = int_data * scale to x.dtype before the matmul (as a 16-bit layer would).
DENSE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _operands(lead, n, k, dtype, transpose, has_bias):
    """x [*lead, N or K] in dtype, int_data int8 [N, K] over the full range, scale fp32 [N], bias [N]."""
    int_data = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.02 + 0.001  # like absmax / 127 of a weight with |w| < 2.5
    x = torch.randn(*lead, n if transpose else k).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    return x, int_data, scale, bias


def _mm_cases():
    for m in (1, 5, 16):
        for n in (7, 33):
            for k in (16, 33):
                for layout, (transpose, has_bias) in LAYOUTS.items():
                    for name, dtype in DTYPES.items():
                        yield pytest.param(m, n, k, transpose, has_bias, dtype, id=f"M{m}-N{n}-K{k}-{layout}-{name}")


MM_CASES = list(_mm_cases())


# Reference


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_reference_matches_float64_dequantize_then_matmul(layout):
    transpose, has_bias = layout
    x, int_data, scale, bias = _operands((5,), 33, 16, torch.float32, transpose, has_bias)
    w = int_data.double() * scale.double()[:, None]  # [N, K] dequantized, exact in float64
    expected = x.double() @ (w if transpose else w.T)
    if bias is not None:
        expected = expected + bias.double()
    y = int8_weight_mm_reference(x, int_data, scale, bias, transpose)
    assert y.dtype == torch.float32 and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
def test_hand_worked_values(impl):
    # W = int_data * scale[:, None] = [[0.5, -1.0], [1.25, 0.0]] (exact in fp32).
    int_data = torch.tensor([[1, -2], [5, 0]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25])
    x = torch.tensor([[2.0, 3.0]])
    bias = torch.tensor([1.0, -1.0])
    # x @ W.T = [2*0.5 + 3*(-1.0), 2*1.25 + 3*0] = [-2.0, 2.5]; + bias = [-1.0, 1.5].
    assert impl(x, int_data, scale).tolist() == [[-2.0, 2.5]]
    assert impl(x, int_data, scale, bias).tolist() == [[-1.0, 1.5]]
    # x @ W = [2*0.5 + 3*1.25, 2*(-1.0) + 3*0] = [4.75, -2.0].
    assert impl(x, int_data, scale, transpose=True).tolist() == [[4.75, -2.0]]


# Triton vs reference


@pytest.mark.parametrize("m, n, k, transpose, has_bias, dtype", MM_CASES)
def test_triton_matches_reference(m, n, k, transpose, has_bias, dtype):
    x, int_data, scale, bias = _operands((m,), n, k, dtype, transpose, has_bias)
    y = int8_weight_mm_triton(x, int_data, scale, bias, transpose)
    y_ref = int8_weight_mm_reference(x, int_data, scale, bias, transpose)
    assert y.dtype == dtype and y.shape == y_ref.shape == (m, k if transpose else n)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("m, n, k, transpose, has_bias, dtype", MM_CASES)
def test_dense_matches_reference(m, n, k, transpose, has_bias, dtype):
    x, int_data, scale, bias = _operands((2, m), n, k, dtype, transpose, has_bias)
    y = int8_weight_mm_dense(x, int_data, scale, bias, transpose)
    y_ref = int8_weight_mm_reference(x, int_data, scale, bias, transpose)
    assert y.dtype == dtype and y.shape == y_ref.shape == (2, m, k if transpose else n)
    atol, rtol = DENSE_TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n, k", [(1, 1), (3, 33), (2, 2100)], ids=["1x1", "3x33", "2x2100-two-blocks"])
def test_dequantize_triton_matches_reference_exactly(n, k, dtype):
    int_data = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.02 + 0.001
    w = dequantize_rowwise_int8_triton(int_data, scale, dtype)
    assert w.dtype == dtype and torch.equal(w, dequantize_rowwise_int8_reference(int_data, scale, dtype))


def test_dequantize_rounds_to_nearest_bf16():
    # 1 + 2**-8 + 2**-9 lies 3/4 of the way from bf16's 1 + 2**-8 to 1 + 2**-7: nearest is the latter
    scale = torch.tensor([1 + 2**-8 + 2**-9])
    w = dequantize_rowwise_int8_triton(torch.ones(1, 1, dtype=torch.int8), scale, torch.bfloat16)
    assert w.item() == 1 + 2**-7


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_triton_takes_3d_input(layout, dtype):
    transpose, has_bias = layout
    x, int_data, scale, bias = _operands((2, 3), 33, 16, dtype, transpose, has_bias)
    y = int8_weight_mm_triton(x, int_data, scale, bias, transpose)
    y_ref = int8_weight_mm_reference(x, int_data, scale, bias, transpose)
    assert y.shape == (2, 3, 16 if transpose else 33)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
def test_triton_takes_strided_operands(transpose):
    # x every other column, int_data a transposed view: the kernel reads both through strides.
    x = torch.randn(5, 2 * (7 if transpose else 33))[:, ::2]
    int_data = torch.randint(-127, 128, (33, 7), dtype=torch.int8).T  # [N=7, K=33], column-major
    scale = torch.rand(7) * 0.02 + 0.001
    y = int8_weight_mm_triton(x, int_data, scale, None, transpose)
    y_ref = int8_weight_mm_reference(x, int_data, scale, None, transpose)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
def test_triton_takes_empty_batch(transpose):
    x, int_data, scale, _ = _operands((0,), 7, 33, torch.float32, transpose, False)
    y = int8_weight_mm_triton(x, int_data, scale, None, transpose)
    assert y.shape == (0, 33 if transpose else 7)


# Dispatch and errors


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_dispatch_uses_reference_on_cpu(layout):
    transpose, has_bias = layout
    x, int_data, scale, bias = _operands((5,), 7, 33, torch.bfloat16, transpose, has_bias)
    y = int8_weight_mm(x, int_data, scale, bias, transpose)
    assert torch.equal(y, int8_weight_mm_reference(x, int_data, scale, bias, transpose))


_Q = torch.zeros(7, 33, dtype=torch.int8)  # int_data [N=7, K=33]
_S = torch.ones(7)
BAD_INPUTS = [
    pytest.param(dict(x=torch.randn(5, 33).double()), TypeError, "x.dtype=torch.float64", id="x-fp64"),
    pytest.param(dict(int_data=_Q.to(torch.int32)), TypeError, "int_data.dtype=torch.int32", id="int_data-int32"),
    pytest.param(dict(int_data=_Q.float()), TypeError, "int_data.dtype=torch.float32", id="int_data-float"),
    pytest.param(dict(int_data=_Q[0]), ValueError, r"int_data must be 2-D \[N, K\], got \w+ \(33,\)", id="int_data-1d"),
    pytest.param(dict(scale=_S.to(torch.int32)), TypeError, "scale.dtype=torch.int32", id="scale-int"),
    pytest.param(dict(scale=torch.ones(7, 1)), ValueError, r"scale.shape=\(7, 1\), expected \(7,\)", id="scale-shape"),
    pytest.param(dict(x=torch.randn(5, 32)), ValueError, r"x.shape=\(5, 32\) must end in K=33", id="x-shape"),
    pytest.param(
        dict(x=torch.randn(5, 33), transpose=True), ValueError, r"x.shape=\(5, 33\) must end in N=7", id="x-shape-bwd"
    ),
    pytest.param(
        dict(x=torch.randn(5, 7), bias=torch.zeros(7), transpose=True),
        ValueError,
        "bias must be None when transpose=True",
        id="bias-bwd",
    ),
    pytest.param(dict(bias=torch.zeros(33)), ValueError, r"bias.shape=\(33,\), expected \(7,\)", id="bias-shape"),
    pytest.param(dict(bias=torch.zeros(7, dtype=torch.int64)), TypeError, "bias.dtype=torch.int64", id="bias-int"),
    pytest.param(dict(scale=torch.ones(7, device="meta")), ValueError, "must share a device", id="device"),
]


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS.keys())
@pytest.mark.parametrize("kwargs, exc, match", BAD_INPUTS)
def test_bad_input_raises(impl, kwargs, exc, match):
    args = dict(x=torch.randn(5, 33), int_data=_Q, scale=_S, bias=None, transpose=False) | kwargs
    with pytest.raises(exc, match=match):
        impl(**args)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
def test_dense_path_traces_into_aten_ops_under_compile(transpose):
    # Under torch.compile the dense path is plain aten ops (inductor fuses the dequantization; no
    # Python runs per call), with the eager path's result. On CPU the math is fp32 (the reference's).
    x, int_data, scale, _ = _operands((2, 5), 7, 33, torch.bfloat16, transpose, False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(int8_weight_mm_dense, fullgraph=True, backend=backend)
    expected = int8_weight_mm_reference(x, int_data, scale, None, transpose)
    torch.testing.assert_close(compiled(x, int_data, scale, None, transpose), expected, atol=0, rtol=0)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("quantframe" in t for t in targets), targets


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
def test_dense_path_on_fake_tensors_launches_no_kernel(monkeypatch, transpose):
    # torch.compile may run a subclass's F.linear on fake tensors outside dynamo's bytecode tracing
    # (torch 2.11 on CUDA does), where torch.compiler.is_compiling() is False; the dense path must
    # still trace into aten ops there, not launch Triton on tensors without data. CPU tensors are sent
    # down the Triton dispatch to reproduce it.
    import quantframe.kernels.int8_weight_mm as wmm
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(wmm, "use_triton", lambda t: True)
    with FakeTensorMode():
        x = torch.empty(wmm.DENSE_MIN_ROWS, 7 if transpose else 33, dtype=torch.bfloat16)
        y = wmm.int8_weight_mm(x, torch.empty(7, 33, dtype=torch.int8), torch.empty(7), None, transpose)
    assert y.shape == (wmm.DENSE_MIN_ROWS, 33 if transpose else 7) and y.dtype == torch.bfloat16
