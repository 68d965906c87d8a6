"""LLM.int8's decode input in one pass: ``x [M, K]`` (M <= 16) -> fp32 ``where(outlier, x, x_q * sx)``.

Column ``k`` is an outlier when any ``|x[m, k]| > threshold``; the other columns are quantized per
row to int8 (``sx = max(absmax / 127, 1e-12)`` over the row's non-outlier columns, round half to
even, clamp to ``[-127, 127]``) and stored as their dequantized value ``x_q * sx`` (exact in fp32).
The INT8-weight GEMV then multiplies this one fp32 row with W: the INT8 part and the 16-bit outlier
part of LLM.int8 in one pass over the weight (:mod:`quantframe.llm_int8`).

The reference is the composition the module used before (six elementwise / reduction kernels, ~15
us of a 37 us one-token decode step on H200 under CUDA graphs); the Triton kernel is one program
that reads x twice (outliers and row absmax, then the values) and equals it bit for bit. Measured
on H200 (x [1, 4096] @ W [14336, 4096].T, CUDA graphs): the decode step 27.0 us with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import use_triton
from .int8_rowwise import quantize_rowwise_int8, quantize_rowwise_int8_reference, round_half_even

__all__ = ["llm_int8_mixed_input", "llm_int8_mixed_input_reference", "llm_int8_mixed_input_triton"]

MAX_ROWS = 16  # one program holds every row of x
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(x: Tensor, threshold: float, max_rows: int | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"llm_int8_mixed_input: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"llm_int8_mixed_input: x.dtype={x.dtype}, expected float32, float16 or bfloat16")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"llm_int8_mixed_input: threshold={threshold!r} must be a positive number")
    if max_rows is not None and x.shape[0] > max_rows:
        raise ValueError(f"llm_int8_mixed_input_triton: x has {x.shape[0]} rows, at most {max_rows} are supported")


def _compose(x: Tensor, threshold: float, quantize) -> Tensor:
    outl = (x.abs() > threshold).any(0)  # [K] bool
    if x.shape[0] == 0 or x.shape[1] == 0:
        return x.float()
    x_q, x_scale = quantize(x.masked_fill(outl, 0))
    return torch.where(outl, x.float(), x_q.float() * x_scale.reshape(-1, 1))


def llm_int8_mixed_input_reference(x: Tensor, threshold: float) -> Tensor:
    """fp32 ``[M, K]``: ``x`` in the outlier columns (any ``|x[:, k]| > threshold``), elsewhere
    ``x_q * sx`` of :func:`quantize_rowwise_int8_reference` on ``x`` with the outlier columns zeroed.

    Raises:
        ValueError: ``x`` not 2-D, or ``threshold`` not a positive number.
        TypeError: ``x`` not a 16/32-bit float.
    """
    _check_args(x, threshold, None)
    return _compose(x, threshold, quantize_rowwise_int8_reference)


@triton.jit
def _mixed_input_kernel(
    x_ptr, y_ptr, M, K, stride_xm, stride_xk, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Pass 1: each row's absmax over the columns that are not outliers (outliers count as 0).
    absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (cols < K)[None, :]
        a = tl.abs(tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0))
        a = a.to(tl.float32)
        outl = tl.max(a, axis=0) > threshold
        absmax = tl.maximum(absmax, tl.max(tl.where(outl[None, :], 0.0, a), axis=1))
    # IEEE division as the reference's tensor / tensor (see int8_rowwise)
    scale = tl.maximum(tl.math.div_rn(absmax, tl.full((BLOCK_M,), 127.0, tl.float32)), 1e-12)
    # Pass 2: the values.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        outl = tl.max(tl.abs(x), axis=0) > threshold
        v = tl.math.div_rn(x, scale[:, None] + tl.zeros_like(x))
        v = round_half_even(v)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(y_ptr + offs_m[:, None] * K + cols[None, :], tl.where(outl[None, :], x, v * scale[:, None]), mask=mask)


@triton_op("quantframe::llm_int8_mixed_input", mutates_args=())
def _mixed_input_op(x: Tensor, threshold: float) -> Tensor:
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.float32, device=x.device)
    if m and k:
        block_m = triton.next_power_of_2(m)
        wrap_triton(_mixed_input_kernel)[(1,)](
            x, y, m, k, x.stride(0), x.stride(1), float(threshold), BLOCK_M=block_m,
            BLOCK_K=max(16, min(triton.next_power_of_2(k), 4096 // block_m)), num_warps=4,
        )  # fmt: skip
    return y


def llm_int8_mixed_input_triton(x: Tensor, threshold: float) -> Tensor:
    """Triton version of :func:`llm_int8_mixed_input_reference` (bit for bit) for ``M <= MAX_ROWS``
    (else ValueError): one program."""
    _check_args(x, threshold, MAX_ROWS)
    return torch.ops.quantframe.llm_int8_mixed_input(x, float(threshold))


def llm_int8_mixed_input(x: Tensor, threshold: float) -> Tensor:
    """One row on CUDA: the Triton kernel; else the reference's composition, its row-wise
    quantization on int8_rowwise's kernel on CUDA (same result and errors as the reference).

    The kernel is one program (the outlier test couples the rows): at 16 rows of 4096 it made an
    LLM.int8 decode step slower than the composition on an H200 (335 against 267 us), at one row
    faster (27 against 37 us with the GEMV)."""
    if use_triton(x) and x.dim() == 2 and x.shape[0] == 1:
        return llm_int8_mixed_input_triton(x, threshold)
    _check_args(x, threshold, None)
    return _compose(x, threshold, quantize_rowwise_int8)
