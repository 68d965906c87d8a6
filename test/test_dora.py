"""quantframe.nn.dora: DoRALinear vs a naive autograd reference, gradcheck, configs, swaps, merging."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quantframe.affine import AffineQuantizedTensor, int4_weight_only, int8_weight_only
from quantframe.nf4 import NF4Tensor, nf4_weight_only
from quantframe.nn import DoRAConfig, DoRALinear, apply_adapters_, dora, lora, merge_adapters_
from quantframe.tensor import QuantTensor

BASES = {
    "plain": lambda w: w,
    "nf4": lambda w: NF4Tensor.from_float(w, 64, 4),
    "int8": lambda w: AffineQuantizedTensor.from_float(w, bits=8),
    "int4": lambda w: AffineQuantizedTensor.from_float(w, bits=4, group_size=32, symmetric=False),
}


def naive_forward(layer: DoRALinear, x, x_lora=None):
    """The obvious autograd computation; the row norm is detached (DoRA paper sec. 4.3, PEFT)."""
    w = layer.weight.dequantize(torch.float32) if isinstance(layer.weight, QuantTensor) else layer.weight
    w = w.to(layer.lora_A.dtype)
    x_lora = x if x_lora is None else x_lora
    s = layer.scaling
    y = x @ w.T + s * (x_lora @ layer.lora_A.T) @ layer.lora_B.T
    if layer.use_dora:
        norm = torch.linalg.vector_norm(w + s * layer.lora_B @ layer.lora_A, dim=1).detach()
        y = y * (layer.magnitude / norm)
    return y if layer.bias is None else y + layer.bias


def _layer(base="plain", n=48, k=64, rank=4, use_dora=True, dtype=torch.float32, bias=True):
    w = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    layer = DoRALinear(BASES[base](w), b, rank=rank, alpha=8, use_dora=use_dora, dtype=dtype)
    with torch.no_grad():  # move B off zero so every term is exercised
        layer.lora_B.normal_(0, 0.1)
        if use_dora:
            layer.magnitude.mul_(torch.rand(n, dtype=dtype) + 0.5)
    return layer


@pytest.mark.parametrize("base", BASES)
def test_starts_equal_to_base(base):
    w, b = torch.randn(48, 64), torch.randn(48)
    qw = BASES[base](w)
    layer = DoRALinear(qw, b, rank=8, alpha=16)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer.lora_B, torch.zeros(48, 8))
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, qw, b))


@pytest.mark.parametrize("base", ["plain", "nf4"])
def test_bf16_activations_match_the_fp32_reference_at_bf16_precision(base):
    """bf16 x (fp32 adapters, as the layer makes them): within bf16 rounding of the fp32 computation,
    outputs and every gradient (relative to each tensor's scale: sums over K = 256 terms)."""
    layer = _layer(base, n=96, k=256, rank=8)
    x = torch.randn(4, 9, 256)
    g = torch.randn(4, 9, 96)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    xb = x.bfloat16().requires_grad_()
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [xb, *params], g.bfloat16())
    x32 = xb.detach().float().requires_grad_()  # the same bf16 inputs, computed in fp32
    y_ref = naive_forward(layer, x32)
    grads_ref = torch.autograd.grad(y_ref, [x32, *params], g.bfloat16().float())
    for name, got, ref in zip(["y", "x", "A", "B", "m"], [y, *grads], [y_ref, *grads_ref]):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, (name, err.item())


def test_bf16_activations_run_the_two_large_matmuls_in_bf16():
    """x W.T (forward) and dy (cW) (backward) are the only [M, N, K] matmuls, both bf16 (tensor cores
    on a GPU): the LoRA terms ride on the epilogues (dora_lora_scale, addmm_inplace) and dm reads the
    saved base output instead of recomputing x W.T."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
                       torch.ops.quantframe.addmm_inplace.default)  # fmt: skip
            if func in matmuls:
                a, b = args[-2], args[-1]
                self.seen.append((a.dtype, 8 not in (*a.shape, b.shape[1])))  # large: no dim is the rank 8
            return func(*args, **(kwargs or {}))

    layer = _layer("plain", n=96, k=256, rank=8)
    x = torch.randn(36, 256, dtype=torch.bfloat16, requires_grad=True)
    with RecordMatmuls() as rec:
        layer(x).float().square().sum().backward()
    large = [dtype for dtype, is_large in rec.seen if is_large]
    assert large == [torch.bfloat16] * 2, rec.seen


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("base", BASES)
def test_forward_and_grads_match_naive_reference(base, use_dora):
    layer = _layer(base, use_dora=use_dora)
    x = torch.randn(2, 7, 64, requires_grad=True)
    g = torch.randn(2, 7, 48)
    y = layer(x)
    params = [layer.lora_A, layer.lora_B] + ([layer.magnitude] if use_dora else [])
    grads = torch.autograd.grad(y, [x, *params], g)
    y_ref = naive_forward(layer, x)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for name, got, ref in zip(["x", "A", "B", "m"], grads, grads_ref):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_gradcheck_float64(use_dora):
    layer = _layer(n=5, k=7, rank=2, use_dora=use_dora, dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    if use_dora:
        # The norm is a constant for autograd, so A and B are checked against naive_forward
        # (test above); gradcheck covers x and m, whose numerical gradients see no norm change.
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)

        def f(x, m):
            return functional_call(layer, {"magnitude": m}, (x,))

        assert torch.autograd.gradcheck(f, (x, layer.magnitude.detach().clone().requires_grad_()))
    else:

        def f(x, a, b):
            return functional_call(layer, {"lora_A": a, "lora_B": b}, (x,))

        a, b = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B))
        assert torch.autograd.gradcheck(f, (x, a, b))


def test_dropout_applies_to_adapter_branch_only():
    layer = _layer()
    layer.dropout = nn.Dropout(0.5)
    x = torch.randn(6, 64, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    x_lora = layer.dropout(x)
    y_ref = naive_forward(layer, x, x_lora)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("base", ["plain", "nf4"])
def test_base_frozen_and_unchanged_after_step(base):
    layer = _layer(base)
    before = layer.weight.dequantize() if base == "nf4" else layer.weight.clone()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 64)).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    opt.step()
    after = layer.weight.dequantize() if base == "nf4" else layer.weight
    assert torch.equal(before, after)


@pytest.mark.parametrize("config", [dora(rank=4), lora(rank=4)], ids=["dora", "lora"])
def test_training_reduces_loss(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    target = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(128, 32)
    with torch.no_grad():
        y = target(x)
    apply_adapters_(model, DoRAConfig(config.rank, 8, nf4_weight_only(32, 4), config.use_dora))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("base", BASES)
def test_merge_equals_forward_weight(base, use_dora):
    layer = _layer(base, use_dora=use_dora)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, layer.merge(), layer.bias), layer(x), atol=1e-4, rtol=1e-4)


def test_apply_and_merge_adapters_roundtrip(caplog):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64, bias=False))
    x = torch.randn(3, 64)
    with caplog.at_level(logging.INFO, logger="quantframe"):
        apply_adapters_(model, dora(rank=4, base=int4_weight_only(group_size=32)))
    # in_features=48 is not a multiple of group_size=32: left dense and reported
    assert isinstance(model[0], DoRALinear) and isinstance(model[2], nn.Linear) and isinstance(model[4], DoRALinear)
    assert isinstance(model[0].weight, AffineQuantizedTensor)
    assert "adapted 2 linears, skipped 1" in caplog.text and "skipped 2:" in caplog.text
    with torch.no_grad():
        for m in (model[0], model[4]):
            m.lora_B.normal_(0, 0.1)
            m.magnitude.mul_(1.1)
        y = model(x)
        merge_adapters_(model)
        assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
        torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)


def test_apply_adapters_dense_base_and_filter():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    ref = model[1].weight.detach().clone()
    apply_adapters_(model, lora(rank=2, alpha=4), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn == "1")
    assert type(model[0]) is nn.Linear and isinstance(model[1], DoRALinear)
    assert model[1].magnitude is None and model[1].scaling == 2.0
    assert torch.equal(model[1].weight, ref) and not model[1].weight.requires_grad


def test_apply_adapters_skips_tied_weight():
    emb, head = nn.Embedding(10, 16), nn.Linear(16, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    apply_adapters_(model, dora(rank=2, base=int8_weight_only()))
    assert type(model["head"]) is nn.Linear and model["head"].weight is emb.weight


def test_state_dict_holds_base_and_adapters():
    layer = DoRALinear(NF4Tensor.from_float(torch.randn(64, 64), 64, 4), None, rank=4)
    assert sorted(layer.state_dict()) == ["lora_A", "lora_B", "magnitude", "weight"]
    assert isinstance(layer.state_dict()["weight"], NF4Tensor)


@pytest.mark.parametrize("base", ["plain", "nf4"])
def test_compile_fullgraph_matches_eager(base):
    layer = _layer(base)
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, y_c = layer(x), compiled(x)
    torch.testing.assert_close(y_c, y)
    g = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B, layer.magnitude]
    for a, b in zip(torch.autograd.grad(y_c, params, g), torch.autograd.grad(y, params, g)):
        torch.testing.assert_close(a, b)


def test_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"DoRALinear: rank=0 must be a positive int"):
        DoRALinear(w, rank=0)
    with pytest.raises(ValueError, match=r"DoRALinear: rank=9 must be <= min\(out_features, in_features\) = 8"):
        DoRALinear(w, rank=9)
    with pytest.raises(TypeError, match=r"DoRALinear: base_weight must be a floating-point Tensor .*got torch.int8"):
        DoRALinear(w.to(torch.int8), rank=2)
    with pytest.raises(TypeError, match=r"base_weight must be .* got list"):
        DoRALinear([[1.0]], rank=1)
    with pytest.raises(ValueError, match=r"base_weight must be 2-D"):
        DoRALinear(torch.randn(16), rank=1)
    with pytest.raises(ValueError, match=r"bias must be a \[8\] tensor or None, got \(16,\)"):
        DoRALinear(w, torch.randn(16), rank=2)
    with pytest.raises(ValueError, match=r"dora: rank=-1 must be a positive int"):
        dora(rank=-1)
    with pytest.raises(ValueError, match=r"lora: alpha=0 must be a positive finite number"):
        lora(alpha=0)
    with pytest.raises(TypeError, match=r"dora: base must be a QuantConfig or None, got str"):
        dora(base="nf4")
    with pytest.raises(TypeError, match=r"apply_adapters_ expects a DoRAConfig"):
        apply_adapters_(nn.Linear(4, 4), nf4_weight_only())
    with pytest.raises(ValueError, match=r"filter_fn selected 0 \(ReLU\)"):
        apply_adapters_(nn.Sequential(nn.ReLU()), dora(rank=1), filter_fn=lambda m, fqn: fqn == "0")
    with pytest.raises(ValueError, match=r"DoRALinear: input has 3 features, expected 16"):
        DoRALinear(w, rank=2)(torch.randn(2, 3))


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("triton_kernel", [False, True], ids=["reference", "triton"])
def test_fused_forward_matches_the_unfused_layer(use_dora, triton_kernel, monkeypatch, request):
    """``fused_forward``: one GEMM (kernels/dora.dora_linear) for x W.T, the LoRA add and the scale;
    the same outputs and gradients as the unfused layer within bf16 rounding (the fused path rounds
    pre once, the unfused twice). With ``triton_kernel`` the Triton kernel runs under the interpreter."""
    import quantframe.kernels.dora as kernels_dora

    if triton_kernel:  # the layer imports dora_linear at call time
        from quantframe.testing import patch_interpreter_loop_bounds

        monkeypatch.setattr(kernels_dora, "dora_linear", kernels_dora.dora_linear_triton)
        undo = patch_interpreter_loop_bounds()
        if undo is not None:
            request.addfinalizer(undo)
    layer = _layer("plain", n=40, k=64, rank=4, use_dora=use_dora)
    x = torch.randn(2, 7, 64).bfloat16()
    g = torch.randn(2, 7, 40).bfloat16()
    params = [layer.lora_A, layer.lora_B] + ([layer.magnitude] if use_dora else [])
    results = []
    for fused in (False, True):
        layer.fused_forward = fused
        xr = x.clone().requires_grad_()
        y = layer(xr)
        results.append((y, *torch.autograd.grad(y, [xr, *params], g)))
    for name, got, ref in zip(["y", "x", "A", "B", "m"], results[1], results[0]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
        assert err < 1e-2, (name, err.item())
