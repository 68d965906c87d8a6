"""BitNet b1.58: ternary quantizers, STE training weight, packed inference weight, conversion."""

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import quantframe.optim
from quantframe.api import quantize_
from quantframe.primitives import pack_bits, unpack_bits
from quantframe.ternary import (
    BitNetTrainingLinearWeight,
    TernaryWeight,
    bitnet_training,
    convert_bitnet_to_ternary_,
    quantize_activations_int8,
    ternary_quantize,
    ternary_weight_only,
)
from quantframe.testing import QuantTensorContract


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _reference(x, w, bias=None):
    """The module docstring's formulas, written out independently in float64."""
    w, x = w.double(), x.double()
    s = w.abs().mean().clamp(min=1e-5)
    wq = torch.round(w / s).clamp(-1, 1) * s
    a = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = torch.round(x * (127 / a)).clamp(-128, 127) * (a / 127)
    y = xq @ wq.T
    return (y if bias is None else y + bias.double()), xq, wq


# ---- quantizers on hand-worked tensors ---------------------------------------------------------
def test_ternary_quantize_hand_worked():
    w = torch.tensor([[0.5, -1.0, 0.1, 2.4], [-0.2, 0.0, 1.0, -0.2]])
    # mean|W| = (0.5 + 1 + 0.1 + 2.4 + 0.2 + 0 + 1 + 0.2) / 8 = 5.4 / 8 = 0.675
    codes, s = ternary_quantize(w)
    assert s.dtype == torch.float32 and s.dim() == 0
    torch.testing.assert_close(s, torch.tensor(0.675))
    # W / s = [0.74, -1.48, 0.15, 3.56], [-0.30, 0, 1.48, -0.30]
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1, 0, 1], [0, 0, 1, 0]]


def test_activation_quantize_hand_worked():
    # absmax 254: codes = round(x * 0.5), every value exact in binary
    x = torch.tensor([[254.0, -127.0, 0.75, 0.0, -5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_activations_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.tensor([[2.0], [1e-5 / 127]]))
    assert codes.tolist() == [[127, -64, 0, 0, -2], [0, 0, 0, 0, 0]]  # -63.5, 0.375, -2.5: half to even


def test_activation_codes_stay_in_range():
    x = torch.randn(16, 33) * 100
    codes, scale = quantize_activations_int8(x)
    assert codes.abs().max() == 127 and (codes.float() * scale - x).abs().max() <= scale.max() / 2 + 1e-4


# ---- STE ----------------------------------------------------------------------------------------
def test_forward_and_ste_gradients_match_manual():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    bias = torch.randn(6, requires_grad=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    p = nn.Parameter(BitNetTrainingLinearWeight.from_float(w))
    y = F.linear(x, p, bias)
    ref, xq, wq = _reference(x.detach().reshape(-1, 8), w, bias.detach())
    torch.testing.assert_close(y.reshape(-1, 6).double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    g2 = g.reshape(-1, 6).double()
    torch.testing.assert_close(x.grad.reshape(-1, 8).double(), g2 @ wq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.grad.double(), g2.T @ xq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad.double(), g2.sum(0), atol=1e-5, rtol=1e-5)
    assert type(p.grad) is torch.Tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tensor_core_path_matches_the_fp32_path(monkeypatch, dtype):
    # Where Triton runs (CUDA) the forward is the INT8 GEMM (per-token codes x ternary codes, scales in
    # the epilogue) and the backward runs in x's dtype; reproduced on CPU under the interpreter by
    # sending CPU tensors down that dispatch. The forward's integer sums are exact: it differs from
    # the fp32 path by rounding only; the backward by x's dtype.
    import quantframe.ternary as T
    from quantframe.testing import patch_interpreter_loop_bounds

    undo = patch_interpreter_loop_bounds()
    try:
        torch.manual_seed(0)
        w, bias = torch.randn(48, 64), torch.randn(48)
        x = torch.randn(2, 5, 64).to(dtype)
        g = torch.randn(2, 5, 48).to(dtype)
        out = {}
        for fast in (False, True):
            monkeypatch.setattr(T, "use_triton", lambda t, fast=fast: fast)
            p = nn.Parameter(BitNetTrainingLinearWeight.from_float(w).to(dtype))
            b = nn.Parameter(bias.to(dtype))
            xi = x.clone().requires_grad_()
            y = F.linear(xi, p, b)
            y.backward(g)
            out[fast] = (y, xi.grad, p.grad, b.grad)
    finally:
        if undo is not None:
            undo()
    # bf16: both round to bf16 (<= 2**-8 relative each) and the fast backward also rounds W and xq
    bound = 1e-5 if dtype == torch.float32 else 4e-3
    for name, slow, fast in zip(("y", "grad x", "grad w", "grad bias"), out[False], out[True]):
        assert fast.dtype == slow.dtype == dtype, name
        err = ((fast.double() - slow.double()).norm() / slow.double().norm()).item()
        assert err < bound, (name, err)


def test_bf16_outer_dtype_grads():
    w = BitNetTrainingLinearWeight.from_float(torch.randn(4, 8)).to(torch.bfloat16)
    assert w.float_data.dtype == torch.float32
    p = nn.Parameter(w)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    y = F.linear(x, p)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == p.grad.dtype == torch.bfloat16


# ---- contracts ----------------------------------------------------------------------------------
class TestBitNetContract(QuantTensorContract):
    sqnr_floor = 1000.0  # dequantize() is the float master weight: exact

    def make(self, w):
        return BitNetTrainingLinearWeight.from_float(w)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_linear_matches_dequantized(self, dtype):
        # Overrides the float check: the forward is ternary x INT8, compared with its formulas.
        q = self.make(self.weight(dtype))
        x = torch.randn(3, 5, self.shape[1], dtype=dtype)
        ref, _, _ = _reference(x.reshape(-1, self.shape[1]), q.float_data)
        y = F.linear(x, q)
        assert y.dtype == dtype and _rel(y.reshape(-1, self.shape[0]), ref) < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]


class TestTernaryContract(QuantTensorContract):
    sqnr_floor = 5.0  # 1.58 bits on Gaussian weights: ~5.5 dB

    def make(self, w):
        return TernaryWeight.from_float(w)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_linear_matches_dequantized(self, dtype):
        # Activations are quantized to INT8 per token: the error is INT8's, not the weight's.
        q = self.make(self.weight(dtype))
        x = torch.randn(3, 5, self.shape[1], dtype=dtype)
        ref = F.linear(x.float(), q.dequantize(torch.float32))
        y = F.linear(x, q)
        assert y.dtype == dtype and _rel(y, ref) < 2e-2


# ---- optimizer and views of the training weight ----------------------------------------------
def test_mlp_trains_with_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    quantize_(model, bitnet_training())
    assert isinstance(model[0].weight, BitNetTrainingLinearWeight) and model[0].weight.requires_grad
    x = torch.randn(128, 16)
    y = x[:, :4] * 2 - x[:, 4:8]
    opt = quantframe.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert isinstance(model[0].weight, BitNetTrainingLinearWeight)
    assert losses[-1] < 0.5 * losses[0]


def test_torch_optimizer_inplace_and_foreach_update_master():
    for foreach in (False, True):
        p = nn.Parameter(BitNetTrainingLinearWeight.from_float(torch.ones(4, 8)))
        before = p.float_data.clone()
        p.grad = torch.ones(4, 8)
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0, foreach=foreach)
        opt.step()
        assert isinstance(p, nn.Parameter) and isinstance(p, BitNetTrainingLinearWeight)
        torch.testing.assert_close(p.float_data, before - 0.1)


def test_training_weight_views_and_copy():
    w = BitNetTrainingLinearWeight.from_float(torch.randn(4, 6))
    flat = w.view(-1)
    assert type(flat) is BitNetTrainingLinearWeight and flat.shape == (24,)
    odd = torch.as_strided(w, (5,), (1,), 7)  # any window of the flat data
    torch.testing.assert_close(odd.dequantize(), w.float_data.view(-1)[7:12])
    parts = w.split(2)
    assert [p.shape for p in parts] == [(2, 6), (2, 6)]
    w[1:3].copy_(torch.zeros(2, 6))
    assert not w.float_data[1:3].any()
    z = torch.zeros_like(w)
    assert type(z) is torch.Tensor and z.shape == w.shape
    assert type(w * 2) is torch.Tensor


# ---- packed inference weight -----------------------------------------------------------------
@pytest.mark.parametrize("k", [8, 10, 13])
def test_pack_unpack_exact(k):
    codes = torch.randint(-1, 2, (5, k), dtype=torch.int8)
    codes[0, 0] = -1
    q = TernaryWeight._from_codes(codes, torch.tensor(0.3), torch.float32)
    assert q.packed.shape == (5, -(-k // 4)) and q.packed.dtype == torch.uint8
    assert torch.equal(q.codes(), codes)
    u = (codes[:, :8] + 1).to(torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(u, 2), 2), u)
    assert q.nbytes_packed == 5 * -(-k // 4) + 4


def test_conversion_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7))
    quantize_(model, bitnet_training())
    opt = quantframe.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(9, 12)
    for _ in range(3):  # trained weights, not just initialized ones
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    codes = [m.weight.ternary() for m in (model[0], model[2])]
    with torch.no_grad():
        before = model(x)
    convert_bitnet_to_ternary_(model)
    for m, (c, s) in zip((model[0], model[2]), codes):
        assert isinstance(m.weight, TernaryWeight) and not m.weight.requires_grad
        assert torch.equal(m.weight.codes(), c) and torch.equal(m.weight.scale, s)
    assert torch.equal(model(x), before)


def test_ternary_weight_only_is_frozen():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, ternary_weight_only())
    assert isinstance(model[0].weight, TernaryWeight) and not model[0].weight.requires_grad
    x = torch.randn(2, 8, requires_grad=True)
    model(x).sum().backward()  # STE gradient still reaches the input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_compile_fullgraph_both_match_eager():
    torch._dynamo.reset()
    w = torch.randn(16, 24)
    x = torch.randn(5, 24)
    f = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
    for q in (BitNetTrainingLinearWeight.from_float(w), TernaryWeight.from_float(w)):
        torch.testing.assert_close(f(x, q), F.linear(x, q), atol=1e-5, rtol=1e-5)


# ---- bad inputs -------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError, match=r"all zeros \(absmean 0\).*initialize the weight"):
        ternary_quantize(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"all zeros"):
        quantize_(nn.Sequential(nn.Linear(4, 4).requires_grad_(False).apply(lambda m: m.weight.zero_())),
                  bitnet_training())  # fmt: skip
    with pytest.raises(TypeError, match=r"weight must be floating point"):
        ternary_quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"input must be a float tensor, got torch.int64"):
        quantize_activations_int8(torch.ones(2, 2, dtype=torch.long))
    for q in (BitNetTrainingLinearWeight.from_float(torch.randn(4, 8)), TernaryWeight.from_float(torch.randn(4, 8))):
        name = type(q).__name__
        with pytest.raises(TypeError, match=rf"F.linear: input to a {name} must be a plain float32/float16/bfloat16 tensor, got Tensor torch.int64"):
            F.linear(torch.ones(2, 8, dtype=torch.long), q)
        with pytest.raises(ValueError, match=r"input has 7 features, weight expects 8"):
            F.linear(torch.randn(2, 7), q)
    t = TernaryWeight.from_float(torch.randn(4, 8))
    with pytest.raises(NotImplementedError, match=r"TernaryWeight: view must select whole rows of 8 elements"):
        t.view(-1)
    with pytest.raises(TypeError, match=r"expected a BitNetTrainingLinearWeight, got Tensor"):
        TernaryWeight.from_bitnet(torch.randn(4, 8))


# ---- snapshots -----------------------------------------------------------------------------------
def test_repr_snapshots():
    torch.manual_seed(0)
    w = torch.randn(4, 10)
    assert_expected_inline(repr(BitNetTrainingLinearWeight.from_float(w)), """BitNetTrainingLinearWeight(shape=[4, 10], dtype=torch.float32, device=cpu, float_data=torch.float32[4, 10])""")
    assert_expected_inline(repr(TernaryWeight.from_float(w)), """TernaryWeight(shape=[4, 10], dtype=torch.float32, device=cpu, packed=torch.uint8[4, 3], scale=torch.float32[])""")


def test_op_table_snapshots():
    assert_expected_inline("\n".join(BitNetTrainingLinearWeight.supported_ops()), """\
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
    assert_expected_inline("\n".join(TernaryWeight.supported_ops()), """\
aten._pin_memory.default
aten._to_copy.default
aten._unsafe_view.default
aten.abs.default
aten.add.Tensor
aten.alias.default
aten.as_strided.default
aten.clone.default
aten.copy_.default
aten.detach.default
aten.div.Scalar
aten.div.Tensor
aten.empty_like.default
aten.is_pinned.default
aten.maximum.default
aten.mul.Scalar
aten.mul.Tensor
aten.neg.default
aten.ones_like.default
aten.reshape.default
aten.sign.default
aten.slice.Tensor
aten.split.Tensor
aten.sqrt.default
aten.sub.Tensor
aten.view.default
aten.zeros_like.default
torch._C._nn.linear
torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")
