"""Matmul of float activations with a per-row INT8 weight, dequantized inside the kernel.

``W = int_data [N, K] int8 * scale [N, 1]`` is never materialized in float: each int8 tile is
converted in registers. Two layouts share one kernel (``TRANSPOSE`` flag):

* ``transpose=False`` (linear forward):   ``x [..., K] @ W.T -> [..., N]`` (+ ``bias [N]``)
* ``transpose=True``  (grad wrt input):   ``x [..., N] @ W   -> [..., K]``

Accumulation is fp32 in both; the result is cast to ``x.dtype``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import is_traced, use_triton
from .int8_rowwise import _round_to_bf16

__all__ = [
    "dequantize_rowwise_int8",
    "dequantize_rowwise_int8_reference",
    "dequantize_rowwise_int8_triton",
    "int8_weight_mm",
    "int8_weight_mm_dense",
    "int8_weight_mm_reference",
    "int8_weight_mm_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# From this many rows of x (tokens) on, a GPU matmul is compute-bound: reading 1 byte per weight
# instead of 2 saves nothing, and cuBLAS on a transient 16-bit copy of W beats the fused kernel
# (whose in-register int8 -> bf16 conversion slows its wgmma pipeline). Below it, the fused kernel
# wins by never writing that copy. Crossover measured on H100: benchmarks/train_step.py, matmul table.
DENSE_MIN_ROWS = 2048


def _check_args(x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None, transpose: bool) -> None:
    """Raise TypeError / ValueError naming the bad argument, its value and what is allowed."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"int8_weight_mm: x.dtype={x.dtype}, expected float32, float16 or bfloat16")
    if int_data.dtype != torch.int8:
        raise TypeError(f"int8_weight_mm: int_data.dtype={int_data.dtype}, expected torch.int8")
    if not scale.is_floating_point():
        raise TypeError(f"int8_weight_mm: scale.dtype={scale.dtype}, expected a float dtype")
    if int_data.dim() != 2:
        raise ValueError(f"int8_weight_mm: int_data must be 2-D [N, K], got shape {tuple(int_data.shape)}")
    n, k = int_data.shape
    if scale.shape != (n,):
        raise ValueError(
            f"int8_weight_mm: scale.shape={tuple(scale.shape)}, expected ({n},) for int_data [N={n}, K={k}]"
        )
    red = n if transpose else k
    if x.dim() == 0 or x.shape[-1] != red:
        raise ValueError(
            f"int8_weight_mm: x.shape={tuple(x.shape)} must end in {'N' if transpose else 'K'}={red} "
            f"for int_data [N={n}, K={k}] and transpose={transpose}"
        )
    if bias is not None:
        if transpose:
            raise ValueError("int8_weight_mm: bias must be None when transpose=True (grad wrt input has no bias)")
        if not bias.is_floating_point():
            raise TypeError(f"int8_weight_mm: bias.dtype={bias.dtype}, expected a float dtype")
        if bias.shape != (n,):
            raise ValueError(f"int8_weight_mm: bias.shape={tuple(bias.shape)}, expected ({n},)")
    devices = {t.device for t in (x, int_data, scale, bias) if t is not None}
    if len(devices) > 1:
        got = sorted(map(str, devices))
        raise ValueError(f"int8_weight_mm: x, int_data, scale and bias must share a device, got {got}")


def int8_weight_mm_reference(
    x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None = None, transpose: bool = False
) -> Tensor:
    """``x @ dequant(int_data, scale).T (+ bias)``, or ``x @ dequant(int_data, scale)`` if ``transpose``.

    Args:
        x: ``[..., K]`` (``[..., N]`` if ``transpose``) float32, float16 or bfloat16 activations.
        int_data: ``[N, K]`` int8 weight codes (nn.Linear layout).
        scale: ``[N]`` float per-row scale (float32 as produced by ``quantize_rowwise_int8``).
        bias: ``[N]`` float or None; must be None if ``transpose``.
        transpose: multiply by ``W`` instead of ``W.T`` (the input gradient of a linear).

    Returns:
        ``[..., N]`` (``[..., K]`` if ``transpose``) in ``x.dtype``, computed in fp32.

    Raises:
        TypeError: a wrong dtype (x not a 16/32-bit float, int_data not int8, scale/bias not float).
        ValueError: mismatched shapes or devices, or a bias with ``transpose=True``.
    """
    _check_args(x, int_data, scale, bias, transpose)
    w = int_data.float() * scale.float()[:, None]  # [N, K] fp32
    y = x.float() @ (w if transpose else w.T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _configs() -> list[triton.Config]:
    """Autotune candidates for Hopper; the interpreter gets one small config (autotuning there
    would run every candidate on the CPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_O": 32, "BLOCK_M": 32, "BLOCK_K": 32, "GROUP_O": 4}, num_warps=4)]
    shapes = [  # (BLOCK_O, BLOCK_M, BLOCK_K, num_warps, num_stages); measured best at 8192x2048x5632: 128x256x64/8/3
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 16, 128, 4, 4), (128, 16, 128, 4, 3), (128, 32, 128, 4, 3),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_O": o, "BLOCK_M": m, "BLOCK_K": k, "GROUP_O": 8}, num_warps=w, num_stages=st)
        for o, m, k, w, st in shapes
    ]


def _prune(configs, named_args, **kwargs):
    """Skip token tiles far larger than the problem (decode-sized M gets the BLOCK_M=16/32 configs)."""
    m = named_args["M"]
    small = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return small or configs


@triton.autotune(
    configs=_configs(), key=["M", "N_OUT", "R", "TRANSPOSE", "DOT_FP32"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _int8_weight_mm_kernel(
    x_ptr,  # [M, R] float activations
    w_ptr,  # int8 weight, read as an [N_OUT, R] matrix through the two strides below
    s_ptr,  # [N] float scale: along N_OUT if not TRANSPOSE, along R if TRANSPOSE
    b_ptr,  # [N_OUT] float bias (read only if HAS_BIAS)
    y_ptr,  # [M, N_OUT] out, dtype of x
    M,
    N_OUT,
    R,  # reduction length: K if not TRANSPOSE, N if TRANSPOSE
    stride_xm,
    stride_xr,
    stride_wr,  # int_data stride along the reduction dim
    stride_wo,  # int_data stride along the output dim
    stride_ym,
    stride_yo,
    TRANSPOSE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles (fp32 x, or the interpreter); else x's 16-bit dtype
    BLOCK_O: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    # Computes y.T [N_OUT, M] = W' [N_OUT, R] @ x.T [R, M], W' = W (TRANSPOSE: W.T). The int8 weight
    # is the dot's *first* operand: converted in registers it can feed Hopper's wgmma directly (A may
    # come from registers, B must come from shared memory), instead of a round trip through shared
    # memory. Measured on H100 at 8192x2048x5632 bf16: 0.38 ms vs 0.43 ms with x first.
    # Grouped tile order: GROUP_O weight-tiles walk the token tiles together, so an x tile is read
    # from L2, not HBM, by the other programs of its group.
    pid = tl.program_id(0)
    num_o = tl.cdiv(N_OUT, BLOCK_O)
    num_m = tl.cdiv(M, BLOCK_M)
    group = pid // (GROUP_O * num_m)
    first_o = group * GROUP_O
    size_o = tl.minimum(num_o - first_o, GROUP_O)
    pid_o = first_o + (pid % (GROUP_O * num_m)) % size_o
    pid_m = (pid % (GROUP_O * num_m)) // size_o

    # int64 offsets: M * K or N * K can pass 2**31 elements.
    offs_o = (pid_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_o = offs_o < N_OUT
    mask_m = offs_m < M

    acc = tl.zeros((BLOCK_O, BLOCK_M), dtype=tl.float32)  # fp32: K-long sums in bf16 lose digits
    for k0 in range(0, R, BLOCK_K):
        rk = k0 + offs_k
        mask_k = rk < R
        # Masked lanes load 0, so ragged M, N and R edges add nothing to the sum.
        w = tl.load(
            w_ptr + offs_o[:, None] * stride_wo + rk[None, :] * stride_wr,
            mask=mask_o[:, None] & mask_k[None, :],
            other=0,
        )
        xt = tl.load(
            x_ptr + rk[:, None] * stride_xr + offs_m[None, :] * stride_xm,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        )
        if TRANSPOSE:
            # The scale runs along the reduction dim, so it must be applied before the dot; the
            # scaled weight is then rounded to x's dtype, as a dense bf16 matmul would have it.
            s = tl.load(s_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
            w = w.to(tl.float32) * s[None, :]
        if DOT_FP32:
            # fp32 x needs fp32 products; the interpreter's bf16 dot is wrong (numpy has no bf16).
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            # 16-bit tensor cores: int8 codes are exact in bf16/fp16, so without TRANSPOSE the
            # products are exact and the fp32 sum matches the reference to rounding.
            acc = tl.dot(w.to(xt.dtype), xt, acc)

    if not TRANSPOSE:
        # The scale runs along the output features: one multiply per output, not per weight.
        s = tl.load(s_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + offs_m[None, :] * stride_ym + offs_o[:, None] * stride_yo,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_o[:, None] & mask_m[None, :],
    )


# triton_op + wrap_triton let torch.compile trace into the kernel instead of graph-breaking; in
# eager mode (the CPU interpreter included) the op simply launches the kernel. Compiling it needs a
# GPU: under TRITON_INTERPRET=1 fake tensors reach the interpreted kernel, which reads their storage.
@triton_op("quantframe::int8_weight_mm", mutates_args=())
def _int8_weight_mm_op(x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None, transpose: bool) -> Tensor:
    """2-D ``x [M, R]`` only; arguments already checked by :func:`int8_weight_mm_triton`."""
    m = x.shape[0]
    n, k = int_data.shape
    n_out = k if transpose else n
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return y
    # Walk int_data as [N_OUT, R]: W for the forward, W.T for the input gradient.
    stride_wr, stride_wo = (int_data.stride(0), int_data.stride(1)) if transpose else int_data.stride()[::-1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_O"]),)

    wrap_triton(_int8_weight_mm_kernel)[grid](
        x,
        int_data,
        scale,
        bias if bias is not None else scale,  # a dummy pointer when the kernel reads no bias
        y,
        m,
        n_out,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        stride_wr,
        stride_wo,
        y.stride(0),
        y.stride(1),
        TRANSPOSE=transpose,
        HAS_BIAS=bias is not None,
        DOT_FP32=x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
    )
    return y


def int8_weight_mm_triton(
    x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None = None, transpose: bool = False
) -> Tensor:
    """Triton version of :func:`int8_weight_mm_reference`: same arguments, result and errors."""
    _check_args(x, int_data, scale, bias, transpose)
    lead = x.shape[:-1]
    y = torch.ops.quantframe.int8_weight_mm(
        x.reshape(-1, x.shape[-1]),  # a view when it can be; the kernel takes any strides
        int_data,
        scale.contiguous(),
        bias.contiguous() if bias is not None else None,
        transpose,
    )
    return y.reshape(*lead, y.shape[-1])


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, w_ptr, K, BLOCK: tl.constexpr):
    """``w[r, :] = int_data[r, :] * scale[r]`` (fp32 product, rounded once to w's dtype)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    w = tl.load(q_ptr + row * K + cols, mask=mask, other=0).to(tl.float32) * tl.load(s_ptr + row)
    if w_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter's fp32 -> bf16 cast truncates
        w = _round_to_bf16(w)
    tl.store(w_ptr + row * K + cols, w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_rowwise_int8_reference(int_data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``int_data [N, K] * scale [N, 1]`` in ``dtype``: the fp32 product, rounded once to ``dtype``."""
    return (int_data * scale.float()[:, None]).to(dtype)


def dequantize_rowwise_int8_triton(int_data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Triton version of :func:`dequantize_rowwise_int8_reference` (bit for bit): one pass, reading
    1 byte and writing 2 per weight."""
    n, k = int_data.shape
    q = int_data.contiguous()
    w = torch.empty((n, k), dtype=dtype, device=q.device)
    if w.numel():
        block = min(2048, triton.next_power_of_2(k))
        _dequantize_kernel[(n, triton.cdiv(k, block))](q, scale.float().contiguous(), w, k, BLOCK=block, num_warps=4)
    return w


def dequantize_rowwise_int8(int_data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The float weight of ``(int_data, scale)`` in ``dtype``: Triton on CUDA, else the reference."""
    impl = dequantize_rowwise_int8_triton if use_triton(int_data) else dequantize_rowwise_int8_reference
    return impl(int_data, scale, dtype)


def _dense_eager(x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None, transpose: bool) -> Tensor:
    w = dequantize_rowwise_int8(int_data, scale, x.dtype)
    if transpose:
        return x @ w
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _dense_traced(x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None, transpose: bool) -> Tensor:
    """The dense path as plain aten ops, for torch.compile: inductor fuses the dequantization into one
    kernel and the matmul goes to cuBLAS, both launched by the compiled graph (no Python per call;
    as an opaque op this path cost ~120 us of host time per call on the H100 machine, which made the
    compiled training step host-bound). On CUDA W is rounded to ``x.dtype`` (as :func:`_dense_eager`);
    elsewhere the math is the reference's fp32.

    The grad-input W is built as convert-then-multiply, the forward's as multiply-then-convert (the
    same values bit for bit). Identical subgraphs in the forward and the backward are merged by
    AOTAutograd's CSE, and the partitioner then keeps W [N, K] alive from forward to backward (+2
    bytes per weight in bf16, +4 in fp32): test_compiled_linear_saves_no_dequantized_weight.
    """
    dtype = x.dtype if x.is_cuda else torch.float32
    s = scale.float()[:, None]
    if transpose:
        w = (int_data.to(torch.float32) * s).to(dtype)
        return (x.to(dtype) @ w).to(x.dtype)
    w = (int_data * s).to(dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)


def int8_weight_mm_dense(
    x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None = None, transpose: bool = False
) -> Tensor:
    """The compute-bound path: ``W`` dequantized once to ``x.dtype`` (a transient ``[N, K]`` copy, freed
    at once), then the dense (cuBLAS) matmul. Same arguments, result (to ``x.dtype`` rounding of
    ``W``) and errors as :func:`int8_weight_mm_reference`. Under torch.compile it traces into
    aten ops (see :func:`_dense_traced`)."""
    _check_args(x, int_data, scale, bias, transpose)
    if is_traced(x):
        return _dense_traced(x, int_data, scale, bias, transpose)
    return _dense_eager(x, int_data, scale, bias, transpose)


def int8_weight_mm(
    x: Tensor, int_data: Tensor, scale: Tensor, bias: Tensor | None = None, transpose: bool = False
) -> Tensor:
    """``x [..., K] @ (int_data [N, K] * scale [N, 1]).T (+ bias [N])``: on CUDA the fused Triton kernel
    below ``DENSE_MIN_ROWS`` rows of x and :func:`int8_weight_mm_dense` from there on; elsewhere the
    reference.

    With ``transpose=True``: ``x [..., N] @ (int_data * scale[:, None]) -> [..., K]``. See
    :func:`int8_weight_mm_reference` for dtypes and errors.
    """
    if use_triton(x):
        if x.dim() and x.shape[-1] and x.numel() // x.shape[-1] >= DENSE_MIN_ROWS:
            return int8_weight_mm_dense(x, int_data, scale, bias, transpose)
        return int8_weight_mm_triton(x, int_data, scale, bias, transpose)
    if is_traced(x):  # traced: the dense path's aten ops (fp32 off CUDA), so the compiled step saves no W
        return int8_weight_mm_dense(x, int_data, scale, bias, transpose)
    return int8_weight_mm_reference(x, int_data, scale, bias, transpose)
