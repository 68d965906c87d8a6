"""NF4Tensor: levels, packing, double quantization, linear, views, quantize_ (reference paths, CPU)."""

import io

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

from quantframe.api import quantize_
from quantframe.nf4 import NF4_LEVELS, NF4Tensor, NF4WeightOnlyConfig, nf4_weight_only
from quantframe.testing import QuantTensorContract

LUT = torch.tensor(NF4_LEVELS)


def _slow_nf4(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Obvious reference: per block absmax, nearest level by argmin; codes [numel], absmax [n_blocks]."""
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(1)
    codes = (blocks / absmax[:, None]).reshape(-1, 1).sub(LUT).abs().argmin(1)
    return codes, absmax


def _unpack(q: NF4Tensor) -> torch.Tensor:
    c = q.codes.reshape(-1).long()
    return torch.stack([c >> 4, c & 15], -1).reshape(-1)


# ---- the format --------------------------------------------------------------------------------
def test_levels_are_the_qlora_normalfloat4_values():
    # QLoRA appendix E, and rebuilt here from its recipe: 8 positive / 7 negative quantiles of
    # N(0, 1) at offset 0.9677083, plus an exact zero, normalized to [-1, 1].
    assert LUT[0] == -1 and LUT[7] == 0 and LUT[15] == 1
    assert torch.all(LUT[1:] > LUT[:-1])
    assert LUT[1].item() == pytest.approx(-0.6961928, abs=1e-7)
    assert LUT[8].item() == pytest.approx(0.0795803, abs=1e-7)
    assert LUT[14].item() == pytest.approx(0.7229568, abs=1e-7)
    ndtri, off = torch.special.ndtri, 0.9677083
    pos = ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(levels / levels.abs().max(), LUT.double(), atol=1e-6, rtol=0)


def test_exact_nf4_tensor_round_trips_exactly_and_packs_high_nibble_first():
    # Every block of 16 holds each level once, times 2: absmax 2 in every block, so the double
    # quantization of the block scales is exact too.
    codes = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(64)])
    w = (LUT[codes] * 2).reshape(16, 64)
    q = NF4Tensor.from_float(w, block_size=16, scaler_block_size=16)
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(_unpack(q), codes.reshape(-1))
    flat = codes.reshape(-1)
    assert q.codes.reshape(-1)[0].item() == (flat[0].item() << 4) | flat[1].item()
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (16, 32)


def test_codes_are_the_nearest_level_of_the_block_normalized_weight():
    torch.manual_seed(0)
    w = torch.randn(128, 128)
    q = NF4Tensor.from_float(w)
    codes, absmax = _slow_nf4(w, 64)
    assert torch.equal(_unpack(q), codes)
    torch.testing.assert_close(q.block_scales(), absmax, atol=q.scaler_scale.max().item(), rtol=0)  # one int8 step


def test_double_quantization_error_is_half_an_int8_step_except_the_clamped_max():
    torch.manual_seed(1)
    w = torch.randn(512, 64) * torch.rand(512, 1) * 3  # block scales spread over [0, ~10]
    q = NF4Tensor.from_float(w)
    absmax = w.reshape(-1, 64).abs().amax(1)
    assert q.quantized_scalers.dtype == torch.int8 and q.quantized_scalers.shape == (512,)
    assert q.scaler_scale.shape == (2,) and q.scaler_mean.shape == ()
    step = q.scaler_scale.repeat_interleave(256)
    err = (q.block_scales() - absmax).abs()
    # round to nearest: half a step; the largest centered scale of a scaler block maps to 128,
    # which int8 clamps to 127 (torchao does the same): one step, at most once per scaler block.
    assert (err <= step * 1.0001 + 1e-6).all()
    assert int((err > step * 0.5001 + 1e-6).sum()) <= 2
    assert (q.block_scales() - absmax).abs().max() / absmax.max() < 1e-2


def test_all_zero_weight_dequantizes_to_zero():
    q = NF4Tensor.from_float(torch.zeros(256, 64))
    assert torch.equal(q.dequantize(), torch.zeros(256, 64))


# ---- input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "w, kwargs, err, msg",
    [
        ([[1.0]], {}, TypeError, "expected a torch.Tensor weight, got list"),
        (torch.ones(256, 64, dtype=torch.int32), {}, TypeError, "must be floating point"),
        (torch.ones(16384), {}, ValueError, r"must be 2-D \[out_features, in_features\]"),
        (torch.full((256, 64), float("nan")), {}, ValueError, "NaN or Inf"),
        (torch.ones(2, 7), {"block_size": 2, "scaler_block_size": 1}, ValueError, "in_features=7 must be even"),
        (torch.ones(4, 96), {}, ValueError, r"in_features=96 must be a multiple of block_size=64"),
        (torch.ones(32, 64), {}, ValueError, r"numel=2048 .* block_size\*scaler_block_size=64\*256=16384"),
        (torch.ones(256, 64), {"block_size": 3}, ValueError, "block_size=3 must be even"),
        (torch.ones(256, 64), {"scaler_block_size": 0}, ValueError, "scaler_block_size=0 must be a positive int"),
    ],
    ids=["list", "int", "1d", "nan", "odd-K", "K-not-blocks", "numel", "odd-block", "zero-scaler-block"],
)
def test_from_float_rejects_bad_weights(w, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        NF4Tensor.from_float(w, **kwargs)


def test_config_validates_and_has_qlora_defaults():
    assert nf4_weight_only() == NF4WeightOnlyConfig(64, 256)
    with pytest.raises(ValueError, match="nf4_weight_only: block_size=0 must be a positive int"):
        nf4_weight_only(block_size=0)


# ---- the shared contract ------------------------------------------------------------------------
class TestNF4Contract(QuantTensorContract):
    sqnr_floor = 19.0  # 4-bit NormalFloat on Gaussian weights: ~20.7 dB
    shape = (256, 64)  # numel 16384 = one block_size*scaler_block_size unit

    def make(self, w):
        return NF4Tensor.from_float(w)


# ---- linear: a frozen base ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_input_gradient_matches_dense_with_dequantized_weight(dtype, bias):
    torch.manual_seed(0)
    q = NF4Tensor.from_float(torch.randn(256, 64, dtype=dtype))
    b = torch.randn(256, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    g = torch.randn(2, 3, 256, dtype=dtype)
    F.linear(x, q, b).backward(g)
    ref = F.linear(x_ref.float(), q.dequantize(torch.float32), b_ref.float() if bias else None)  # fp32 math
    ref.to(dtype).backward(g)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, atol=tol, rtol=tol)


def test_compiled_linear_input_gradient_matches_eager():
    torch._dynamo.reset()
    q = NF4Tensor.from_float(torch.randn(256, 64))
    x = torch.randn(4, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    compiled = torch.compile(lambda x, w: F.linear(x, w).square().sum(), fullgraph=True)
    compiled(x, q).backward()
    F.linear(x_ref, q).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_empty_row_slice_dequantizes_to_empty():
    q = NF4Tensor.from_float(torch.randn(256, 64))
    assert q[5:5].dequantize().shape == (0, 64)


def test_linear_refuses_a_weight_that_requires_grad():
    w = nn.Parameter(NF4Tensor.from_float(torch.randn(256, 64)), requires_grad=True)
    with pytest.raises(RuntimeError, match="NF4Tensor weight is a frozen base .* requires_grad=True"):
        F.linear(torch.randn(2, 64), w)
    with torch.no_grad():  # inference is fine
        F.linear(torch.randn(2, 64), w)


def test_linear_rejects_wrong_in_features():
    with pytest.raises(ValueError, match="input has 32 features, weight expects 64"):
        F.linear(torch.randn(2, 32), NF4Tensor.from_float(torch.randn(256, 64)))


# ---- views, copies (what FSDP2 does to a weight) ------------------------------------------------
def test_row_slice_is_a_real_view_with_a_scaler_offset():
    q = NF4Tensor.from_float(torch.randn(512, 64))
    s = q[250:260]  # crosses the scaler block boundary at row 256
    assert s.scaler_offset == 250 and s.scaler_scale.shape == (2,)
    assert s.codes.data_ptr() == q.codes.data_ptr() + 250 * 32
    torch.testing.assert_close(s.dequantize(), q.dequantize()[250:260], atol=0, rtol=0)
    torch.testing.assert_close(s[5:7].dequantize(), q.dequantize()[255:257], atol=0, rtol=0)


def test_flat_view_as_strided_and_split_keep_values():
    q = NF4Tensor.from_float(torch.randn(512, 64))
    d = q.dequantize()
    flat = q.view(-1)
    assert flat.shape == (512 * 64,) and flat.codes.data_ptr() == q.codes.data_ptr()
    assert torch.equal(flat.view(512, 64).dequantize(), d)
    window = q.as_strided((8, 64), (64, 1), 64 * 100)
    assert torch.equal(window.dequantize(), d[100:108])
    parts = q.split(256)
    assert [p.shape[0] for p in parts] == [256, 256]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), d)


def test_views_that_split_a_block_are_refused():
    q = NF4Tensor.from_float(torch.randn(256, 64))
    with pytest.raises(NotImplementedError, match="as_strided must select whole blocks of 64 elements"):
        q.as_strided((1, 32), (32, 1), 0)
    with pytest.raises(NotImplementedError, match="slice supports dim 0 with step 1"):
        q[:, :32]


def test_new_zeros_and_copy_between_nf4_tensors():
    q = NF4Tensor.from_float(torch.randn(512, 64))
    z = q.new_zeros((512, 64))
    assert type(z) is NF4Tensor and torch.equal(z.dequantize(), torch.zeros(512, 64))
    z[:256].copy_(q[:256])
    assert torch.equal(z.dequantize()[:256], q.dequantize()[:256])
    assert torch.equal(z.dequantize()[256:], torch.zeros(256, 64))


def test_copy_from_float_requantizes_and_into_float_dequantizes():
    w = torch.randn(256, 64)
    q = NF4Tensor.from_float(torch.zeros(256, 64))
    q.copy_(w)
    assert torch.equal(q.dequantize(), NF4Tensor.from_float(w).dequantize())
    out = torch.empty(256, 64)
    out.copy_(q)
    assert torch.equal(out, q.dequantize())


def test_out_of_place_math_returns_a_plain_dequantized_tensor():
    q = NF4Tensor.from_float(torch.randn(256, 64))
    r = q * 2
    assert type(r) is torch.Tensor and torch.equal(r, q.dequantize() * 2)


# ---- quantize_ ----------------------------------------------------------------------------------
def test_quantize_freezes_fitting_linears_and_skips_the_rest():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    quantize_(model, nf4_weight_only())
    assert isinstance(model[0].weight, NF4Tensor)
    assert isinstance(model[0].weight, nn.Parameter) and not model[0].weight.requires_grad
    assert not isinstance(model[2].weight, NF4Tensor) and model[2].weight.requires_grad
    assert "numel divisible by block_size*scaler_block_size=16384" in model._quantframe_skipped["2"]
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is None and model[2].weight.grad is not None


def test_model_to_bf16_keeps_nf4_codes_and_runs_bf16():
    model = nn.Sequential(nn.Linear(64, 256))
    quantize_(model, nf4_weight_only())
    codes = model[0].weight.codes
    model.to(torch.bfloat16)
    w = model[0].weight
    assert isinstance(w, NF4Tensor) and w.dtype == torch.bfloat16 and not w.requires_grad
    assert torch.equal(w.codes, codes)
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_quantized_model_state_dict_loads_with_weights_only():
    model = nn.Sequential(nn.Linear(64, 256))
    quantize_(model, nf4_weight_only())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert type(loaded["0.weight"]) is NF4Tensor
    assert torch.equal(loaded["0.weight"].dequantize(), model[0].weight.dequantize())


# ---- snapshots ----------------------------------------------------------------------------------
def test_repr_snapshot():
    q = NF4Tensor.from_float(torch.zeros(256, 64, dtype=torch.bfloat16))
    assert_expected_inline(repr(q), """NF4Tensor(shape=[256, 64], dtype=torch.bfloat16, device=cpu, codes=torch.uint8[256, 32], quantized_scalers=torch.int8[256], scaler_scale=torch.float32[1], scaler_mean=torch.float32[], block_size=64, scaler_block_size=256, scaler_offset=0)""")


def test_op_table_snapshot():
    assert_expected_inline("\n".join(NF4Tensor.supported_ops()), """\
_c10d_functional._wrap_tensor_autograd.default
_c10d_functional.all_gather_into_tensor.default
_c10d_functional.wait_tensor.default
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
aten.new_zeros.default
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
