"""quantframe.kernels.dora: reference vs hand-worked values; Triton column norm vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import torch
from quantframe.kernels.dora import (
    addmm_inplace,
    dora_column_norm,
    dora_column_norm_reference,
    dora_column_norm_triton,
    dora_lora_scale,
    dora_lora_scale_reference,
    dora_lora_scale_triton,
    dora_row_scale,
    dora_row_scale_reference,
    dora_row_scale_triton,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # fp32 math either way
SHAPES = [(1, 1, 1), (7, 33, 3), (33, 7, 5), (16, 64, 16), (40, 63, 64)]  # (N, K, r)


def _case_list():
    for n, k, r in SHAPES:
        for name, dtype in DTYPES.items():
            yield pytest.param(n, k, r, dtype, id=f"N{n}-K{k}-R{r}-{name}")


def _inputs(n, k, r, dtype):
    w, a, b = torch.randn(n, k).to(dtype), torch.randn(r, k).to(dtype), torch.randn(n, r).to(dtype)
    return w, a, b, (torch.rand(n) + 0.5).to(dtype)


def test_reference_hand_worked():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    a, b = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0], [0.0]])  # s*B@A = [[0, 4], [0, 0]] for s=2
    norm, scale = dora_column_norm_reference(w, a, b, torch.tensor([10.0, 3.0]), 2.0)
    assert torch.equal(norm, torch.tensor([5.0, 1.0]))
    assert torch.equal(scale, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("n, k, r, dtype", list(_case_list()))
def test_triton_matches_reference(n, k, r, dtype):
    args = _inputs(n, k, r, dtype)
    norm, scale = dora_column_norm_triton(*args, 0.5)
    norm_ref, scale_ref = dora_column_norm_reference(*args, 0.5)
    assert norm.dtype == scale.dtype == torch.float32
    torch.testing.assert_close(norm, norm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale, scale_ref, atol=1e-5, rtol=1e-5)


def test_dispatch_uses_reference_on_cpu():
    args = _inputs(5, 8, 2, torch.float32)
    for got, ref in zip(dora_column_norm(*args, 1.0), dora_column_norm_reference(*args, 1.0)):
        assert torch.equal(got, ref)


def test_errors():
    w, a, b, m = _inputs(4, 8, 2, torch.float32)
    with pytest.raises(ValueError, match=r"dora_column_norm: shapes do not agree"):
        dora_column_norm_reference(w, a, b[:3], m, 1.0)
    with pytest.raises(ValueError, match=r"dora_column_norm_triton: rank=65 must be <= 64"):
        dora_column_norm_triton(torch.randn(70, 70), torch.randn(65, 70), torch.randn(70, 65), torch.ones(70), 1.0)
    with pytest.raises(TypeError, match=r"dora_column_norm: w.dtype=torch.int8"):
        dora_column_norm_reference(w.to(torch.int8), a, b, m, 1.0)


def test_doralinear_through_triton_matches_reference(monkeypatch):
    from quantframe.kernels import dora as dora_kernels

    from quantframe.nn import DoRALinear

    layer = DoRALinear(torch.randn(33, 40), torch.randn(33), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 40, requires_grad=True)
    y_ref = layer(x)
    g_ref = torch.autograd.grad(y_ref, [x, layer.lora_A, layer.lora_B, layer.magnitude], torch.ones_like(y_ref))
    monkeypatch.setattr(dora_kernels, "use_triton", lambda t: True)  # the interpreter stands in for CUDA
    y = layer(x)
    g = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B, layer.magnitude], torch.ones_like(y))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, ref in zip(g, g_ref):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- the backward's row-scaled weight: c W ----------------------------------------------------
@pytest.mark.parametrize("w_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_row_scale_triton_matches_reference(w_dtype, out_dtype):
    w, scale = (torch.randn(37, 300) * 5).to(w_dtype), torch.rand(37) + 0.5  # off the 16 x 256 tile
    y, ref = dora_row_scale_triton(w, scale, out_dtype), dora_row_scale_reference(w, scale, out_dtype)
    assert y.dtype == out_dtype and y.shape == (37, 300)
    torch.testing.assert_close(ref.double(), w.double() * scale.double()[:, None], atol=0, rtol=2**-7)
    if out_dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)
        torch.testing.assert_close(y.float(), ref.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(y, ref)  # the same fp32 multiply, one rounding
    assert torch.equal(dora_row_scale(w, scale, out_dtype), ref)  # CPU: the reference


def test_row_scale_rejects_bad_input():
    with pytest.raises(ValueError, match=r"dora_row_scale: expected w \[N, K\], scale \[N\], got shapes \(3, 4\), \(4,\)"):  # noqa: E501
        dora_row_scale_triton(torch.randn(3, 4), torch.ones(4), torch.float32)
    with pytest.raises(TypeError, match="dora_row_scale_triton: w.dtype=torch.float64"):
        dora_row_scale_triton(torch.randn(3, 4, dtype=torch.float64), torch.ones(3), torch.float64)
    y = dora_row_scale(torch.ones(2, 3, dtype=torch.float64), torch.tensor([2.0, 3.0]), torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y[:, 0], torch.tensor([2.0, 3.0], dtype=torch.float64))


# ---- the unfused forward's epilogue: y = (base + xa @ (sB).T) * scale + bias ---------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m, n, r", [(1, 1, 1), (70, 130, 3), (65, 257, 16), (5, 40, 64)])
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_lora_scale_triton_matches_reference(dtype, m, n, r, has_bias):
    base, xa, lb = torch.randn(m, n).to(dtype), torch.randn(m, r).to(dtype), torch.randn(n, r).to(dtype)
    scale, bias = torch.rand(n) + 0.5, (torch.randn(n).to(dtype) if has_bias else None)
    y = dora_lora_scale_triton(base, xa, lb, scale, bias, dtype)
    ref = dora_lora_scale_reference(base, xa, lb, scale, bias, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    exact = (base.double() + xa.double() @ lb.double().T) * scale.double() + (0 if bias is None else bias.double())
    torch.testing.assert_close(ref.double(), exact, atol=1e-5, rtol=2**-7)
    # fp32 sums in another order; the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-5, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(dora_lora_scale(base, xa, lb, scale, bias, dtype), ref)  # CPU: the reference


def test_lora_scale_rejects_bad_input():
    base, xa, lb, scale = torch.randn(4, 6), torch.randn(4, 2), torch.randn(6, 2), torch.ones(6)
    with pytest.raises(ValueError, match=r"dora_lora_scale: expected base \[M, N\], xa \[M, r\]"):
        dora_lora_scale_triton(base, xa, torch.randn(5, 2), scale, None, torch.float32)
    with pytest.raises(ValueError, match=r"dora_lora_scale: bias.shape=\(5,\), expected \(6,\)"):
        dora_lora_scale_reference(base, xa, lb, scale, torch.ones(5), torch.float32)
    with pytest.raises(ValueError, match=r"dora_lora_scale_triton: rank 65 \(lora_b.shape\[1\]\) must be in \[1, 64\]"):  # noqa: E501
        dora_lora_scale_triton(base, torch.randn(4, 65), torch.randn(6, 65), scale, None, torch.float32)
    with pytest.raises(TypeError, match=r"dora_lora_scale_triton: base, xa, lora_b are torch.float32, torch.bfloat16"):
        dora_lora_scale_triton(base, xa.bfloat16(), lb, scale, None, torch.float32)
    y = dora_lora_scale(base.double(), xa.double(), lb.double(), scale, None, torch.float64)  # fp64: the reference
    assert y.dtype == torch.float64


# ---- out += a @ b in place ---------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_addmm_inplace_adds_in_place(compiled):
    out, a, b = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    expected = out + a @ b

    def fn(a, b):
        c = a @ b.T.T.contiguous() * 0 + out  # a fresh addend, as in DoRA's backward
        return addmm_inplace(c, a, b)

    run = torch.compile(fn, fullgraph=True) if compiled else fn
    torch.testing.assert_close(run(a, b), expected)
    c = out.clone()
    assert addmm_inplace(c, a, b) is c and torch.allclose(c, expected)
