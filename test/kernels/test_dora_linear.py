"""quantframe.kernels.dora.dora_linear: the DoRA forward GEMM with the LoRA add and the scale in its
epilogue (Triton under TRITON_INTERPRET=1, test/conftest.py) against its reference; bad input raises."""

import pytest
import torch

from quantframe.kernels.dora import dora_linear, dora_linear_reference, dora_linear_triton

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _args(m, n, k, r, dtype, scale=True, bias=True, device="cpu"):
    torch.manual_seed(m + n + k + r)
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    xa = torch.randn(m, r, device=device).to(dtype)
    lora_b = (torch.randn(n, r, device=device) * 0.1).to(dtype)
    s = torch.rand(n, device=device) + 0.5 if scale else None
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, xa, lora_b, s, b


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m, n, k, r", [(5, 40, 70, 8), (33, 17, 64, 16), (1, 64, 32, 64), (40, 33, 50, 1)])
def test_triton_matches_reference(m, n, k, r, dtype):
    args = _args(m, n, k, r, dtype)
    y, pre = dora_linear_triton(*args, out_dtype=dtype)
    y_ref, pre_ref = dora_linear_reference(*args, out_dtype=dtype)
    assert y.dtype == dtype and pre.dtype == dtype and y.shape == pre.shape == (m, n)
    # both sum in fp32 in another order and round once: one ulp of x's dtype apart at most
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(pre, pre_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("scale, bias", [(False, False), (True, False), (False, True)])
def test_without_scale_or_bias(scale, bias):
    args = _args(9, 24, 32, 4, torch.float32, scale, bias)
    y, pre = dora_linear_triton(*args, out_dtype=torch.float32)
    y_ref, pre_ref = dora_linear_reference(*args, out_dtype=torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if not scale and not bias:
        assert torch.equal(y, pre)  # plain LoRA without bias: y is pre


def test_reference_is_the_unfused_forward():
    x, w, xa, lora_b, s, b = _args(6, 12, 20, 4, torch.float32)
    y, pre = dora_linear_reference(x, w, xa, lora_b, s, b, torch.float32)
    torch.testing.assert_close(pre, x @ w.T + xa @ lora_b.T)
    torch.testing.assert_close(y, pre * s + b)


def test_output_dtype_and_empty_batch():
    args = _args(4, 8, 16, 2, torch.bfloat16)
    y, pre = dora_linear_triton(*args, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and pre.dtype == torch.bfloat16
    x, w, xa, lora_b, s, b = _args(4, 8, 16, 2, torch.float32)
    y, pre = dora_linear_triton(x[:0], w, xa[:0], lora_b, s, b, out_dtype=torch.float32)
    assert y.shape == pre.shape == (0, 8)


def test_dispatch_uses_the_reference_on_cpu(monkeypatch):
    import quantframe.kernels.dora as mod

    monkeypatch.setattr(mod, "dora_linear_triton", lambda *a: pytest.fail("Triton on a CPU tensor"))
    args = _args(3, 8, 16, 2, torch.float32)
    y, _ = dora_linear(*args, out_dtype=torch.float32)
    torch.testing.assert_close(y, dora_linear_reference(*args, out_dtype=torch.float32)[0])


def _bad(**change):
    x, w, xa, lora_b, s, b = _args(4, 8, 16, 2, torch.float32)
    args = dict(x=x, w=w, xa=xa, lora_b=lora_b, scale=s, bias=b, out_dtype=torch.float32)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (_bad(x=torch.randn(4, 8, 16)), ValueError, "expected x"),
        (_bad(w=torch.randn(8, 15)), ValueError, "do not agree"),
        (_bad(xa=torch.randn(4, 65), lora_b=torch.randn(8, 65)), ValueError, "rank 65"),
        (_bad(scale=torch.ones(7)), ValueError, "scale.shape"),
        (_bad(bias=torch.ones(9)), ValueError, "bias.shape"),
        (_bad(w=torch.randn(8, 16, dtype=torch.float64)), TypeError, "w.dtype"),
        (_bad(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, "x.dtype"),
    ],
    ids=["3d-x", "k-mismatch", "rank-65", "scale", "bias", "w-fp64", "int-x"],
)
@pytest.mark.parametrize("impl", [dora_linear_reference, dora_linear_triton], ids=["ref", "triton"])
def test_bad_input_raises(impl, args, exc, match):
    with pytest.raises(exc, match=match):
        impl(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 16, 64])
def test_triton_matches_reference_on_cuda(r):
    args = _args(1024, 4096, 4096, r, torch.bfloat16, device="cuda")
    y, pre = dora_linear(*args, out_dtype=torch.bfloat16)
    y_ref, pre_ref = dora_linear_reference(*args, out_dtype=torch.bfloat16)
    torch.testing.assert_close(pre, pre_ref, rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1.6e-2)
    compiled = torch.compile(dora_linear, fullgraph=True)
    torch.testing.assert_close(compiled(*args, out_dtype=torch.bfloat16)[0], y_ref, rtol=1.6e-2, atol=1.6e-2)
