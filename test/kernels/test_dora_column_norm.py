"""quantframe.kernels.dora: reference vs hand-worked values; Triton column norm vs reference.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU tensors (set in test/conftest.py).
"""

import pytest
import torch
from quantframe.kernels.dora import (
    dora_column_norm,
    dora_column_norm_reference,
    dora_column_norm_triton,
    dora_scale_bias,
    dora_scale_bias_reference,
    dora_scale_bias_triton,
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


# ---- the output epilogue: y = pre * scale + bias ----------------------------------------------
@pytest.mark.parametrize("pre_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                  (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("has_bias", [False, True], ids=["", "bias"])
def test_scale_bias_triton_matches_reference(pre_dtype, out_dtype, has_bias):
    pre = (torch.randn(37, 300) * 5).to(pre_dtype)  # M, N off the 16 x 256 tile
    scale, bias = torch.rand(300) + 0.5, (torch.randn(300).to(pre_dtype) if has_bias else None)
    y = dora_scale_bias_triton(pre, scale, bias, out_dtype)
    ref = dora_scale_bias_reference(pre, scale, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (37, 300)
    if out_dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest)
        torch.testing.assert_close(y.float(), ref.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(y, ref)  # the same fp32 multiply-add, one rounding
    assert torch.equal(dora_scale_bias(pre, scale, bias, out_dtype), ref)  # CPU: the reference


def test_scale_bias_reference_keeps_fp64_and_rejects_bad_shapes():
    pre = torch.randn(3, 4, dtype=torch.float64)
    y = dora_scale_bias(pre, torch.ones(4, dtype=torch.float64) * 2, None, torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, pre * 2)
    with pytest.raises(ValueError, match=r"expected pre \[M, N\], scale \[N\], bias \[N\] or None"):
        dora_scale_bias_triton(torch.randn(3, 4), torch.ones(5), None, torch.float32)
    with pytest.raises(TypeError, match="pre.dtype=torch.float64"):
        dora_scale_bias_triton(pre, torch.ones(4), None, torch.float64)
