"""quantframe.kernels.llm_int8_input: the one-pass decode input of LLM.int8 (Triton under
TRITON_INTERPRET=1, test/conftest.py) equals its reference bit for bit; bad input raises."""

import pytest
import torch

from quantframe.kernels.int8_rowwise import quantize_rowwise_int8_reference
from quantframe.kernels.llm_int8_input import (
    llm_int8_mixed_input,
    llm_int8_mixed_input_reference,
    llm_int8_mixed_input_triton,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _x(m, k, dtype, device="cpu"):
    torch.manual_seed(m * 1000 + k)
    x = torch.randn(m, k, device=device)
    x[0, k // 3] = 9.0  # an outlier column (one row suffices)
    x[m - 1, (2 * k) // 3] = -7.5
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m, k", [(1, 64), (1, 1000), (3, 7), (16, 300)])
def test_triton_equals_reference_bit_for_bit(m, k, dtype):
    x = _x(m, k, dtype)
    assert torch.equal(llm_int8_mixed_input_triton(x, 6.0), llm_int8_mixed_input_reference(x, 6.0))


def test_reference_is_the_outlier_split():
    x = _x(2, 40, torch.float32)
    y = llm_int8_mixed_input_reference(x, 6.0)
    outl = (x.abs() > 6.0).any(0)
    assert outl.sum() == 2
    assert torch.equal(y[:, outl], x[:, outl])  # outlier columns pass through
    q, s = quantize_rowwise_int8_reference(x.masked_fill(outl, 0))
    assert torch.equal(y[:, ~outl], (q.float() * s[:, None])[:, ~outl])
    # the outliers do not inflate the row scale: the rest sit on a grid of absmax(non-outliers) / 127
    assert s[0] == x[0, ~outl].abs().max() / 127


def test_strided_input_and_empty_rows():
    x = _x(4, 128, torch.float32)[:, ::2]  # stride 2 along K
    assert torch.equal(llm_int8_mixed_input_triton(x, 6.0), llm_int8_mixed_input_reference(x, 6.0))
    empty = torch.empty(0, 16)
    assert llm_int8_mixed_input_triton(empty, 6.0).shape == (0, 16)
    assert llm_int8_mixed_input_reference(empty, 6.0).shape == (0, 16)


def test_dispatch_uses_the_reference_on_cpu(monkeypatch):
    import quantframe.kernels.llm_int8_input as mod

    monkeypatch.setattr(mod, "llm_int8_mixed_input_triton", lambda *a: pytest.fail("Triton on a CPU tensor"))
    x = _x(2, 32, torch.bfloat16)
    assert torch.equal(llm_int8_mixed_input(x, 6.0), llm_int8_mixed_input_reference(x, 6.0))


@pytest.mark.parametrize(
    "x, threshold, exc, match",
    [
        (torch.randn(4), 6.0, ValueError, "2-D"),
        (torch.ones(2, 4, dtype=torch.int32), 6.0, TypeError, "x.dtype"),
        (torch.randn(2, 4), 0.0, ValueError, "positive"),
        (torch.randn(2, 4), True, ValueError, "positive"),
    ],
    ids=["1d", "int", "zero-threshold", "bool-threshold"],
)
@pytest.mark.parametrize("impl", [llm_int8_mixed_input_reference, llm_int8_mixed_input_triton], ids=["ref", "triton"])
def test_bad_input_raises(impl, x, threshold, exc, match):
    with pytest.raises(exc, match=match):
        impl(x, threshold)


def test_triton_takes_at_most_16_rows():
    with pytest.raises(ValueError, match="at most 16"):
        llm_int8_mixed_input_triton(torch.randn(17, 8), 6.0)
    x = torch.randn(17, 8)
    assert torch.equal(llm_int8_mixed_input(x, 6.0), llm_int8_mixed_input_reference(x, 6.0))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16])
def test_triton_equals_reference_on_cuda(m):
    x = _x(m, 4096, torch.bfloat16, "cuda")
    torch.testing.assert_close(llm_int8_mixed_input(x, 6.0), llm_int8_mixed_input_reference(x, 6.0), rtol=0, atol=0)
    compiled = torch.compile(llm_int8_mixed_input, fullgraph=True)
    torch.testing.assert_close(compiled(x, 6.0), llm_int8_mixed_input_reference(x, 6.0), rtol=0, atol=0)
