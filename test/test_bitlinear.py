"""quantframe.nn.bitlinear: BitLinear vs hand-written BitNet math and vs BitNetTrainingLinearWeight;
FusedBitLinear vs BitLinear (forward, every gradient, AdamW training, compile)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantframe import bitnet_training, quantize_
from quantframe.nn import BitLinear, FusedBitLinear
from quantframe.optim import AdamW
from quantframe.ternary import quantize_activations_int8, ternary_quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Fused vs unfused: fp32 agrees up to rare one-code flips (norm sums in another order); bf16 also
# rounds xq to bf16 between the norm and the matmul in the fused layer.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2)}


def _pair(dtype, bias=True, k=32, n=24):
    torch.manual_seed(0)
    ref = BitLinear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        ref.norm_weight.uniform_(0.5, 1.5)
    fused = FusedBitLinear(k, n, bias=bias, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_bitlinear_matches_hand_written_bitnet_math():
    layer, _ = _pair(torch.float32)
    x = torch.randn(2, 5, 32)
    n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * layer.norm_weight
    codes, scale = quantize_activations_int8(n.reshape(-1, 32))
    wt, s = ternary_quantize(layer.weight)
    y = (codes.float() * scale) @ (wt.float() * s).T + layer.bias
    torch.testing.assert_close(layer(x), y.reshape(2, 5, 24), atol=1e-6, rtol=1e-6)


def test_bitlinear_equals_bitnet_training_linear_on_the_normed_input():
    layer, _ = _pair(torch.float32)
    qat = nn.Linear(32, 24)
    with torch.no_grad():
        qat.weight.copy_(layer.weight), qat.bias.copy_(layer.bias)
    quantize_(qat, bitnet_training())
    x = torch.randn(7, 32, requires_grad=True)
    y = layer(x)
    n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * layer.norm_weight
    y_qat = qat(n)
    torch.testing.assert_close(y, y_qat, atol=0, rtol=0)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_qat * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, qat.weight.grad, atol=0, rtol=0)
    torch.testing.assert_close(layer.bias.grad, qat.bias.grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_matches_unfused_forward_and_gradients(dtype, bias):
    ref, fused = _pair(dtype, bias)
    x = torch.randn(2, 5, 32).to(dtype).requires_grad_()
    y, y_fused = ref(x), fused(x)
    assert y_fused.dtype == dtype and y_fused.shape == (2, 5, 24)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y_fused, y, atol=atol, rtol=rtol)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y.float() * g.float()).sum(), [x, *ref.parameters()])
    grads_fused = torch.autograd.grad((y_fused.float() * g.float()).sum(), [x, *fused.parameters()])
    names = ["x"] + [name for name, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads_fused, grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_fused_and_unfused_train_alike_with_quantframe_adamw():
    torch.manual_seed(0)
    x, target = torch.randn(64, 32), torch.randn(64, 24)
    losses = {}
    for cls in (BitLinear, FusedBitLinear):
        torch.manual_seed(1)
        layer = cls(32, 24, bias=True)
        opt = AdamW(layer.parameters(), lr=1e-2)
        losses[cls] = []
        for _ in range(30):
            loss = F.mse_loss(layer(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[cls].append(loss.item())
    ref, fused = losses[BitLinear], losses[FusedBitLinear]
    assert ref[-1] < 0.9 * ref[0] and fused[-1] < 0.9 * fused[0]
    assert abs(fused[-1] - ref[-1]) <= 0.02 * ref[-1]


def test_fused_compiles_fullgraph_with_gradients():
    _, fused = _pair(torch.float32)
    x = torch.randn(3, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, fused(x), atol=0, rtol=0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(fused(x).sum(), x)[0], atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_bad_input_and_eps_raise():
    layer = BitLinear(32, 24)
    with pytest.raises(ValueError, match=r"BitLinear: input must be a float \[..., 32\] tensor"):
        layer(torch.randn(3, 31))
    with pytest.raises(ValueError, match=r"FusedBitLinear: input must be a float \[..., 32\] tensor, got torch.int64"):
        FusedBitLinear(32, 24)(torch.ones(3, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="eps=0 must be positive"):
        BitLinear(32, 24, eps=0)
    assert "eps=1e-06" in repr(layer) and layer.bias is None
