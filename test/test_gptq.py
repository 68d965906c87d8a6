import numpy as np
import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

from quantframe.gptq import (
    GPTQLinearWeight,
    from_gptq,
    load_gptq_linear_,
    pack_stream,
    quantize_gptq_groups,
    to_gptq,
    unpack_stream,
)
from quantframe.testing import QuantTensorContract


def _expected(w, bits, group_size, perm=None):
    """The quantized values, computed from the unpacked codes (no packing involved)."""
    codes, zero, scale16, g_idx = quantize_gptq_groups(w, bits, group_size, perm)
    g = g_idx.long()
    return (codes.float() - zero[:, g].float()) * scale16[:, g].float(), codes


# ---- the shared contract ---------------------------------------------------------------------------
class TestGPTQ4bitGroup32Contract(QuantTensorContract):
    sqnr_floor = 20.0  # measured ~21.5 on randn(32, 64)

    def make(self, w):
        return from_gptq(*to_gptq(w, bits=4, group_size=32), bits=4, group_size=32, dtype=w.dtype)


class TestGPTQ3bitActOrderContract(QuantTensorContract):
    sqnr_floor = 13.5  # measured ~15

    def make(self, w):
        perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))
        return from_gptq(*to_gptq(w, bits=3, group_size=32, act_order_perm=perm), bits=3, group_size=32, dtype=w.dtype)


# ---- the layout, checked against the reference packers' loops --------------------------------------
def _autogptq_pack_qweight(codes_kn: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ-for-LLaMa's QuantLinear.pack loop (codes [K, N] uint32), including the 3-bit case."""
    q = np.zeros((codes_kn.shape[0] * bits // 32, codes_kn.shape[1]), dtype=np.uint32)
    i = row = 0
    c = codes_kn.astype(np.uint32)
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= c[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 codes in 3 words, codes 10 and 21 straddle
            for j in range(i, i + 10):
                q[row] |= c[j] << (3 * (j - i))
            i += 10
            q[row] |= c[i] << 30
            row += 1
            q[row] |= (c[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= c[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= c[i] << 31
            row += 1
            q[row] |= (c[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= c[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return q.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_gptq_for_llama_loop(bits):
    codes = torch.randint(0, 2**bits, (64, 8), generator=torch.Generator().manual_seed(bits))
    ref = torch.from_numpy(_autogptq_pack_qweight(codes.numpy(), bits))
    packed = pack_stream(codes, bits, dim=0)
    assert packed.dtype == torch.int32 and torch.equal(packed, ref)
    assert torch.equal(unpack_stream(packed, bits, dim=0), codes.int())


def test_4bit_words_hold_eight_k_consecutive_codes_low_bits_first():
    codes = torch.arange(16).remainder(16).view(16, 1)  # column 0: codes 0..15 along K
    packed = pack_stream(codes, 4, dim=0)
    assert packed[:, 0].tolist() == [0x76543210, np.array(0xFEDCBA98, dtype=np.uint32).view(np.int32).item()]


# ---- import: pack a known weight, load, dequantize ---------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_imported_weight_dequantizes_to_the_quantized_values_exactly(bits, act_order):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1)) if act_order else None
    qweight, qzeros, scales, g_idx = to_gptq(w, bits, group_size=32, act_order_perm=perm)
    assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
    assert qweight.shape == (128 * bits // 32, 64) and qzeros.shape == (4, 64 * bits // 32) and scales.shape == (4, 64)
    assert torch.equal(g_idx.sort().values, torch.arange(128, dtype=torch.int32) // 32)
    assert torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32) != act_order  # act-order: unsorted
    q = from_gptq(qweight, qzeros, scales, g_idx, bits=bits, group_size=32)
    expected, codes = _expected(w, bits, 32, perm)
    assert torch.equal(q.codes().T, codes.int())
    assert torch.equal(q.dequantize(torch.float32), expected)
    assert q.dtype == torch.float16 and q.shape == (64, 128)
    assert (q.dequantize(torch.float32) - w).abs().max() <= scales.float().max() * 0.51


def test_v1_stores_zero_minus_one_and_v2_the_zero():
    w = torch.randn(32, 64).abs()  # all-positive groups: zero point 0, stored as 2**bits - 1 in v1
    w[:, :32] -= 1.0
    q1 = to_gptq(w, 4, 32, format="v1")
    q2 = to_gptq(w, 4, 32, format="v2")
    z2 = unpack_stream(q2[1], 4, dim=1)
    assert torch.equal(unpack_stream(q1[1], 4, dim=1), (z2 - 1) & 15)
    assert (z2[1] == 0).all()
    a = from_gptq(*q1, bits=4, group_size=32)
    b = from_gptq(*q2, bits=4, group_size=32, format="v2")
    assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(a.dequantize(torch.float32), _expected(w, 4, 32)[0])
    wrong = from_gptq(*q1, bits=4, group_size=32, format="v2")  # the off-by-one is visible
    assert not torch.equal(wrong.dequantize(), a.dequantize())


def test_g_idx_none_and_group_size_minus_one():
    w = torch.randn(32, 64)
    qweight, qzeros, scales, g_idx = to_gptq(w, 4, 32)
    torch.testing.assert_close(from_gptq(qweight, qzeros, scales, None, 4, 32).dequantize(), from_gptq(qweight, qzeros, scales, g_idx, 4, 32).dequantize(), rtol=0, atol=0)  # fmt: skip
    one = to_gptq(w, 8, -1)
    assert one[2].shape == (1, 32)
    q = from_gptq(*one[:3], bits=8, group_size=-1)
    assert torch.equal(q.dequantize(torch.float32), _expected(w, 8, -1)[0])


# ---- linear, errors, repr --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference_and_gives_input_grad(dtype):
    w = torch.randn(64, 128)
    q = from_gptq(*to_gptq(w, 4, 32), bits=4, group_size=32, dtype=dtype)
    x = torch.randn(2, 3, 128, dtype=dtype, requires_grad=True)
    bias = torch.randn(64, dtype=dtype)
    y = F.linear(x, q, bias)
    ref = (x.detach().float() @ q.dequantize(torch.float32).T + bias.float()).to(dtype)
    assert y.dtype == dtype and torch.equal(y, ref)
    y.sum().backward()
    torch.testing.assert_close(x.grad.float(), q.dequantize(torch.float32).sum(0).expand(2, 3, 128), atol=1e-2, rtol=1e-2)


def _gptq(n=32, k=64, bits=4, gs=32):
    return to_gptq(torch.randn(n, k), bits, gs)


def test_dtype_errors():
    qweight, qzeros, scales, g_idx = _gptq()
    with pytest.raises(TypeError, match=r"from_gptq: qweight must be an int32 tensor, got torch.int64"):
        from_gptq(qweight.long(), qzeros, scales, g_idx, 4, 32)
    with pytest.raises(TypeError, match=r"from_gptq: qzeros must be an int32 tensor, got torch.uint8"):
        from_gptq(qweight, qzeros.to(torch.uint8), scales, g_idx, 4, 32)
    with pytest.raises(TypeError, match=r"from_gptq: scales must be a 2-D float tensor"):
        from_gptq(qweight, qzeros, scales.int(), g_idx, 4, 32)
    with pytest.raises(TypeError, match=r"from_gptq: g_idx must be an int32 tensor, got torch.float32"):
        from_gptq(qweight, qzeros, scales, g_idx.float(), 4, 32)


def test_shape_errors():
    qweight, qzeros, scales, g_idx = _gptq()
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        from_gptq(qweight, qzeros, scales, g_idx, 5, 32)
    with pytest.raises(ValueError, match=r"g_idx has shape \(63,\), expected \[K=64\]"):
        from_gptq(qweight, qzeros, scales, g_idx[:63], 4, 32)
    with pytest.raises(ValueError, match=r"g_idx values must be in \[0, 2\)"):
        from_gptq(qweight, qzeros, scales, g_idx + 1, 4, 32)
    with pytest.raises(ValueError, match=r"scales.shape=\(2, 32\), expected \[G=4, N=32\] for K=128"):
        from_gptq(torch.cat([qweight, qweight]), qzeros, scales, None, 4, 32)  # K doubled
    with pytest.raises(ValueError, match=r"group_size=48 must be -1 or a positive divisor of K=64"):
        from_gptq(qweight, qzeros, scales, g_idx, 4, 48)
    with pytest.raises(ValueError, match=r"qzeros.shape=\(2, 3\), expected \[G=2, N\*bits/32=4\]"):
        from_gptq(qweight, qzeros[:, :3], scales, g_idx, 4, 32)
    with pytest.raises(ValueError, match=r"format='v3'"):
        from_gptq(qweight, qzeros, scales, g_idx, 4, 32, format="v3")
    with pytest.raises(ValueError, match=r"to_gptq: 3-bit packing needs K\*bits and N\*bits to be multiples of 32"):
        to_gptq(torch.randn(32, 48), 3, 16)
    with pytest.raises(ValueError, match=r"act_order_perm must be a permutation of range\(64\)"):
        to_gptq(torch.randn(32, 64), 4, 32, act_order_perm=torch.zeros(64, dtype=torch.long))


def test_load_gptq_linear_swaps_a_frozen_weight():
    lin = nn.Linear(64, 32)
    w = torch.randn(32, 64)
    bias = torch.randn(32)
    out = load_gptq_linear_(lin, *to_gptq(w, 4, 32), bits=4, group_size=32, bias=bias)
    assert out is lin and isinstance(lin.weight, nn.Parameter) and isinstance(lin.weight.data, GPTQLinearWeight)
    assert not lin.weight.requires_grad and lin.weight.dtype == torch.float32
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ _expected(w, 4, 32)[0].T + bias)
    with pytest.raises(ValueError, match=r"GPTQ weight is \[N=32, K=64\], module is \[out_features=32, in_features=128\]"):
        load_gptq_linear_(nn.Linear(128, 32), *to_gptq(w, 4, 32), bits=4, group_size=32)
    with pytest.raises(TypeError, match=r"expected an nn.Linear, got Conv1d"):
        load_gptq_linear_(nn.Conv1d(1, 1, 1), *to_gptq(w, 4, 32), bits=4, group_size=32)


def test_compile_fullgraph_with_act_order_matches_eager():
    torch._dynamo.reset()
    perm = torch.randperm(128)
    q = from_gptq(*to_gptq(torch.randn(64, 128), 3, 32, perm), bits=3, group_size=32, dtype=torch.float32)
    x = torch.randn(4, 128)
    compiled = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
    torch.testing.assert_close(compiled(x, q), F.linear(x, q))


def test_repr_and_op_table():
    q = from_gptq(*to_gptq(torch.randn(32, 64), 4, 32), bits=4, group_size=32)
    assert_expected_inline(repr(q), """GPTQLinearWeight(shape=[32, 64], dtype=torch.float16, device=cpu, qweight=torch.int32[8, 32], zeros=torch.int32[2, 32], scales=torch.float16[2, 32], g_idx=torch.int32[64], bits=4, group_size=32)""")
    assert_expected_inline(", ".join(GPTQLinearWeight.supported_ops()), """aten._pin_memory.default, aten._to_copy.default, aten._unsafe_view.default, aten.abs.default, aten.add.Tensor, aten.alias.default, aten.clone.default, aten.copy_.default, aten.detach.default, aten.div.Scalar, aten.div.Tensor, aten.empty_like.default, aten.is_pinned.default, aten.maximum.default, aten.mul.Scalar, aten.mul.Tensor, aten.neg.default, aten.ones_like.default, aten.sign.default, aten.slice.Tensor, aten.sqrt.default, aten.sub.Tensor, aten.view.default, aten.zeros_like.default, torch._C._nn.linear, torch._VariableFunctionsClass._has_compatible_shallow_copy_type""")
