"""INT8 x INT8 -> INT32 matmul with the dequantizing scales fused into the epilogue.

``C = (A_i8 @ B_i8.T) * a_scale[:, None] * b_scale[None, :] (+ bias)``, cast to ``out_dtype``:
``A_i8 [M, K]`` and ``B_i8 [N, K]`` are int8 codes (both in nn.Linear layout: the reduction dim K
last), ``a_scale [M]`` and ``b_scale [N]`` their fp32 row scales. The integer product is exact
(int32 accumulation); the scales factor out of the dot product because each is constant along K.
This is the matmul of INT8 mixed-precision training (SwitchBack / bitsandbytes' vector-wise
MatMul8bit): each of a linear's three matmuls quantizes its operands per row along its reduction
dim and calls this.

Also here: :func:`quantize_colwise_int8`, per-column int8 of ``t [R, C]`` written transposed as
``[C, R]``, which the weight-gradient matmul (reduction over tokens) needs, and
:func:`quantize_rowcol_int8`, both the per-row and the per-column codes of one tensor from two
passes over it (a linear's input and output gradient each feed two INT8 matmuls). Per-row int8
alone is ``quantframe.kernels.int8_rowwise.quantize_rowwise_int8``, not repeated here.

Autotuning: on a GPU ``_int8_scaled_mm_kernel`` is tuned over ``_GPU_CONFIGS`` (H100-sized tiles),
keyed on ``(M, N, K)``. Under ``TRITON_INTERPRET=1`` (read at import, as ``@triton.jit`` does) the
list is one small config: triton's autotuner only benchmarks when it has more than one, and
benchmarking in the interpreter would run every config for real.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import call_op, use_triton
# dp4a, load_words: bare names (inductor resolves a user kernel's jit helpers by name)
from ._weight_mm import dp4a, load_words, word_rows
# round_half_even: a bare name (inductor resolves a user kernel's jit helpers by name)
from .int8_rowwise import _check_args as _check_rowwise_args
from .int8_rowwise import quantize_rowwise_int8_reference, round_half_even

__all__ = [
    "int8_scaled_mm",
    "int8_scaled_mm_reference",
    "int8_scaled_mm_triton",
    "quantize_colwise_int8",
    "quantize_colwise_int8_reference",
    "quantize_colwise_int8_triton",
    "quantize_rowcol_int8",
    "quantize_rowcol_int8_reference",
    "quantize_rowcol_int8_triton",
]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# int32 accumulation of int8 products cannot overflow while K * 127**2 < 2**31.
_MAX_K = (2**31 - 1) // 127**2  # 133144


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# H100: int8 wgmma tiles, K-tile 128 (= 128 B per row, one swizzled smem line); the largest
# (128 x 256 x 128, 3 stages) uses 144 KiB of the 228 KiB shared memory, 4 stages 192 KiB (offered
# untimed for the prefill target, W8A8 4096 x 4096 x 14336 <= 415 us: 474 on the H200; a config that
# does not fit is skipped by the autotuner). The small-M entries serve short batches (M <= 64), where
# a 128-row tile would be mostly padding.
_GPU_CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 256, 128, 8, 4),
    _config(256, 128, 128, 8, 4),
    _config(128, 128, 128, 8, 4),
    _config(128, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 256, 4, 3),
    _config(32, 64, 256, 4, 4),
]
_INTERPRETER_CONFIGS = [_config(32, 32, 32, 4, 1)]  # tl.dot needs block dims >= 16 (K >= 32 for int8 on GPU)
_CONFIGS = _INTERPRETER_CONFIGS if os.environ.get("TRITON_INTERPRET") == "1" else _GPU_CONFIGS


def _check_mm_args(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None, out_dtype) -> None:
    """Raise TypeError / ValueError naming the bad argument, its value and what is allowed."""
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.int8:
            raise TypeError(f"int8_scaled_mm: {name}.dtype={t.dtype}, expected torch.int8")
        if t.dim() != 2:
            raise ValueError(f"int8_scaled_mm: {name} must be 2-D, got shape {tuple(t.shape)}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"int8_scaled_mm: a [M={m}, K={k}] and b [N={n}, K={kb}] must share K")
    if k > _MAX_K:
        raise ValueError(f"int8_scaled_mm: K={k} exceeds {_MAX_K}, past which the int32 accumulator can overflow")
    for name, t, size in (("a_scale", a_scale, m), ("b_scale", b_scale, n), ("bias", bias, n)):
        if t is None:
            continue
        if name != "bias" and t.dtype != torch.float32:
            raise TypeError(f"int8_scaled_mm: {name}.dtype={t.dtype}, expected torch.float32")
        if name == "bias" and not t.is_floating_point():
            raise TypeError(f"int8_scaled_mm: bias.dtype={t.dtype}, expected a float dtype")
        if t.shape != (size,):
            raise ValueError(f"int8_scaled_mm: {name}.shape={tuple(t.shape)}, expected ({size},)")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"int8_scaled_mm: out_dtype={out_dtype}, expected bfloat16, float16 or float32")
    devices = {t.device for t in (a, b, a_scale, b_scale, bias) if t is not None}
    if len(devices) > 1:
        got = sorted(map(str, devices))
        raise ValueError(f"int8_scaled_mm: a, b, a_scale, b_scale and bias must share a device, got {got}")


def _int8_product(a: Tensor, b: Tensor) -> Tensor:
    """``a [M, K] @ b [N, K].T`` in int32, exactly."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.T)  # a real int8 GEMM on CPU, any shape
    # CUDA's _int_mm wants M > 16 and N, K multiples of 8; float64 is exact here instead: every
    # partial sum is an integer below K * 127**2 < 2**31 < 2**53.
    return (a.double() @ b.double().T).to(torch.int32)


def int8_scaled_mm_reference(
    a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:  # fmt: skip
    """``(a @ b.T) * a_scale[:, None] * b_scale[None, :] (+ bias)`` in plain PyTorch.

    Args:
        a: ``[M, K]`` int8 codes, scaled per row by ``a_scale``.
        b: ``[N, K]`` int8 codes, scaled per row by ``b_scale`` (nn.Linear weight layout).
        a_scale: ``[M]`` float32.  b_scale: ``[N]`` float32.
        bias: ``[N]`` float or None, added in fp32.
        out_dtype: bfloat16 (default), float16 or float32.

    Returns:
        ``[M, N]`` in ``out_dtype``: the int32 product, converted to fp32, times ``a_scale``
        then ``b_scale`` (that order), plus bias, rounded once to ``out_dtype``.

    Raises:
        TypeError: a/b not int8, scales not float32, bias not float, out_dtype not a 16/32-bit float.
        ValueError: shapes that do not fit (see above), K > 133144 (int32 overflow), mixed devices.
    """
    _check_mm_args(a, b, a_scale, b_scale, bias, out_dtype)
    y = _int8_product(a, b).float() * a_scale[:, None] * b_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_scaled_mm_kernel(
    a_ptr,  # [M, K] int8
    b_ptr,  # [N, K] int8
    as_ptr,  # [M] fp32
    bs_ptr,  # [N] fp32
    bias_ptr,  # [N] float (read only if HAS_BIAS)
    c_ptr,  # [M, N] out_dtype
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row-tiles sweep the N tiles together, so B tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Ragged M / N edges re-read valid rows (modulo) instead of masking every load; the store is
    # masked. int64: M * K and N * K can pass 2**31 elements.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + offs_k
        mask_k = rk < K  # masked lanes load 0 and add nothing
        a = tl.load(a_ptr + rows_a[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask_k[None, :], other=0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rows_b[None, :] * stride_bn, mask=mask_k[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # INT8 tensor cores, exact int32 sums

    # Epilogue, in the reference's order: fp32(acc) * a_scale * b_scale (+ bias), one rounding.
    mask_m = offs_m < M
    mask_n = offs_n < N
    sa = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
    sb = tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    # fp32 -> out dtype rounds to nearest even on a GPU; the interpreter truncates bf16 instead
    # (numpy has no bf16), so interpreter results may sit one bf16 ulp nearer zero.
    tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---- one row (decode): a GEMV of int32 words, four int8 products a dp4a ----------------------
# H200, W8A8 14336 x 4096, one row under a CUDA graph: 22.1 us against 32.3 for the GEMM's 32-row tiles
# (bf16 30.5, the int8 weight's read 13.9). Off: the GEMM for one row too (tests compare the two).
GEMV_ONE_ROW = True


def _gemv_configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    shapes = [(16, 1024), (32, 512), (32, 1024), (64, 512), (16, 2048)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=3) for n, k in shapes]


@triton.autotune(configs=_gemv_configs(), key=["N", "K"])
@triton.jit
def _int8_gemv_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr,  # as _int8_scaled_mm_kernel, one row of a
    N, K, stride_bn,  # stride_bn in bytes; a and b rows of whole, 4-byte-aligned int32 words (K % 4 == 0)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 4
):  # fmt: skip
    """``c [1, N]`` of :func:`int8_scaled_mm` for one row of ``a``: each program streams ``BLOCK_N``
    rows of ``b`` as int32 words and multiplies each with the matching word of ``a`` in one ``dp4a``
    (exact int32 sums); the GEMM's epilogue, bit for bit."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 4).to(tl.int64)
    a32 = a_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w_idx = k0 // 4 + offs_w
        words = load_words(b_ptr, offs_n, mask_n, w_idx, K // 4, stride_bn)  # 0 past K and N
        aw = tl.load(a32 + w_idx, mask=w_idx < K // 4, other=0)
        acc = dp4a(words, tl.broadcast_to(aw[None, :], words.shape), acc)
    offs_m = tl.arange(0, 1)
    out = tl.sum(acc, axis=1)[None, :].to(tl.float32) * tl.load(as_ptr + offs_m)[:, None]
    out = out * tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask_n[None, :])


# triton_op + wrap_triton: torch.compile traces the kernel instead of graph-breaking (on a GPU;
# under TRITON_INTERPRET=1 fake tensors would reach the interpreted kernel).
def _int8_scaled_mm_impl(
    a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Arguments already checked by :func:`int8_scaled_mm_triton`."""
    (m, k), n = a.shape, b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(c))
    if GEMV_ONE_ROW and m == 1 and word_rows(a, 4, k) and word_rows(b, 4, k) and c.stride(1) == 1:
        wrap_triton(_int8_gemv_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            a, b, a_scale, b_scale, bias if bias is not None else a_scale, c, n, k, b.stride(0),
            HAS_BIAS=bias is not None,
        )  # fmt: skip
        return c
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_int8_scaled_mm_kernel)[grid](
        a, b, a_scale, b_scale,
        bias if bias is not None else a_scale,  # a dummy pointer when the kernel reads no bias
        c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    return c


# Registered from the plain function, which eager calls take directly where they can (call_op).
_int8_scaled_mm_op = triton_op("quantframe::int8_scaled_mm", mutates_args=())(_int8_scaled_mm_impl)


def _k_major(t: Tensor) -> Tensor:
    # Hopper's int8 wgmma reads its operands K-major from shared memory. For an operand that is
    # not, triton transposes every tile on the way and keeps fewer in flight (sm_90 build of the
    # 128x128x128 config: 80 KiB of pipeline buffers instead of 128 KiB). One int8 copy is cheaper.
    return t if t.stride(1) == 1 else t.contiguous()


def int8_scaled_mm_triton(
    a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:  # fmt: skip
    """Triton version of :func:`int8_scaled_mm_reference`: same arguments, result and errors."""
    _check_mm_args(a, b, a_scale, b_scale, bias, out_dtype)
    return call_op(
        torch.ops.quantframe.int8_scaled_mm, _int8_scaled_mm_impl,
        _k_major(a), _k_major(b), a_scale.contiguous(), b_scale.contiguous(),
        bias.contiguous() if bias is not None else None, out_dtype,
    )  # fmt: skip


def int8_scaled_mm(
    a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:  # fmt: skip
    """``(a [M, K] @ b [N, K].T) * a_scale[:, None] * b_scale[None, :] (+ bias)``: Triton on CUDA, else reference.

    See :func:`int8_scaled_mm_reference` for dtypes and errors.
    """
    if use_triton(a):
        return int8_scaled_mm_triton(a, b, a_scale, b_scale, bias, out_dtype)
    return int8_scaled_mm_reference(a, b, a_scale, b_scale, bias, out_dtype)


# ---- column-wise quantization, transposed output -------------------------------------------------
def _check_colwise_args(t: Tensor) -> None:
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"quantize_colwise_int8: t must be 2-D [R, C] with R >= 1, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_colwise_int8: t.dtype={t.dtype}, expected float32, float16 or bfloat16")


def quantize_colwise_int8_reference(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column symmetric int8 of ``t [R, C]``, transposed: ``(q int8 [C, R] contiguous, scale fp32 [C])``.

    Exactly ``quantize_rowwise_int8_reference(t.T)`` (round to nearest, scale = absmax / 127,
    1e-12 for an all-zero column), laid out contiguous: the K-major operand of a matmul whose
    reduction runs over ``t``'s rows (the weight gradient's tokens).

    Raises:
        ValueError: ``t`` not 2-D with R >= 1.  TypeError: ``t`` not a 16/32-bit float.
    """
    _check_colwise_args(t)
    q, scale = quantize_rowwise_int8_reference(t.T)
    return q.contiguous(), scale


@triton.jit
def _colwise_absmax_kernel(t_ptr, amax_ptr, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One [BLOCK_R, BLOCK_C] tile per program; column maxima meet in amax (fp32, zeroed) through
    # atomic max, which is order-free, so the result is deterministic.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    t = tl.load(t_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    tl.atomic_max(amax_ptr + cols, tl.max(tl.abs(t.to(tl.float32)), axis=0), mask=cols < C)


@triton.jit
def _colwise_quantize_kernel(
    t_ptr, amax_ptr, q_ptr, s_ptr, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = cols < C
    mask = (rows < R)[:, None] & mask_c[None, :]
    # IEEE division (div_rn) and the same round-half-even trick as int8_rowwise: bit-exact vs torch.
    scale = tl.maximum(tl.math.div_rn(tl.load(amax_ptr + cols, mask=mask_c, other=0.0), 127.0), 1e-12)
    if tl.program_id(0) == 0:
        tl.store(s_ptr + cols, scale, mask=mask_c)
    t = tl.load(t_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    v = tl.math.div_rn(t.to(tl.float32), scale[None, :])
    v = round_half_even(v)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    tl.store(q_ptr + cols[None, :] * R + rows[:, None], v.to(tl.int8), mask=mask)  # q is [C, R]


@triton_op("quantframe::quantize_colwise_int8", mutates_args=())
def _quantize_colwise_int8_op(t: Tensor) -> tuple[Tensor, Tensor]:
    """Arguments already checked by :func:`quantize_colwise_int8_triton`."""
    r, c = t.shape
    q = torch.empty((c, r), dtype=torch.int8, device=t.device)
    amax = torch.zeros((c,), dtype=torch.float32, device=t.device)
    scale = torch.empty((c,), dtype=torch.float32, device=t.device)
    if c == 0:
        return q, scale
    block_r, block_c = 64, 64
    grid = (triton.cdiv(r, block_r), triton.cdiv(c, block_c))
    strides = (t.stride(0), t.stride(1))
    wrap_triton(_colwise_absmax_kernel)[grid](t, amax, r, c, *strides, BLOCK_R=block_r, BLOCK_C=block_c)
    wrap_triton(_colwise_quantize_kernel)[grid](t, amax, q, scale, r, c, *strides, BLOCK_R=block_r, BLOCK_C=block_c)
    return q, scale


def quantize_colwise_int8_triton(t: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`quantize_colwise_int8_reference` (bit-exact); any strides of ``t``.

    Two passes over ``t`` in 2-D tiles (absmax, then codes), so even a few columns of a
    many-row activation spread over the whole GPU.
    """
    _check_colwise_args(t)
    return torch.ops.quantframe.quantize_colwise_int8(t)


def quantize_colwise_int8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column int8 of ``t [R, C]`` -> ``(int8 [C, R], fp32 [C])``: Triton on CUDA, else reference."""
    if use_triton(t):
        return quantize_colwise_int8_triton(t)
    return quantize_colwise_int8_reference(t)


# ---- per-row and per-column codes of one tensor, two passes -----------------------------------
def _check_rowcol_args(t: Tensor, col_scale: Tensor | None) -> None:
    _check_colwise_args(t)
    _check_rowwise_args(t, None, col_scale)


def quantize_rowcol_int8_reference(
    t: Tensor, col_scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q_row, s_row, q_col, s_col)``: ``quantize_rowwise_int8_reference(t, col_scale=col_scale)``
    (int8 ``[R, C]``, fp32 ``[R]``) and ``quantize_colwise_int8_reference(t)`` (int8 ``[C, R]``,
    fp32 ``[C]``): the codes a linear's input (output GEMM, weight gradient) or output gradient
    (input gradient, weight gradient; ``col_scale`` the int8 weight's row scale) feed two INT8
    matmuls with. Raises as those two (``t [R, C]`` with R, C >= 1).
    """
    _check_rowcol_args(t, col_scale)
    q_row, s_row = quantize_rowwise_int8_reference(t, col_scale=col_scale)
    q_col, s_col = quantize_colwise_int8_reference(t)
    return q_row, s_row, q_col, s_col


@triton.jit
def _rowcol_absmax_kernel(
    t_ptr, cs_ptr, row_ptr, col_ptr, R, C, stride_r, stride_c,
    HAS_COL_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # _colwise_absmax_kernel's tiles, plus each tile's row maxima (of t * col_scale) into row_ptr:
    # both through atomic max of non-negative fp32, order-free, so deterministic.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    t = tl.load(t_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_max(col_ptr + cols, tl.max(tl.abs(t), axis=0), mask=cols < C)
    if HAS_COL_SCALE:
        t = t * tl.load(cs_ptr + cols, mask=cols < C, other=0.0)[None, :]
    tl.atomic_max(row_ptr + rows, tl.max(tl.abs(t), axis=1), mask=rows < R)


@triton.jit
def _rowcol_quantize_kernel(
    t_ptr, cs_ptr, row_ptr, col_ptr, qr_ptr, sr_ptr, qc_ptr, sc_ptr, R, C, stride_r, stride_c,
    HAS_COL_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_r, mask_c = rows < R, cols < C
    mask = mask_r[:, None] & mask_c[None, :]
    # the scales and codes of quantize_rowwise_int8 / _colwise_quantize_kernel, bit for bit
    s_row = tl.maximum(tl.math.div_rn(tl.load(row_ptr + rows, mask=mask_r, other=0.0), 127.0), 1e-12)
    s_col = tl.maximum(tl.math.div_rn(tl.load(col_ptr + cols, mask=mask_c, other=0.0), 127.0), 1e-12)
    if tl.program_id(1) == 0:
        tl.store(sr_ptr + rows, s_row, mask=mask_r)
    if tl.program_id(0) == 0:
        tl.store(sc_ptr + cols, s_col, mask=mask_c)
    t = tl.load(t_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(t, s_col[None, :])), -127.0), 127.0)
    tl.store(qc_ptr + cols[None, :] * R + rows[:, None], v.to(tl.int8), mask=mask)  # q_col is [C, R]
    if HAS_COL_SCALE:
        t = t * tl.load(cs_ptr + cols, mask=mask_c, other=0.0)[None, :]
    v = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(t, s_row[:, None])), -127.0), 127.0)
    tl.store(qr_ptr + rows[:, None] * C + cols[None, :], v.to(tl.int8), mask=mask)


@triton_op("quantframe::quantize_rowcol_int8", mutates_args=())
def _quantize_rowcol_int8_op(t: Tensor, col_scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Arguments already checked by :func:`quantize_rowcol_int8_triton`."""
    r, c = t.shape
    q_row = torch.empty((r, c), dtype=torch.int8, device=t.device)
    q_col = torch.empty((c, r), dtype=torch.int8, device=t.device)
    s_row = torch.empty((r,), dtype=torch.float32, device=t.device)
    s_col = torch.empty((c,), dtype=torch.float32, device=t.device)
    amax_row = torch.zeros((r,), dtype=torch.float32, device=t.device)
    amax_col = torch.zeros((c,), dtype=torch.float32, device=t.device)
    grid = (triton.cdiv(r, 64), triton.cdiv(c, 64))
    cs = col_scale if col_scale is not None else amax_col  # a dummy pointer without col_scale
    strides = (t.stride(0), t.stride(1))
    wrap_triton(_rowcol_absmax_kernel)[grid](
        t, cs, amax_row, amax_col, r, c, *strides, HAS_COL_SCALE=col_scale is not None, BLOCK_R=64, BLOCK_C=64
    )  # fmt: skip
    wrap_triton(_rowcol_quantize_kernel)[grid](
        t, cs, amax_row, amax_col, q_row, s_row, q_col, s_col, r, c, *strides,
        HAS_COL_SCALE=col_scale is not None, BLOCK_R=64, BLOCK_C=64,
    )  # fmt: skip
    return q_row, s_row, q_col, s_col


def quantize_rowcol_int8_triton(
    t: Tensor, col_scale: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton version of :func:`quantize_rowcol_int8_reference` (bit for bit): two passes over ``t``
    in 2-D tiles (row and column maxima, then both codes) where the row-wise and column-wise
    quantizers make three (the row-wise kernel re-reads each row from cache)."""
    _check_rowcol_args(t, col_scale)
    return torch.ops.quantframe.quantize_rowcol_int8(t, None if col_scale is None else col_scale.contiguous())


def quantize_rowcol_int8(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (of ``t * col_scale``) and per-column int8 codes of ``t [R, C]``: Triton on CUDA, else
    the reference."""
    if use_triton(t):
        return quantize_rowcol_int8_triton(t, col_scale)
    return quantize_rowcol_int8_reference(t, col_scale)
