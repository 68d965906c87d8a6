"""Matmul of float activations with an affine 8- or 4-bit weight, dequantized inside the kernel.

``y [..., N] = x [..., K] @ W.T (+ bias [N])`` with ``W[n, k] = (code[n, k] - zero_point[n, g]) *
scale[n, g]``, ``g = k // group_size`` (the layout of :class:`quantframe.affine.AffineQuantizedTensor`).
Each program reads its slice of the packed weight once and never writes ``W`` in float:

* one row of x (decode): ``_affine_gemv_kernel``, one program per ``BLOCK_N`` output features, a
  multiply-and-sum on CUDA cores; 4-bit codes with whole int32 words per row take
  ``_int4_words_row`` (K tiles of up to 1024 codes, several groups each).
* 2-16 rows: ``_affine_gemm_kernel``'s skinny tiles (``BLOCK_M = 16``, tensor cores); from 17 rows the
  dispatcher dequantizes W once and calls the dense matmul (``_weight_mm.DENSE_MIN_ROWS``).

Codes become floats without an int-to-float instruction (``_codes_minus_zero``: the code in the
mantissa of 2**23, one float subtract), exact; on tensor cores the exact ``code - zero_point`` goes
to bf16 by taking the high half of its fp32 bits, and each group's scale multiplies the fp32 partial
sum of its ``BLOCK_K`` slice (which never straddles a group). Accumulation is fp32; the result is
cast to ``x.dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from quantframe import primitives as P

from . import _weight_mm as wmm
# bare names: inductor resolves a user kernel's jit helpers by name
from ._weight_mm import bias_and_store, load_words, x_column
from . import call_op, use_triton

__all__ = [
    "affine_dequantize",
    "affine_dequantize_triton",
    "affine_mm",
    "affine_mm_dense",
    "affine_mm_reference",
    "affine_mm_triton",
]

FUSED_MAX_ROWS = wmm.FUSED_MAX_ROWS  # up to this many rows of x, the fused kernels (see _weight_mm.launch)

_KERNEL_BITS = (8, 4, 3, 2)
_CODES_PER_UNIT = {8: 1, 4: 2, 3: 8, 2: 4}  # K must be a multiple of this (3-bit: 8 codes in 3 bytes)


def _check_args(
    x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int | None, bias: Tensor | None
) -> None:
    """Raise TypeError / ValueError naming the bad argument, its value and what is allowed."""
    if bits not in _CODES_PER_UNIT:
        raise ValueError(f"affine_mm: bits={bits!r} is not supported; expected one of (8, 4, 3, 2)")
    if not x.dtype.is_floating_point:
        raise TypeError(f"affine_mm: x.dtype={x.dtype}, expected a float dtype")
    allowed = (torch.int8, torch.uint8) if bits == 8 else (torch.uint8,)
    if qdata.dtype not in allowed:
        raise TypeError(
            f"affine_mm: qdata.dtype={qdata.dtype}, expected {' or '.join(map(str, allowed))} for bits={bits}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"affine_mm: scale.dtype={scale.dtype}, expected a float dtype")
    if zero_point.is_floating_point() or zero_point.is_complex() or zero_point.dtype == torch.bool:
        raise TypeError(f"affine_mm: zero_point.dtype={zero_point.dtype}, expected an integer dtype (int32)")
    if qdata.dim() != 2:
        raise ValueError(f"affine_mm: qdata must be 2-D [N, K * bits // 8], got shape {tuple(qdata.shape)}")
    if x.dim() == 0:
        raise ValueError("affine_mm: x must have at least one dim [..., K], got a scalar")
    n, k = qdata.shape[0], x.shape[-1]
    per = _CODES_PER_UNIT[bits]
    if k % per:
        raise ValueError(f"affine_mm: {bits}-bit packing needs K={k} (x.shape[-1]) to be a multiple of {per}")
    if qdata.shape[1] != k * bits // 8:
        raise ValueError(
            f"affine_mm: qdata.shape={tuple(qdata.shape)} does not hold K={k} {bits}-bit codes per row "
            f"(expected [N, {k * bits // 8}]; K is x.shape[-1]={k})"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"affine_mm: group_size={group_size!r} must be None (per row) or a positive int")
    if group_size is not None and k % group_size:
        raise ValueError(f"affine_mm: group_size={group_size} must divide K={k}")
    g = 1 if group_size is None else k // group_size
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.shape != (n, g):
            raise ValueError(
                f"affine_mm: {name}.shape={tuple(t.shape)}, expected ({n}, {g}) for N={n}, K={k}, group_size={group_size}"
            )
    tensors = {"x": x, "qdata": qdata, "scale": scale, "zero_point": zero_point, "bias": bias}
    wmm.check_bias_and_devices("affine_mm", n, bias, tensors)


def _dequantize(qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """fp32 ``W [N, K]`` of the codes (the numerics of ``AffineQuantizedTensor.dequantize``)."""
    codes = qdata if bits == 8 else P.unpack_bits(qdata, bits)
    return P.dequantize(codes, scale, zero_point, torch.float32)


def affine_mm_reference(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
) -> Tensor:
    """``x @ dequant(qdata, scale, zero_point).T (+ bias)`` in fp32, cast to ``x.dtype``.

    Args:
        x: ``[..., K]`` float activations.
        qdata: ``[N, K]`` int8 / uint8 codes (bits 8), or uint8 ``[N, K * bits // 8]`` codes packed
            by :func:`quantframe.primitives.pack_bits` (bits 4, 3, 2).
        scale: ``[N, G]`` float; ``zero_point``: ``[N, G]`` integer (int32); ``G = 1`` when
            ``group_size`` is None, else ``K // group_size``.
        bits: 8, 4, 3 or 2 (the Triton kernels take 8 and 4).
        group_size: None (one group per row) or a divisor of ``K``.
        bias: ``[N]`` float or None.

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Raises:
        TypeError: a wrong dtype (x / scale / bias not float, qdata not int8/uint8, zero_point float).
        ValueError: unsupported bits, mismatched shapes or devices, a group_size not dividing K, or
            a K that is not a multiple of the packing unit (even for 4 bits).
    """
    _check_args(x, qdata, scale, zero_point, bits, group_size, bias)
    w = _dequantize(qdata, scale, zero_point, bits)
    # One op: the aten trace (and its snapshot in test/test_affine.py) is that of a dense layer.
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# ---- Triton ------------------------------------------------------------------------------------
@triton.jit
def _packed_bytes(q_ptr, offs_n, mask_n, byte, n_bytes, stride_qn, stride_qk):
    """The bytes ``qdata[offs_n, byte]`` of a ``[BLOCK_N, len(byte)]`` tile, zero-extended to int32
    (int8 qdata too); 0 past ``n_bytes``."""
    b = tl.load(
        q_ptr + offs_n[:, None] * stride_qn + byte[None, :] * stride_qk,
        mask=mask_n[:, None] & (byte < n_bytes)[None, :],
        other=0,
    )
    return b.to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def _codes_minus_zero(
    q_ptr, z_ptr, offs_n, mask_n, k0, K, g, stride_qn, stride_qk, stride_zn, stride_zg,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 ``code - zero_point`` of the ``[BLOCK_N, BLOCK_K]`` weight tile at column ``k0`` (group ``g``),
    exact; lanes past ``K`` hold ``-zero_point`` (and -128 for int8 codes) and must meet zeros of x.

    No int-to-float conversion: the unsigned code ``u`` (an int8 code + 128) becomes the mantissa of
    2**23 (the float with bits ``0x4B000000 | u`` is ``2**23 + u``), and one float subtract of
    ``2**23 + zero_point (+ 128)`` leaves ``code - zero_point``. The conversion instruction (I2F, a
    quarter-rate op on sm_90) and the zero point's integer subtract were the decode kernels' limit:
    ~30 us for the int4 g128 GEMV at 4096 -> 14336 on H200, against a 7.4 us memory floor."""
    offset: tl.constexpr = 128.0 if q_ptr.dtype.element_ty == tl.int8 else 0.0
    if BITS == 8:  # one code per byte
        u = _packed_bytes(q_ptr, offs_n, mask_n, k0 + tl.arange(0, BLOCK_K).to(tl.int64), K, stride_qn, stride_qk)
        if offset != 0.0:  # int8 code + 128 in [0, 255], flipping the sign bit of the zero-extended byte
            u = u ^ 0x80
    elif BITS == 4:
        # Two codes per byte, element 2i in the low nibble. The tile's BLOCK_K / 2 bytes are loaded
        # as one contiguous run (vectorized), then the nibbles interleaved back into K order: loading
        # byte rk // 2 per element made two lanes load every byte with scalar loads (the 4-bit GEMV
        # ran at ~125 GB/s on H100).
        pk = k0 // 2 + tl.arange(0, BLOCK_K // 2).to(tl.int64)
        p = _packed_bytes(q_ptr, offs_n, mask_n, pk, K // 2, stride_qn, stride_qk)  # K is even for 4 bits
        u = tl.interleave(p & 15, p >> 4)
    elif BITS == 2:  # four codes per byte, element 4i + j in bits 2j..2j+1 of byte i
        pk = k0 // 4 + tl.arange(0, BLOCK_K // 4).to(tl.int64)
        p = _packed_bytes(q_ptr, offs_n, mask_n, pk, K // 4, stride_qn, stride_qk)
        u = tl.interleave(tl.interleave(p & 3, (p >> 4) & 3), tl.interleave((p >> 2) & 3, p >> 6))
    else:  # 3 bits: eight codes in three bytes (a 24-bit little-endian word), element 8u + j in bits 3j..3j+2
        w3 = k0 // 8 + tl.arange(0, BLOCK_K // 8).to(tl.int64)
        word = _packed_bytes(q_ptr, offs_n, mask_n, 3 * w3, 3 * (K // 8), stride_qn, stride_qk)
        word |= _packed_bytes(q_ptr, offs_n, mask_n, 3 * w3 + 1, 3 * (K // 8), stride_qn, stride_qk) << 8
        word |= _packed_bytes(q_ptr, offs_n, mask_n, 3 * w3 + 2, 3 * (K // 8), stride_qn, stride_qk) << 16
        even = tl.interleave(  # codes 0, 2, 4, 6 of each unit
            tl.interleave(word & 7, (word >> 12) & 7), tl.interleave((word >> 6) & 7, (word >> 18) & 7)
        )
        odd = tl.interleave(  # codes 1, 3, 5, 7
            tl.interleave((word >> 3) & 7, (word >> 15) & 7), tl.interleave((word >> 9) & 7, word >> 21)
        )
        u = tl.interleave(even, odd)
    z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
    return (u ^ 0x4B000000).to(tl.float32, bitcast=True) - (z + (8388608.0 + offset))[:, None]


@triton.jit
def _exact_16bit(w, dtype: tl.constexpr):
    """fp32 small integers ``w`` (|w| <= 256) as ``dtype`` (bf16 / fp16), exact. bf16 is the high half
    of the fp32 bits (the low half is zero for such integers): no conversion instruction."""
    if dtype == tl.bfloat16:
        return (w.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w.to(dtype)


@triton.jit
def _int4_words_row(
    x_ptr, q_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_xk, stride_qn, stride_sn, stride_sg, stride_zn, stride_zg,
    magic, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 ``[BLOCK_N, 1]`` = one row of x times 4-bit codes read as int32 words (``qdata`` rows
    4-byte aligned, ``K % 8 == 0``; ``stride_qn`` in bytes, codes contiguous along K).

    Word ``i`` of a row holds elements ``8i + j`` in bits ``4j .. 4j + 3``. Nibble ``j < 4`` is masked
    in place: ``(word & 15 << 4j) | magic`` (``magic`` = 0x4B000000, a kernel argument so that one
    three-input logic op does both) is the float ``2**23 + code * 16**j``; nibbles 4-7 the same from
    ``word >> 16``. A float subtract of ``2**23`` (exact) and an FMA with ``x[8i + j] / 16**j`` (exact)
    finish each weight: three instructions, no int-to-float conversion. The zero point comes off as
    ``zero_point * sum(x)`` and the scale multiplies once per word (a group per tile) or once per
    group (tiles of several groups: each group's words summed first). The nibbles are never
    interleaved back into K order: x is read in the words' order (eight strided slices, from L1)."""
    magic = tl.cast(magic, tl.int32)  # the interpreter passes Python ints as int64; inductor as constants
    offs_w = tl.arange(0, BLOCK_K // 8).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K // max(GROUP_SIZE, 8)), dtype=tl.float32)  # tiles of several groups
    for k0 in range(0, K, BLOCK_K):
        g = 0 if GROUP_SIZE == 0 else k0 // GROUP_SIZE
        # 1,024-code tiles put the 32 threads of a warp along K (4 words each, one 16-byte load) and
        # the warps along N, so few threads share a row's x values
        w_idx = k0 // 8 + offs_w
        mask_w = w_idx < K // 8
        word = load_words(q_ptr, offs_n, mask_n, w_idx, K // 8, stride_qn)
        high = word >> 16  # nibbles 4-7 in bits 0-15 (the sign bits above are masked off)
        part = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        # x[8i .. 8i + 7] as one [W, 8] load (each thread's eight contiguous), split per code in registers
        xb = tl.load(x_ptr + (8 * w_idx[:, None] + tl.arange(0, 8)[None, :]) * stride_xk, mask=mask_w[:, None],
                     other=0.0).to(tl.float32)  # fmt: skip
        for j in tl.static_range(8):
            half = word if j < 4 else high
            f = ((half & (15 << 4 * (j % 4))) | magic).to(tl.float32, bitcast=True) - 8388608.0  # code * 16**(j % 4)
            xj = x_column(xb, j, BLOCK_K // 8)
            x_sum += xj
            part += f * (xj * (1.0 / (1 << 4 * (j % 4))))[None, :]
        if GROUP_SIZE == 0 or GROUP_SIZE >= BLOCK_K:  # one group per row of the tile
            z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
            part -= z[:, None] * x_sum[None, :]
            if GROUP_SIZE == 0:
                acc += part
            else:
                acc += part * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
        else:  # several groups along the tile: sum each group's words, then its zero point and scale
            WPG: tl.constexpr = GROUP_SIZE // 8  # words per group
            gs = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
            mask = mask_n[:, None] & (gs < K // GROUP_SIZE)[None, :]
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + gs[None, :] * stride_zg, mask=mask, other=0)
            part_g = tl.sum(tl.reshape(part, (BLOCK_N, BLOCK_K // GROUP_SIZE, WPG)), axis=2)
            x_g = tl.sum(tl.reshape(x_sum, (BLOCK_K // GROUP_SIZE, WPG)), axis=1)
            s_g = tl.load(s_ptr + offs_n[:, None] * stride_sn + gs[None, :] * stride_sg, mask=mask, other=0.0)
            acc_g += (part_g - z.to(tl.float32) * x_g[None, :]) * s_g
    if GROUP_SIZE != 0 and GROUP_SIZE < BLOCK_K:
        out = tl.sum(acc_g, axis=1)[:, None]
    else:
        out = tl.sum(acc, axis=1)[:, None]
    if GROUP_SIZE == 0:
        out = out * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[:, None]
    return out


# (BLOCK_N, BLOCK_K); long K tiles (256, 512) measured fastest for one row on H200 (int8 16 x 256:
# 20.7 us against 28.0 at 16 x 128); they reach past a group only in _int4_words_row (prune_gemv).
# 2,048 and 4,096 (words only: the prune drops them elsewhere) are untimed candidates: for the NF4 and
# ternary word GEMVs the best tiles were 8 x 4,096 / 16 x 2,048 (H200, stop 16).
_GEMV_SHAPES = [
    (16, 16), (16, 32), (16, 64), (32, 32), (16, 128), (32, 64), (32, 128), (64, 64), (32, 256), (64, 128),
    (16, 256), (16, 512), (8, 512), (8, 1024), (16, 1024), (32, 1024), (8, 2048), (16, 2048), (8, 4096),
]  # fmt: skip


@triton.autotune(
    configs=wmm.gemv_configs(_GEMV_SHAPES, interpreter_block_k=16),  # (BLOCK_N, BLOCK_K) at 4 warps
    key=["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M"],
    prune_configs_by={"early_config_prune": wmm.prune_gemv("GROUP_SIZE", "WORDS")},
)
@triton.jit
def _affine_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # x [M, K], qdata, scale/zero_point [N, G], bias [N], y [M, N]
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    magic,  # 0x4B000000 (see _int4_words_row)
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # 0: one group per row
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # next power of two >= M (<= 16): every row of x in one program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE: one scale per row of a tile
    WORDS: tl.constexpr,  # one row, 4 bits: qdata read as int32 words (_int4_words_row)
):  # fmt: skip
    # Decode is bound by reading the weight: each program streams its [BLOCK_N, K] slice once and
    # multiplies it with all M rows of x (tiny, read from L1/L2 by every program).
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    if WORDS:  # one row (the host's choice), 4 bits
        acc = _int4_words_row(
            x_ptr, q_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_xk, stride_qn, stride_sn, stride_sg, stride_zn,
            stride_zg, magic, GROUP_SIZE, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)
        return
    if BLOCK_M == 1:
        # One token: elementwise products accumulate in a [BLOCK_N, BLOCK_K] tile and are reduced
        # across K once at the end, not once per tile (a cross-lane reduction per iteration).
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            g = 0 if GROUP_SIZE == 0 else k0 // GROUP_SIZE
            w = _codes_minus_zero(
                q_ptr, z_ptr, offs_n, mask_n, k0, K, g, stride_qn, stride_qk, stride_zn, stride_zg, BITS, BLOCK_N,
                BLOCK_K,
            )  # fmt: skip
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            xv = tl.load(x_ptr + rk * stride_xk, mask=rk < K, other=0.0).to(tl.float32)  # zeros past K
            if GROUP_SIZE != 0:
                w = w * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
            acc1 += w * xv[None, :]
        acc = tl.sum(acc1, axis=1)[:, None]  # [BLOCK_N, 1]
        if GROUP_SIZE == 0:
            acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[:, None]
        bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)
        return
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = 0 if GROUP_SIZE == 0 else k0 // GROUP_SIZE
        w = _codes_minus_zero(
            q_ptr, z_ptr, offs_n, mask_n, k0, K, g, stride_qn, stride_qk, stride_zn, stride_zg, BITS, BLOCK_N, BLOCK_K
        )
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        xt = tl.load(
            x_ptr + rk[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=(rk < K)[:, None] & mask_m[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_K, BLOCK_M]; zeros past K cancel the -zero_point lanes of w
        part = tl.sum(w[:, :, None] * xt[None, :, :], axis=1)  # [BLOCK_N, BLOCK_M], exact codes x fp32 x
        if GROUP_SIZE == 0:
            acc += part
        else:
            acc += part * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
    if GROUP_SIZE == 0:  # per row: one multiply per output, not per weight
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[:, None]
    bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


@triton.autotune(
    configs=wmm.gemm_configs([*wmm.GEMM_SHAPES, (64, 64, 16, 4, 4)], interpreter_block_k=16),
    key=["M", "N", "K", "BITS", "GROUP_SIZE", "DOT_FP32"],
    prune_configs_by={"early_config_prune": wmm.prune_gemm("GROUP_SIZE")},
)
@triton.jit
def _affine_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # as in _affine_gemv_kernel
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # 0: one group per row
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles (fp32 x, or the interpreter); else x's 16-bit dtype
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE
):  # fmt: skip
    # y.T [N, M] = W [N, K] @ x.T [K, M]: the dequantized weight is the dot's first operand, which
    # Hopper's wgmma may take from registers (as in int8_weight_mm). Programs along axis 0 share
    # one x tile, read from L2.
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = 0 if GROUP_SIZE == 0 else k0 // GROUP_SIZE
        w = _codes_minus_zero(
            q_ptr, z_ptr, offs_n, mask_n, k0, K, g, stride_qn, stride_qk, stride_zn, stride_zg, BITS, BLOCK_N, BLOCK_K
        )
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        xt = tl.load(
            x_ptr + rk[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=(rk < K)[:, None] & mask_m[None, :],
            other=0.0,
        )
        if DOT_FP32:  # fp32 x needs fp32 products; the interpreter's bf16 dot is wrong (numpy has no bf16)
            if GROUP_SIZE != 0:
                w = w * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        elif GROUP_SIZE == 0:  # per row: code - zero_point in [-255, 255] is exact in bf16/fp16
            acc = tl.dot(_exact_16bit(w, xt.dtype), xt, acc)
        elif BLOCK_M <= 32:  # a few rows: exact codes, the group's scale on its fp32 partial sum
            part = tl.dot(_exact_16bit(w, xt.dtype), xt)
            acc += part * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
        else:
            # Larger tiles scale the tile before the dot, rounding W to x's dtype as a dense 16-bit
            # layer holds it: a second [BLOCK_N, BLOCK_M] fp32 partial sum would spill (sm_90).
            w = w * tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[:, None]
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    if GROUP_SIZE == 0:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[:, None]
    bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _affine_dequantize_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr,  # qdata, scale/zero_point [N, G], W [N, K] out
    N, K,
    stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # 0: one group per row
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE
):  # fmt: skip
    """``W = (code - zero_point) * scale`` in fp32 (as :func:`quantframe.primitives.dequantize`), stored
    in ``w_ptr``'s dtype: one ``[BLOCK_N, BLOCK_K]`` tile a program."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    g = 0 if GROUP_SIZE == 0 else k0 // GROUP_SIZE
    w = _codes_minus_zero(
        q_ptr, z_ptr, offs_n, mask_n, k0, K, g, stride_qn, stride_qk, stride_zn, stride_zg, BITS, BLOCK_N, BLOCK_K
    )
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
    rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = mask_n[:, None] & (rk < K)[None, :]
    tl.store(w_ptr + offs_n[:, None] * K + rk[None, :], (w * s[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


# triton_op + wrap_triton let torch.compile trace into the kernels (on a GPU; under
# TRITON_INTERPRET=1 fake tensors would reach the interpreted kernel).
def _affine_mm_impl(
    x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int, bias: Tensor | None
) -> Tensor:
    """2-D ``x [M, K]``; ``group_size`` 0 = per row; arguments checked by :func:`affine_mm_triton`."""
    weights = (qdata, scale, zero_point)
    strides = (*qdata.stride(), *scale.stride(), *zero_point.stride())  # all 2-D
    constexprs = {"BITS": bits, "GROUP_SIZE": group_size}
    words = x.shape[0] == 1 and bits == 4 and wmm.word_rows(qdata, 8, x.shape[1])
    return wmm.launch(
        _affine_gemv_kernel, _affine_gemm_kernel, x, weights, strides, bias, qdata.shape[0],
        {"magic": wmm.MAGIC_BITS, "WORDS": words}, **constexprs,
    )  # fmt: skip


# Registered from the plain function, which eager calls take directly where they can (call_op).
_affine_mm_op = triton_op("quantframe::affine_mm", mutates_args=())(_affine_mm_impl)


def _setup_context(ctx, inputs, output):
    x, qdata, scale, zero_point, bits, group_size, bias = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.bits, ctx.group_size, ctx.x_dtype, ctx.has_bias = bits, group_size or None, x.dtype, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    # Inference weights: gradients reach x (and bias), never the codes. grad_x = grad @ W: on CUDA
    # W dequantized once into grad's dtype (one pass, a 16-bit matmul); elsewhere fp32 math.
    qdata, scale, zero_point = ctx.saved_tensors
    dtype = grad.dtype if grad.is_cuda else torch.float32
    w = affine_dequantize(qdata, scale, zero_point, ctx.bits, ctx.group_size, dtype)
    grad_x = (grad.to(dtype) @ w).to(ctx.x_dtype)
    grad_bias = grad.float().sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias


_affine_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_problem(x: Tensor, bits: int, group_size: int | None) -> Exception | None:
    """Why the Triton kernels cannot take these (otherwise valid) arguments; None when they can."""
    if bits not in _KERNEL_BITS:
        return ValueError(f"affine_mm_triton: bits={bits!r} is not supported; expected one of {_KERNEL_BITS}")
    if (problem := wmm.x_dtype_problem(x, "affine_mm_triton")) is not None:
        return problem
    if group_size is not None and (group_size < 16 or group_size & (group_size - 1)):
        return ValueError(f"affine_mm_triton: group_size={group_size} must be None or a power of two >= 16")
    return None


def affine_mm_triton(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
) -> Tensor:
    """Triton version of :func:`affine_mm_reference` for bits 8 and 4, x in fp32/fp16/bf16 and
    group_size None or a power of two >= 16 (else ValueError / TypeError); the GEMV kernel for one
    row of x, the GEMM kernel from ``_weight_mm.MMA_MIN_ROWS`` rows on."""
    _check_args(x, qdata, scale, zero_point, bits, group_size, bias)
    problem = _kernel_problem(x, bits, group_size)
    if problem is not None:
        raise problem
    lead = x.shape[:-1]
    y = call_op(
        torch.ops.quantframe.affine_mm, _affine_mm_impl,
        x.reshape(-1, x.shape[-1]),  # a view when it can be; the kernels take any strides
        qdata,
        scale.float(),
        zero_point.to(torch.int32),
        bits,
        group_size or 0,
        bias,
    )
    return y.reshape(*lead, y.shape[-1])


def affine_dequantize_triton(
    qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int | None, dtype: torch.dtype
) -> Tensor:
    """Triton version of :func:`affine_dequantize` (bit for bit), one pass writing ``W [N, K]``, for
    bits 8 / 4 / 3 / 2 and group_size None or a power of two >= 16 (else ValueError)."""
    if bits not in _KERNEL_BITS or not (group_size is None or (group_size >= 16 and not group_size & (group_size - 1))):
        raise ValueError(
            f"affine_dequantize_triton: bits={bits}, group_size={group_size}; expected bits in {_KERNEL_BITS} "
            "and group_size None or a power of two >= 16"
        )
    n, k = qdata.shape[0], qdata.shape[1] * 8 // bits
    g = 1 if group_size is None else k // group_size
    scale, zero_point = scale.float().reshape(n, g), zero_point.to(torch.int32).reshape(n, g)
    strides = (*qdata.stride(), *scale.stride(), *zero_point.stride())
    return wmm.launch_dequantize(
        _affine_dequantize_kernel, (qdata, scale, zero_point), strides, n, k, dtype, min(128, group_size or 128),
        BITS=bits, GROUP_SIZE=group_size or 0,
    )  # fmt: skip


def affine_dequantize(
    qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int | None, dtype: torch.dtype
) -> Tensor:
    """``W [N, K]`` in ``dtype``: ``(code - zero_point) * scale`` in fp32, one rounding (the reference's
    ``dequantize`` cast to ``dtype``): one Triton pass on CUDA where the kernel applies, else torch ops."""
    if use_triton(qdata) and bits in _KERNEL_BITS and (group_size is None or group_size >= 16):
        return affine_dequantize_triton(qdata, scale, zero_point, bits, group_size, dtype)
    return _dequantize(qdata, scale, zero_point, bits).to(dtype)


# One opaque op: under torch.compile the transient 16-bit W never enters the graph, so the
# partitioner cannot save it for backward (as quantframe::int8_weight_mm_dense).
@torch.library.custom_op("quantframe::affine_mm_dense", mutates_args=())
def _affine_mm_dense_op(
    x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int, bias: Tensor | None
) -> Tensor:
    w = affine_dequantize(qdata, scale, zero_point, bits, group_size or None, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@_affine_mm_dense_op.register_fake
def _(x, qdata, scale, zero_point, bits, group_size, bias):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


_affine_mm_dense_op.register_autograd(_backward, setup_context=_setup_context)  # same arguments as affine_mm


def affine_mm_dense(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
) -> Tensor:
    """The prefill path: ``W`` dequantized once to ``x.dtype`` (:func:`affine_dequantize`, a transient
    ``[N, K]`` copy), then the dense matmul (cuBLAS on a GPU). Same arguments, result (to ``x.dtype``
    rounding of ``W``) and errors as :func:`affine_mm_reference`."""
    _check_args(x, qdata, scale, zero_point, bits, group_size, bias)
    y = torch.ops.quantframe.affine_mm_dense(
        x.reshape(-1, x.shape[-1]), qdata, scale, zero_point, bits, group_size or 0, bias
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])


def affine_mm(
    x: Tensor,
    qdata: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    group_size: int | None,
    bias: Tensor | None = None,
) -> Tensor:
    """``x [..., K] @ dequant(W).T (+ bias [N])``: on CUDA, where the kernels apply, the GEMV kernel
    (:func:`affine_mm_triton`) up to ``FUSED_MAX_ROWS`` rows of x and :func:`affine_mm_dense` from
    ``DENSE_MIN_ROWS`` on; else :func:`affine_mm_reference` (same arguments, result and errors).

    Example::

        q = AffineQuantizedTensor.from_float(w, bits=4, group_size=128, symmetric=False)
        y = affine_mm(x, q.qdata, q.scale, q.zero_point, 4, 128)
    """
    if use_triton(x) and _kernel_problem(x, bits, group_size) is None:
        if wmm.rows(x) >= wmm.DENSE_MIN_ROWS:
            return affine_mm_dense(x, qdata, scale, zero_point, bits, group_size, bias)
        return affine_mm_triton(x, qdata, scale, zero_point, bits, group_size, bias)
    return affine_mm_reference(x, qdata, scale, zero_point, bits, group_size, bias)
