import io

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import quantframe
from quantframe.affine import (
    AffineQuantizedTensor,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
    intx_weight_only,
)
from quantframe.api import quantize_, summary
from quantframe.testing import QuantTensorContract, sqnr


# ---- the shared contract, once per layout (floors: measured on randn(32, 64), minus ~1 dB) ----
class TestInt8PerRowContract(QuantTensorContract):
    sqnr_floor = 43.0  # measured 44.3 (fp32) / 44.1 (bf16)

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=8)


class TestInt8AsymGroup32Contract(QuantTensorContract):
    sqnr_floor = 44.0  # measured 45.9 / 45.6

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=8, group_size=32, symmetric=False)


class TestInt4Group32AsymContract(QuantTensorContract):
    sqnr_floor = 20.5  # measured 21.7

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=4, group_size=32, symmetric=False)


class TestInt4Group64SymContract(QuantTensorContract):
    sqnr_floor = 18.0  # measured 19.1

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=4, group_size=64, symmetric=True)


class TestInt3Group32AsymContract(QuantTensorContract):
    sqnr_floor = 14.0  # measured 15.2

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=3, group_size=32, symmetric=False)


class TestInt2Group32AsymContract(QuantTensorContract):
    sqnr_floor = 7.0  # measured 7.85

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=2, group_size=32, symmetric=False)


class TestW8A8Contract(QuantTensorContract):
    sqnr_floor = 43.0  # weight round trip, as int8 per row

    def make(self, w):
        return AffineQuantizedTensor.from_float(w, bits=8, act_quant=True)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_linear_matches_dequantized(self, dtype):
        # The activation is quantized too: compare at INT8 accuracy, not float accuracy.
        q = self.make(self.weight(dtype))
        x = torch.randn(3, 5, self.shape[1], dtype=dtype)
        ref = F.linear(x.float(), q.dequantize(torch.float32))
        y = F.linear(x, q)
        assert y.dtype == dtype and y.shape == (3, 5, self.shape[0])
        assert sqnr(ref, y.float()) > 40  # measured 44.5 (fp32)


# ---- numerics ---------------------------------------------------------------------------------
def test_packed_storage_is_bits_per_element():
    w = torch.randn(16, 64)
    for bits in (2, 3, 4):
        q = AffineQuantizedTensor.from_float(w, bits=bits, group_size=32, symmetric=False)
        assert q.qdata.dtype == torch.uint8 and q.qdata.shape == (16, 64 * bits // 8)
    q8 = AffineQuantizedTensor.from_float(w, bits=8)
    assert q8.qdata.dtype == torch.int8 and q8.scale.shape == (16, 1) and not q8.zero_point.any()


def test_symmetric_int4_codes_are_offset_by_8():
    w = torch.tensor([[-7.0, 0.0, 7.0, 3.0] * 8])
    q = AffineQuantizedTensor.from_float(w, bits=4, group_size=32, symmetric=True)
    assert q.zero_point.item() == 8 and q.codes()[0, :4].tolist() == [1, 8, 15, 11]
    torch.testing.assert_close(q.dequantize(), w)


def test_weight_only_linear_with_bias_matches_dense_and_grads_reach_input():
    w, b = torch.randn(24, 64), torch.randn(24)
    q = AffineQuantizedTensor.from_float(w, bits=4, group_size=32, symmetric=False)
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = F.linear(x, q, b)
    torch.testing.assert_close(y, F.linear(x.detach(), q.dequantize(), b))
    y.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(2, 3, 64))


def test_w8a8_runs_int8_scaled_mm_and_is_close_to_float(monkeypatch):
    from quantframe.kernels import int8_mm

    calls = []
    real = int8_mm.int8_scaled_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(int8_mm, "int8_scaled_mm", spy)
    w, b = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    y = F.linear(x, AffineQuantizedTensor.from_float(w.bfloat16(), bits=8, act_quant=True), b)
    assert calls == [(torch.int8, torch.int8, (14, 64), (48, 64))]
    assert y.dtype == torch.bfloat16 and y.shape == (2, 7, 48)
    ref = F.linear(x.float(), w, b)
    assert sqnr(ref, y.float()) > 38  # measured 40.9: int8 x int8 codes, bf16 weight and output
    # INT8 tolerance: 2% of the output range (|y| <= ~28 here, where a bf16 ulp alone is 0.125)
    torch.testing.assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "config",
    [int8_weight_only(), int4_weight_only(group_size=32), intx_weight_only(3), int8_dynamic_activation_int8_weight()],
    ids=["int8", "int4-g32", "int3-g32", "w8a8"],
)
def test_compiled_model_matches_eager(config):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_(model, config)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


# ---- quantize_ ----------------------------------------------------------------------------------
def test_quantize_skips_layer_whose_in_features_is_not_a_multiple_of_the_group():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.Linear(16, 8))
    quantize_(model, int4_weight_only(group_size=32))
    assert isinstance(model[0].weight, AffineQuantizedTensor)
    assert not isinstance(model[2].weight, AffineQuantizedTensor)
    assert not isinstance(model[3].weight, AffineQuantizedTensor)
    text = summary(model)
    assert "skipped 2: weight (16, 48): group_size=32 must divide in_features=48" in text
    assert "skipped 3: weight (8, 16): group_size=32 must divide in_features=16" in text
    assert model(torch.randn(3, 64)).shape == (3, 8)


def test_quantized_model_state_dict_loads_with_weights_only():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    quantize_(model, int4_weight_only(group_size=32, symmetric=True))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    quantize_(fresh, int4_weight_only(group_size=32, symmetric=True))
    fresh.load_state_dict(sd)
    x = torch.randn(2, 64)
    torch.testing.assert_close(fresh(x), model(x))


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 4, "group_size": 48}, r"group_size=48 must be None \(per row\) or one of \(32, 64, 128, 256\)"),
        ({"bits": 4, "group_size": 128}, r"group_size=128 must divide in_features=64 \(weight shape \(8, 64\)\)"),
        ({"bits": 5}, r"bits=5 is not supported; expected one of \(2, 3, 4, 8\)"),
        ({"bits": 4, "act_quant": True}, r"dynamic int8 activations need an 8-bit symmetric per-row weight"),
    ],
)
def test_from_float_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AffineQuantizedTensor.from_float(torch.randn(8, 64), **kwargs)


def test_from_float_rejects_bad_weights():
    with pytest.raises(TypeError, match=r"weight must be floating point .* got torch.int32"):
        AffineQuantizedTensor.from_float(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight must be 2-D \[out_features, in_features\], got shape \(64,\)"):
        AffineQuantizedTensor.from_float(torch.randn(64))
    with pytest.raises(ValueError, match=r"weight has NaN or Inf"):
        AffineQuantizedTensor.from_float(torch.full((8, 64), float("nan")))
    with pytest.raises(ValueError, match=r"3-bit packing needs in_features=12 to be a multiple of 8"):
        AffineQuantizedTensor.from_float(torch.randn(8, 12), bits=3)


def test_configs_validate_at_construction():
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig: group_size=100 must be None"):
        int4_weight_only(group_size=100)
    with pytest.raises(ValueError, match=r"IntxWeightOnlyConfig: bits=6 is not supported"):
        intx_weight_only(6)


def test_unsupported_views_and_copies_raise():
    q = AffineQuantizedTensor.from_float(torch.randn(8, 64), bits=4, group_size=32)
    with pytest.raises(NotImplementedError, match=r"slice supports dim 0 with step 1 .* got dim=1"):
        q[:, :32]
    with pytest.raises(NotImplementedError, match=r"view supports the same shape only \(\[8, 64\]\), got \[64, 8\]"):
        q.view(64, 8)
    assert q.view(8, -1).shape == (8, 64)
    other = AffineQuantizedTensor.from_float(torch.randn(8, 64), bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"copy_: layouts differ"):
        q.copy_(other)
    with pytest.raises(NotImplementedError, match=r"copy_ of a plain tensor into a quantized one"):
        q.copy_(torch.randn(8, 64))


def test_copy_between_same_layouts_and_dequantizing_math():
    q = AffineQuantizedTensor.from_float(torch.randn(8, 64), bits=4, group_size=32)
    src = AffineQuantizedTensor.from_float(torch.randn(8, 64), bits=4, group_size=32)
    q.copy_(src)
    torch.testing.assert_close(q.dequantize(), src.dequantize())
    out = q * 2
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, src.dequantize() * 2)


# ---- snapshots ----------------------------------------------------------------------------------
def test_repr_and_op_table_snapshot():
    q = AffineQuantizedTensor.from_float(torch.randn(16, 64, dtype=torch.bfloat16), bits=4, group_size=32)
    assert_expected_inline(repr(q), """AffineQuantizedTensor(shape=[16, 64], dtype=torch.bfloat16, device=cpu, qdata=torch.uint8[16, 32], scale=torch.float32[16, 2], zero_point=torch.int32[16, 2], bits=4, group_size=32, symmetric=True, act_quant=False)""")
    assert_expected_inline("\n".join(AffineQuantizedTensor.supported_ops()), """\
aten._pin_memory.default
aten._to_copy.default
aten._unsafe_view.default
aten.abs.default
aten.add.Tensor
aten.alias.default
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
aten.sign.default
aten.slice.Tensor
aten.sqrt.default
aten.sub.Tensor
aten.view.default
aten.zeros_like.default
torch._C._nn.linear
torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")


def test_compiled_weight_only_linear_passes_gradients_to_the_input():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_(model, int4_weight_only(group_size=32))
    x = torch.randn(5, 64, requires_grad=True)
    torch.compile(model, fullgraph=True)(x).sum().backward()
    grad, x.grad = x.grad, None
    model(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)
    assert model[0].weight.grad is None  # inference weights: no gradient reaches them


def test_aten_trace_of_one_int4_linear_snapshot():
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: graphs.append(gm) or gm)
    torch._dynamo.reset()
    q = AffineQuantizedTensor.from_float(torch.randn(16, 64), bits=4, group_size=32)
    with torch.no_grad():
        torch.compile(lambda x, w: F.linear(x, w), backend=backend, fullgraph=True)(torch.randn(4, 64), q)
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert_expected_inline("\n".join(ops), """\
aten.view.default
aten._to_copy.default
aten.arange.default
aten.mul.Tensor
aten.__lshift__.Tensor
aten.sum.dim_IntList
aten.arange.default
aten.mul.Tensor
aten.unsqueeze.default
aten.__rshift__.Tensor
aten.bitwise_and.Scalar
aten._to_copy.default
aten.view.default
aten._to_copy.default
aten.unsqueeze.default
aten.expand.default
aten.clone.default
aten.view.default
aten.expand.default
aten._to_copy.default
aten.sub.Tensor
aten.unsqueeze.default
aten.expand.default
aten.clone.default
aten.view.default
aten.expand.default
aten.mul.Tensor
aten.t.default
aten.mm.default""")


def test_quantize_freezes_inference_weights():
    m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantframe.quantize_(m, quantframe.int4_weight_only(group_size=32))
    assert isinstance(m[0].weight, quantframe.AffineQuantizedTensor) and not m[0].weight.requires_grad
    assert m[0].bias.requires_grad  # only the quantized weight is frozen
