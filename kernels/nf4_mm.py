"""Matmul of float activations with an NF4 weight, dequantized inside the kernel.

``y [..., N] = x [..., K] @ W.T (+ bias [N])`` with ``W`` the ``[N, K]`` weight of
:class:`quantframe.nf4.NF4Tensor`: element ``e`` of the row-major flat weight is
``levels[code[e]] * scale[e // block_size]``, two 4-bit codes a byte (element ``2j`` in the high
nibble of byte ``j``). ``scale`` is the fp32 block absmax after double quantization
(``NF4Tensor.block_scales()``, one small elementwise op the caller runs); ``levels`` the 16
NormalFloat4 values (fp32). Each program reads its slice of the packed weight once:

* ``M <= 16`` rows of x (decode): ``_nf4_gemv_kernel``, one program per ``BLOCK_N`` output
  features holding all rows of x, a multiply-and-sum on CUDA cores; the block scale multiplies
  the fp32 partial sum of each ``BLOCK_K`` slice (one multiply per output, not per weight).
* more rows (prefill): ``_nf4_gemm_kernel``, ``tl.dot`` tiles in x's 16-bit dtype (fp32 x: ieee
  fp32); the tile ``level * scale`` is rounded to x's dtype as a dense 16-bit layer holds it.

Both unpack the nibbles in registers and look the level up with a gather load from the 16-entry
table (64 bytes, L1-resident); one row of word-aligned codes instead reads int32 words and looks the
levels up in registers with ``prmt`` byte permutes (``_nf4_words_row``).
``BLOCK_K`` divides ``block_size`` and ``block_size`` divides ``K``, so a ``BLOCK_K`` slice has one
scale per row and no tile reaches past ``K``.

Gradient with respect to x (frozen base, QLoRA): no Triton kernel; :func:`nf4_mm_grad_input`
dequantizes ``W`` once into the gradient's dtype and runs one matmul on CUDA (fp32 math elsewhere).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from . import _weight_mm as wmm
# bare names: inductor resolves a user kernel's jit helpers by name
from ._weight_mm import bias_and_store, load_words, x_column
from . import call_op, is_traced, use_triton

__all__ = [
    "nf4_block_scales",
    "nf4_block_scales_reference",
    "nf4_block_scales_triton",
    "nf4_dequantize",
    "nf4_dequantize_triton",
    "nf4_mm",
    "nf4_mm_dense",
    "nf4_mm_double_quant",
    "nf4_mm_grad_input",
    "nf4_mm_reference",
    "nf4_mm_triton",
]

FUSED_MAX_ROWS = wmm.FUSED_MAX_ROWS  # up to this many rows of x, the fused kernels (see _weight_mm.launch)


def _check_weight(codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, k: int, who: str) -> None:
    """Raise TypeError / ValueError for a bad packed weight of logical shape ``[codes.shape[0], k]``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"{who}: codes.dtype={codes.dtype}, expected torch.uint8 (two 4-bit codes per byte)")
    if not scale.is_floating_point():
        raise TypeError(f"{who}: scale.dtype={scale.dtype}, expected a float dtype")
    if not levels.is_floating_point():
        raise TypeError(f"{who}: levels.dtype={levels.dtype}, expected a float dtype")
    if codes.dim() != 2:
        raise ValueError(f"{who}: codes must be 2-D [N, K // 2], got shape {tuple(codes.shape)}")
    if k % 2 or codes.shape[1] != k // 2:
        raise ValueError(
            f"{who}: codes.shape={tuple(codes.shape)} does not hold K={k} 4-bit codes per row (expected K even, "
            f"codes [N, {k // 2}])"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{who}: block_size={block_size!r} must be a positive int")
    numel = codes.shape[0] * k
    if numel % block_size:
        raise ValueError(f"{who}: block_size={block_size} must divide N*K={codes.shape[0]}*{k}={numel}")
    if scale.shape != (numel // block_size,):
        raise ValueError(
            f"{who}: scale.shape={tuple(scale.shape)}, expected ({numel // block_size},) = N*K/block_size "
            f"for N={codes.shape[0]}, K={k}, block_size={block_size}"
        )
    if levels.shape != (16,):
        raise ValueError(f"{who}: levels.shape={tuple(levels.shape)}, expected (16,) (one value per 4-bit code)")


def _check_args(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None, who: str
) -> None:
    """Raise TypeError / ValueError naming the bad argument, its value and what is allowed."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{who}: x.dtype={x.dtype}, expected a float dtype")
    if x.dim() == 0:
        raise ValueError(f"{who}: x must have at least one dim [..., K], got a scalar")
    _check_weight(codes, scale, levels, block_size, x.shape[-1], who)
    tensors = {"x": x, "codes": codes, "scale": scale, "levels": levels, "bias": bias}
    wmm.check_bias_and_devices(who, codes.shape[0], bias, tensors)


def _dequantize(codes: Tensor, scale: Tensor, levels: Tensor, block_size: int) -> Tensor:
    """fp32 ``W [N, K]`` (the numerics of ``NF4Tensor.dequantize``: blocks along the flat weight)."""
    c = codes.reshape(-1)
    idx = torch.stack([c >> 4, c & 0xF], dim=-1).reshape(-1).long()  # high nibble first
    w = levels.float()[idx].view(-1, block_size) * scale.float()[:, None]
    return w.view(codes.shape[0], codes.shape[1] * 2)


def nf4_mm_reference(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ dequant(W).T (+ bias)`` in fp32, cast to ``x.dtype``.

    Args:
        x: ``[..., K]`` float activations.
        codes: uint8 ``[N, K // 2]``, element ``2j`` of a row in the high nibble of byte ``j``.
        scale: float ``[N * K // block_size]``, one per block of the row-major flat weight
            (``NF4Tensor.block_scales()``).
        levels: float ``[16]``, the value of each code (``quantframe.nf4.NF4_LEVELS``).
        block_size: elements per scale; must divide ``N * K`` (the Triton kernels: ``K``).
        bias: ``[N]`` float or None.

    Returns:
        ``[..., N]`` in ``x.dtype``.

    Raises:
        TypeError: x / scale / levels / bias not float, codes not uint8.
        ValueError: mismatched shapes or devices, an odd K, a block_size not dividing N * K.
    """
    _check_args(x, codes, scale, levels, block_size, bias, "nf4_mm")
    w = _dequantize(codes, scale, levels, block_size)
    # One op: the aten trace of a dense fp32 layer, one rounding to x's dtype.
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def nf4_mm_grad_input(grad: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int) -> Tensor:
    """``grad [..., N] @ dequant(W) [N, K] -> [..., K]`` in ``grad.dtype``: the input gradient of
    :func:`nf4_mm` (W is a frozen base and gets none).

    On CUDA, W is dequantized once into ``grad.dtype`` (:func:`nf4_dequantize`, one Triton pass) and
    multiplied in that dtype (a 16-bit matmul on tensor cores). Elsewhere fp32 math,
    one rounding. Raises as :func:`nf4_mm_reference` (``grad.shape[-1]`` must be N).
    """
    if not grad.dtype.is_floating_point:
        raise TypeError(f"nf4_mm_grad_input: grad.dtype={grad.dtype}, expected a float dtype")
    k = codes.shape[1] * 2 if codes.dim() == 2 else 0
    _check_weight(codes, scale, levels, block_size, k, "nf4_mm_grad_input")
    if grad.dim() == 0 or grad.shape[-1] != codes.shape[0]:
        raise ValueError(
            f"nf4_mm_grad_input: grad.shape={tuple(grad.shape)} must end in N={codes.shape[0]} (codes.shape[0])"
        )
    if grad.is_cuda:
        return grad @ nf4_dequantize(codes, scale, levels, block_size, grad.dtype)
    return (grad.float() @ _dequantize(codes, scale, levels, block_size)).to(grad.dtype)


# ---- Triton ------------------------------------------------------------------------------------
@triton.jit
def _nf4_levels_tile(
    c_ptr, lv_ptr, offs_n, mask_n, k0, stride_cn, stride_ck, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """fp32 ``levels[code]`` of the ``[BLOCK_N, BLOCK_K]`` weight tile at column ``k0`` (unscaled;
    masked rows read code 0 and must meet a zero scale or a masked store)."""
    pk = k0 // 2 + tl.arange(0, BLOCK_K // 2).to(tl.int64)
    p = tl.load(c_ptr + offs_n[:, None] * stride_cn + pk[None, :] * stride_ck, mask=mask_n[:, None], other=0)
    p = p.to(tl.int32)
    # Element 2j is the high nibble. The BLOCK_K / 2 bytes load as one contiguous (vectorized) run and
    # the nibbles are interleaved back into K order (see affine_mm._codes_minus_zero).
    q = tl.interleave((p >> 4) & 15, p & 15)
    return tl.load(lv_ptr + q)  # gather from the 16-entry table (one cache line)


_PRMT_ASM = tl.constexpr(not wmm.interpreted())  # the interpreter runs no inline PTX


@triton.jit
def _prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode): byte ``j`` of the result is byte ``(sel >> 4j) & 7`` of the
    eight bytes ``b:a`` (``a`` bytes 0-3, ``b`` bytes 4-7); ``sel``'s nibbles must have bit 3 clear
    (no sign replication). The interpreter gets the same bytes by shifts."""
    a, b = a + tl.zeros_like(sel), b + tl.zeros_like(sel)  # table registers: scalars
    if _PRMT_ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    out = tl.zeros_like(sel)
    for j in tl.static_range(4):
        i = (sel >> 4 * j) & 7
        byte = tl.where(i < 4, (a >> 8 * (i & 3)) & 0xFF, (b >> 8 * (i & 3)) & 0xFF)
        out |= byte << 8 * j
    return out


@triton.jit
def _table_plane(lv_ptr, first: tl.constexpr, shift: tl.constexpr, FP16: tl.constexpr):
    """int32: byte ``shift // 8`` of levels ``first .. first + 3`` (their fp16 bits if ``FP16``, else
    their fp32 bits), one a byte: four entries of one byte plane of the table for ``prmt``."""
    out = tl.zeros((), dtype=tl.int32)
    for j in tl.static_range(4):
        level = tl.load(lv_ptr + first + j)
        if FP16:
            bits = level.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        else:
            bits = level.to(tl.int32, bitcast=True)
        out |= ((bits >> shift) & 0xFF) << 8 * j
    return out


@triton.jit
def _lookup4(sel, sel2, t0, t1, t2, t3):
    """One byte plane of the levels of the four codes in ``sel``'s nibbles (bits 0-2: entry within
    eight, ``sel2`` picks the eight): ``prmt`` from the 16-entry byte table ``t0..t3``."""
    return _prmt(_prmt(t0, t1, sel), _prmt(t2, t3, sel), sel2)


@triton.jit
def _rn(a, b, OP: tl.constexpr):
    """``a * b`` (OP 0) or ``a + b`` (OP 1) in fp32, rounded on its own: PTX ``mul.rn`` / ``add.rn`` are
    never contracted into an FMA, so a product then a sum round twice, as two torch ops do. The
    interpreter (numpy) rounds each op anyway."""
    if _PRMT_ASM:
        if OP == 0:
            out = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                            is_pure=True, pack=1)  # fmt: skip
        else:
            out = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                            is_pure=True, pack=1)  # fmt: skip
    elif OP == 0:
        out = a * b
    else:
        out = a + b
    return out


@triton.jit
def _block_scales(s_ptr, idx, mask, ss_ptr, mean_ptr, q_offset, DQ: tl.constexpr, SBS: tl.constexpr):
    """fp32 scales of the blocks at flat indices ``idx``: ``s_ptr[idx]`` (fp32 block scales), or with
    ``DQ`` the double quantization's ``qs[idx] * scaler_scale[(idx + q_offset) // SBS] + mean`` (``s_ptr``:
    the int8 ``qs``), bit for bit :func:`nf4_block_scales_reference`."""
    if DQ:
        q = tl.load(s_ptr + idx, mask=mask, other=0).to(tl.float32)
        ss = tl.load(ss_ptr + (idx + q_offset) // SBS, mask=mask, other=0.0)
        s = _rn(_rn(q, ss, 0), tl.load(mean_ptr) + tl.zeros_like(q), 1)
    else:
        s = tl.load(s_ptr + idx, mask=mask, other=0.0)
    return s


@triton.jit
def _fp16_level_planes(lv_ptr):
    """The 16 levels as fp16, as eight int32 ``prmt`` tables: low bytes of levels 0-3, 4-7, 8-11,
    12-15, then their high bytes (built once a program; the compiler hoists them)."""
    lo0, lo1 = _table_plane(lv_ptr, 0, 0, True), _table_plane(lv_ptr, 4, 0, True)
    lo2, lo3 = _table_plane(lv_ptr, 8, 0, True), _table_plane(lv_ptr, 12, 0, True)
    hi0, hi1 = _table_plane(lv_ptr, 0, 8, True), _table_plane(lv_ptr, 4, 8, True)
    hi2, hi3 = _table_plane(lv_ptr, 8, 8, True), _table_plane(lv_ptr, 12, 8, True)
    return lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3


@triton.jit
def _nf4_words_tile(
    c_ptr, lv_ptr, offs_n, mask_n, k0, K, stride_cn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """fp32 levels (fp16-rounded, unscaled) of the ``[BLOCK_N, BLOCK_K]`` weight tile at column ``k0``,
    from codes read as int32 words (rows 4-byte aligned, ``K % 8 == 0``) and looked up by ``prmt`` as
    in :func:`_nf4_words_row`. Column ``8i + p`` holds element ``k0 + 8i + (p ^ 1)`` (nibble ``p`` of
    word ``i``): the dot's other operand must be read in that order. Words past K read code 0."""
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _fp16_level_planes(lv_ptr)
    w_idx = k0 // 8 + tl.arange(0, BLOCK_K // 8).to(tl.int64)
    word = load_words(c_ptr, offs_n, mask_n, w_idx, K // 8, stride_cn)
    v0, v1, v2, v3 = _nf4_half_levels(word, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3)
    v4, v5, v6, v7 = _nf4_half_levels(word >> 16, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3)
    # joins from the top bit of p down: the flattened index of [BLOCK_N, W, 2, 2, 2] is 8i + p
    b0 = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    b1 = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(b0, b1), (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_half_levels(half, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3):
    """fp32 levels of nibbles 0-3 of ``half`` (each an int32 word or its top half shifted down): two
    byte-plane lookups of four codes each, then two fp16 pairs."""
    sel = half & 0x7777
    sel2 = ((half & 0x8888) >> 1) | 0x3210  # byte j from the first eight (j) or the second (4 + j)
    lo = _lookup4(sel, sel2, lo0, lo1, lo2, lo3)
    hi = _lookup4(sel, sel2, hi0, hi1, hi2, hi3)
    p01 = _prmt(lo, hi, tl.full(lo.shape, 0x5140, tl.int32))  # fp16 of nibbles 0 (low half) and 1
    p23 = _prmt(lo, hi, tl.full(lo.shape, 0x7362, tl.int32))
    v0 = p01.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    v1 = (p01 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    v2 = p23.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    v3 = (p23 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v0, v1, v2, v3


@triton.jit
def _nf4_words_row(
    x_ptr, c_ptr, s_ptr, lv_ptr, offs_n, mask_n, K, stride_xk, stride_cn, stride_sn, stride_sg,
    ss_ptr, mean_ptr, q_offset,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DQ: tl.constexpr, SBS: tl.constexpr,
):  # fmt: skip
    """fp32 ``[BLOCK_N, 1]`` = one row of x times NF4 codes read as int32 words (``codes`` rows
    4-byte aligned, ``K % 8 == 0``; ``stride_cn`` in bytes), K tiles of several scale blocks.

    Word ``i`` holds elements ``8i .. 8i + 7``; bits ``4p .. 4p + 3`` are element ``8i + (p ^ 1)`` (the
    high nibble of a byte is the even element). The nibbles are never interleaved back into K order:
    x is read in the words' order instead; each block's words are summed, then scaled (as
    ``affine_mm._int4_words_row``, whose long K tiles took the 4-bit GEMV from 30 to 17 us on H200).

    The levels are looked up in registers, not gathered from the table: the 16 levels as fp16
    (rounding each by at most 2**-12 of itself) are two byte planes of four int32 each; ``prmt``
    picks four codes' bytes at once from eight entries (two ``prmt``) and a third picks between the
    two eights by each code's top bit; two more interleave the planes into fp16 pairs, converted to
    fp32 for the FMAs (sm_90: 6.2-8.3 loop instructions a code against 12.7 gathering; H200, one
    token of 14336 x 4096: 24.9 us for the kernel alone; the eager layer 60.6 against 109.8 gathering,
    both with the block scales then computed by six torch kernels)."""
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _fp16_level_planes(lv_ptr)
    offs_w = tl.arange(0, BLOCK_K // 8).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)  # one block per row of a tile
    acc_b = tl.zeros((BLOCK_N, BLOCK_K // max(BLOCK_SIZE, 8)), dtype=tl.float32)  # several blocks
    for k0 in range(0, K, BLOCK_K):
        w_idx = k0 // 8 + offs_w
        mask_w = w_idx < K // 8
        word = load_words(c_ptr, offs_n, mask_n, w_idx, K // 8, stride_cn)
        part = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        # x[8i .. 8i + 7] as one [W, 8] load (each thread's eight contiguous), split per code in registers
        xb = tl.load(x_ptr + (8 * w_idx[:, None] + tl.arange(0, 8)[None, :]) * stride_xk, mask=mask_w[:, None],
                     other=0.0).to(tl.float32)  # fmt: skip
        for h in tl.static_range(2):  # nibbles 4h .. 4h + 3 of the word (element 8i + (p ^ 1) for nibble p)
            v0, v1, v2, v3 = _nf4_half_levels(word >> 16 * h, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3)
            # words past K: code 0 meets x = 0
            part += v0 * x_column(xb, 4 * h + 1, BLOCK_K // 8)[None, :]
            part += v1 * x_column(xb, 4 * h, BLOCK_K // 8)[None, :]
            part += v2 * x_column(xb, 4 * h + 3, BLOCK_K // 8)[None, :]
            part += v3 * x_column(xb, 4 * h + 2, BLOCK_K // 8)[None, :]
        if BLOCK_SIZE >= BLOCK_K:
            idx = offs_n * stride_sn + (k0 // BLOCK_SIZE) * stride_sg
            s = _block_scales(s_ptr, idx, mask_n, ss_ptr, mean_ptr, q_offset, DQ, SBS)
            acc += part * s[:, None]
        else:
            bs = k0 // BLOCK_SIZE + tl.arange(0, BLOCK_K // BLOCK_SIZE)
            mask = mask_n[:, None] & (bs < K // BLOCK_SIZE)[None, :]
            part_b = tl.sum(tl.reshape(part, (BLOCK_N, BLOCK_K // BLOCK_SIZE, BLOCK_SIZE // 8)), axis=2)
            idx = offs_n[:, None] * stride_sn + bs[None, :] * stride_sg
            acc_b += part_b * _block_scales(s_ptr, idx, mask, ss_ptr, mean_ptr, q_offset, DQ, SBS)
    if BLOCK_SIZE >= BLOCK_K:
        return tl.sum(acc, axis=1)[:, None]
    return tl.sum(acc_b, axis=1)[:, None]


_GEMV_SHAPES = [(16, 16), (32, 16), (16, 32), (32, 32), (16, 64), (64, 32), (32, 64), (64, 64), (128, 64)]
# One row, codes as int32 words (_nf4_words_row): long K tiles of several scale blocks, offered to the
# autotuner beside the byte tiles above. sm_90 loop: 8.3 / 6.8 / 6.2 instructions a code at 8 / 16 / 32 x
# 1,024, no spills at 32 x 1,024. H200, 14336 x 4096, one token: 60.6-63.7 us at 8-32 x 1,024 and 16 x 2,048,
# 75.0 at 16 x 512, the best byte tile 118.3.
_WORDS_SHAPES = [(16, 512), (8, 1024), (16, 1024), (32, 1024), (16, 2048)]


def _gemv_configs() -> list[triton.Config]:
    plain = wmm.gemv_configs(_GEMV_SHAPES, interpreter_block_k=16)
    for c in plain:
        c.kwargs["WORDS"] = False
    if wmm.interpreted():
        return plain
    return plain + [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "WORDS": True}, num_warps=4, num_stages=3)
        for n, k in _WORDS_SHAPES
    ]


def _prune_gemv(configs, named_args, **kwargs):
    """The byte tiles by ``wmm.prune_gemv``; the words tiles only for one row of aligned codes
    (``WORDS_OK``), spanning scale blocks."""
    plain = wmm.prune_gemv("BLOCK_SIZE")([c for c in configs if not c.kwargs["WORDS"]], named_args, **kwargs)
    words = wmm.words_configs(configs, kwargs)
    return plain + (wmm.prune_gemv("BLOCK_SIZE", "WORDS_OK")(words, named_args, **kwargs) if words else [])


@triton.autotune(
    # (BLOCK_N, BLOCK_K) at 4 warps; the interpreter's BLOCK_K 16 divides every block_size >= 16.
    configs=_gemv_configs(),
    key=["N", "K", "BLOCK_SIZE", "BLOCK_M", "WORDS_OK", "DQ"],
    prune_configs_by={"early_config_prune": _prune_gemv},
)
@triton.jit
def _nf4_gemv_kernel(
    x_ptr, c_ptr, s_ptr, lv_ptr, b_ptr, y_ptr,  # x [M, K], codes [N, K/2], scale [N, K/BS], levels [16], bias [N], y [M, N]
    M, N, K,
    stride_xm, stride_xk, stride_cn, stride_ck, stride_sn, stride_sg, stride_ym, stride_yn,
    BLOCK_SIZE: tl.constexpr,  # elements per scale, divides K
    HAS_BIAS: tl.constexpr,
    WORDS_OK: tl.constexpr,  # one row of codes in whole, aligned int32 words: the words tiles may run
    BLOCK_M: tl.constexpr,  # next power of two >= M (<= 16): every row of x in one program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides BLOCK_SIZE (byte tiles) or is a multiple of it (words tiles)
    WORDS: tl.constexpr,  # codes as int32 words, levels by prmt (_nf4_words_row)
    # DQ: s_ptr is the double quantization's int8 [N, K/BS] (contiguous), each block's scale made here
    # (_block_scales) from ss_ptr (fp32 scaler scales, one a SBS blocks, the first q_offset blocks in) and
    # mean_ptr (fp32 []): nf4_mm_double_quant's eager one-row launch, no separate scales kernel
    # (no defaults: inductor's launcher for a traced user kernel takes every parameter)
    ss_ptr, mean_ptr, q_offset, DQ: tl.constexpr, SBS: tl.constexpr,
):  # fmt: skip
    # Decode is bound by reading the weight: each program streams its [BLOCK_N, K] slice once and
    # multiplies it with all M rows of x (tiny, read from L1/L2 by every program).
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    if WORDS:
        acc = _nf4_words_row(
            x_ptr, c_ptr, s_ptr, lv_ptr, offs_n, mask_n, K, stride_xk, stride_cn, stride_sn, stride_sg, ss_ptr,
            mean_ptr, q_offset, BLOCK_SIZE, BLOCK_N, BLOCK_K, DQ, SBS,
        )  # fmt: skip
        bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)
        return
    if BLOCK_M == 1:
        # One token: products accumulate in a [BLOCK_N, BLOCK_K] tile, reduced across K once at the end.
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _nf4_levels_tile(c_ptr, lv_ptr, offs_n, mask_n, k0, stride_cn, stride_ck, BLOCK_N, BLOCK_K)
            idx = offs_n * stride_sn + (k0 // BLOCK_SIZE) * stride_sg
            s = _block_scales(s_ptr, idx, mask_n, ss_ptr, mean_ptr, q_offset, DQ, SBS)
            xv = tl.load(x_ptr + (k0 + tl.arange(0, BLOCK_K).to(tl.int64)) * stride_xk).to(tl.float32)
            acc1 += (w * s[:, None]) * xv[None, :]
        acc = tl.sum(acc1, axis=1)[:, None]  # [BLOCK_N, 1]
        bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)
        return
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _nf4_levels_tile(c_ptr, lv_ptr, offs_n, mask_n, k0, stride_cn, stride_ck, BLOCK_N, BLOCK_K)
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_ptrs = x_ptr + rk[:, None] * stride_xk + offs_m[None, :] * stride_xm
        xt = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_M]
        part = tl.sum(w[:, :, None] * xt[None, :, :], axis=1)  # [BLOCK_N, BLOCK_M]
        idx = offs_n * stride_sn + (k0 // BLOCK_SIZE) * stride_sg
        acc += part * _block_scales(s_ptr, idx, mask_n, ss_ptr, mean_ptr, q_offset, DQ, SBS)[:, None]
    bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


# Up to 16 rows of word-aligned codes (WORDS): K tiles of several blocks, levels by prmt; (BLOCK_N, BLOCK_M,
# BLOCK_K, warps, stages), no spills in sm_90 builds. Untimed (stop 16): the gathered tiles spend 8-16
# sm_90 loop instructions a code, a cp.async gather of each level among them; these 8-9, no gathers.
_WORDS_GEMM_SHAPES = [(64, 16, 128, 4, 4), (128, 16, 128, 4, 3), (64, 16, 256, 4, 3)]  # 8.0-9.0 a code
# (1-2 warp tiles: 11.6-15.6)


def _gemm_configs() -> list[triton.Config]:
    # The shared tiles plus 64 x 64 x 16 (block_size 16); ptxas compiles these for sm_90 without
    # spills in bf16 and fp32 (.scratch cross-compile).
    plain = wmm.gemm_configs([*wmm.GEMM_SHAPES, (64, 64, 16, 4, 4)], interpreter_block_k=16)
    for c in plain:
        c.kwargs["WORDS"] = False
    if wmm.interpreted():
        return plain
    words = wmm.gemm_configs(_WORDS_GEMM_SHAPES, interpreter_block_k=16)
    for c in words:
        c.kwargs["WORDS"] = True
    return plain + words


def _prune_gemm(configs, named_args, **kwargs):
    """The gathered tiles by ``wmm.prune_gemm``; the words tiles only for up to 16 rows of word-aligned
    codes (``WORDS_OK``), K tiles of whole blocks."""
    plain = wmm.prune_gemm("BLOCK_SIZE")([c for c in configs if not c.kwargs["WORDS"]], named_args, **kwargs)
    if not (kwargs.get("WORDS_OK") and named_args["M"] <= 16):
        return plain
    bs = kwargs["BLOCK_SIZE"]
    return plain + [c for c in configs if c.kwargs["WORDS"] and c.kwargs["BLOCK_K"] % bs == 0]


@triton.autotune(
    configs=_gemm_configs(),
    key=["M", "N", "K", "BLOCK_SIZE", "DOT_FP32", "WORDS_OK"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)
@triton.jit
def _nf4_gemm_kernel(
    x_ptr, c_ptr, s_ptr, lv_ptr, b_ptr, y_ptr,  # as in _nf4_gemv_kernel
    M, N, K,
    stride_xm, stride_xk, stride_cn, stride_ck, stride_sn, stride_sg, stride_ym, stride_yn,
    BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 tiles (fp32 x, or the interpreter); else x's 16-bit dtype
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides BLOCK_SIZE, or (WORDS) a multiple of it
    WORDS_OK: tl.constexpr,  # codes rows in whole, aligned int32 words: the words tiles may run
    WORDS: tl.constexpr,  # levels by prmt from int32 words (_nf4_words_tile), x read in their order
):  # fmt: skip
    # y.T [N, M] = W [N, K] @ x.T [K, M]: the dequantized weight is the dot's first operand, which
    # Hopper's wgmma may take from registers. Programs along axis 0 share one x tile, read from L2.
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Scale the tile before the dot (masked rows get scale 0): a second fp32 partial sum per
        # block would double the accumulator registers.
        if WORDS:  # several blocks a tile: each element times its block's (a block is whole words)
            w = _nf4_words_tile(c_ptr, lv_ptr, offs_n, mask_n, k0, K, stride_cn, BLOCK_N, BLOCK_K)
            NB: tl.constexpr = BLOCK_K // BLOCK_SIZE
            bs = k0 // BLOCK_SIZE + tl.arange(0, NB)
            mask_s = mask_n[:, None] & (bs < K // BLOCK_SIZE)[None, :]
            sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + bs[None, :] * stride_sg, mask=mask_s, other=0.0)
            w = tl.reshape(tl.reshape(w, (BLOCK_N, NB, BLOCK_SIZE)) * sb[:, :, None], (BLOCK_N, BLOCK_K))
            rk = k0 + (tl.arange(0, BLOCK_K) ^ 1).to(tl.int64)  # the words' element order
        else:
            w = _nf4_levels_tile(c_ptr, lv_ptr, offs_n, mask_n, k0, stride_cn, stride_ck, BLOCK_N, BLOCK_K)
            s = tl.load(s_ptr + offs_n * stride_sn + (k0 // BLOCK_SIZE) * stride_sg, mask=mask_n, other=0.0)
            w = w * s[:, None]
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        xt = tl.load(x_ptr + rk[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                     mask=(rk < K)[:, None] & mask_m[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:  # fp32 x needs fp32 products; the interpreter's bf16 dot is wrong (numpy has no bf16)
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:  # W rounded to x's 16-bit dtype, as a dense 16-bit layer holds it
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    bias_and_store(acc, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _nf4_dequantize_kernel(
    c_ptr, s_ptr, lv_ptr, w_ptr,  # codes [N, K // 2], scale [N, K // BLOCK_SIZE], levels [16], W [N, K] out
    N, K,
    stride_cn, stride_ck, stride_sn, stride_sg,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides BLOCK_SIZE
):  # fmt: skip
    """``W = levels[code] * block scale`` in fp32 (as ``NF4Tensor.dequantize``), stored in ``w_ptr``'s
    dtype: one ``[BLOCK_N, BLOCK_K]`` tile a program."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    w = _nf4_levels_tile(c_ptr, lv_ptr, offs_n, mask_n, k0, stride_cn, stride_ck, BLOCK_N, BLOCK_K)
    s = tl.load(s_ptr + offs_n * stride_sn + (k0 // BLOCK_SIZE) * stride_sg, mask=mask_n, other=0.0)
    rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    w = (w * s[:, None]).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_n[:, None] * K + rk[None, :], w, mask=mask_n[:, None])


# ---- the double-quantized block scales ---------------------------------------------------------
def nf4_block_scales_reference(
    qs: Tensor, scaler_scale: Tensor, mean: Tensor, offset: int, scaler_block_size: int
) -> Tensor:
    """fp32 ``[n_blocks]``: ``qs[b] * scaler_scale[(b + offset) // scaler_block_size] + mean`` (int8
    ``qs``, fp32 ``scaler_scale`` and 0-dim ``mean``: :class:`quantframe.nf4.NF4Tensor`'s fields), one
    rounding after the product and one after the sum."""
    idx = (torch.arange(qs.numel(), device=qs.device) + offset) // scaler_block_size
    return qs.float() * scaler_scale[idx] + mean


@triton.jit
def _nf4_block_scales_kernel(
    qs_ptr, ss_ptr, mean_ptr, out_ptr, n_blocks, offset, SBS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    q = tl.load(qs_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(ss_ptr + (offs + offset) // SBS, mask=mask, other=0.0)
    tl.store(out_ptr + offs, q * s + tl.load(mean_ptr), mask=mask)  # launched without FMA contraction


def nf4_block_scales_triton(
    qs: Tensor, scaler_scale: Tensor, mean: Tensor, offset: int, scaler_block_size: int
) -> Tensor:
    """:func:`nf4_block_scales_reference` in one launch, bit for bit (no fused multiply-add). Eager
    only: the decode path's scales were six torch kernels a call (~30 us of a one-token NF4 layer
    under CUDA graphs on the H200), which inductor fuses by itself under compile."""
    out = torch.empty(qs.shape, dtype=torch.float32, device=qs.device)
    n = qs.numel()
    if n:
        block = 1024
        _nf4_block_scales_kernel[(triton.cdiv(n, block),)](
            qs, scaler_scale, mean, out, n, offset, SBS=scaler_block_size, BLOCK=block, enable_fp_fusion=False
        )
    return out


def nf4_block_scales(qs: Tensor, scaler_scale: Tensor, mean: Tensor, offset: int, scaler_block_size: int) -> Tensor:
    """:func:`nf4_block_scales_reference`'s values: one Triton launch on CUDA outside tracing, else torch ops."""
    if use_triton(qs) and not is_traced(qs) and qs.is_contiguous():
        return nf4_block_scales_triton(qs, scaler_scale, mean, offset, scaler_block_size)
    return nf4_block_scales_reference(qs, scaler_scale, mean, offset, scaler_block_size)


def _plain_scale_args(scale: Tensor) -> dict:
    """The GEMV's double-quant arguments for plain fp32 block scales: DQ off, the scale standing in for
    the unused pointers (every kernel parameter is passed: see test_kernel_signatures)."""
    return {"ss_ptr": scale, "mean_ptr": scale, "q_offset": 0, "DQ": False, "SBS": 1}


# triton_op + wrap_triton let torch.compile trace into the kernels (on a GPU; under
# TRITON_INTERPRET=1 fake tensors would reach the interpreted kernel).
def _nf4_mm_impl(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None
) -> Tensor:
    """2-D ``x [M, K]``, fp32 ``scale [N, K // block_size]`` and ``levels [16]``; checked by :func:`nf4_mm_triton`."""
    strides = (*codes.stride(), *scale.stride())  # levels: contiguous [16], no stride
    n = codes.shape[0]
    words_ok = wmm.word_rows(codes, 8, x.shape[1])  # the GEMV's words tiles also need one row (its prune)
    return wmm.launch(
        _nf4_gemv_kernel, _nf4_gemm_kernel, x, (codes, scale, levels), strides, bias, n, _plain_scale_args(scale),
        BLOCK_SIZE=block_size, WORDS_OK=words_ok,
    )  # fmt: skip


# Registered from the plain function, which eager calls take directly where they can (call_op).
_nf4_mm_op = triton_op("quantframe::nf4_mm", mutates_args=())(_nf4_mm_impl)


def _setup_context(ctx, inputs, output):
    _, codes, scale, levels, block_size, bias = inputs
    ctx.save_for_backward(codes, scale, levels)
    ctx.block_size, ctx.has_bias = block_size, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    # Frozen base: gradients reach x (and bias), never the codes.
    codes, scale, levels = ctx.saved_tensors
    grad_x = nf4_mm_grad_input(grad, codes, scale.reshape(-1), levels, ctx.block_size)
    grad_bias = grad.float().sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


_nf4_mm_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_problem(x: Tensor, block_size: int) -> Exception | None:
    """Why the Triton kernels cannot take these (otherwise valid) arguments; None when they can."""
    if (problem := wmm.x_dtype_problem(x, "nf4_mm_triton")) is not None:
        return problem
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        return ValueError(f"nf4_mm_triton: block_size={block_size} must be a power of two >= 16")
    if x.shape[-1] % block_size:
        return ValueError(
            f"nf4_mm_triton: block_size={block_size} must divide K={x.shape[-1]} (a block within one row)"
        )
    return None


def nf4_mm_triton(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None = None
) -> Tensor:
    """Triton version of :func:`nf4_mm_reference` for x in fp32/fp16/bf16 and block_size a power of
    two >= 16 dividing K (else TypeError / ValueError); the GEMV kernel for one row of x, the GEMM
    kernel from ``_weight_mm.MMA_MIN_ROWS`` rows on. Differentiable with respect to x and bias."""
    _check_args(x, codes, scale, levels, block_size, bias, "nf4_mm_triton")
    problem = _kernel_problem(x, block_size)
    if problem is not None:
        raise problem
    lead, k = x.shape[:-1], x.shape[-1]
    y = call_op(
        torch.ops.quantframe.nf4_mm, _nf4_mm_impl,
        x.reshape(-1, k),  # a view when it can be; the kernels take any strides
        codes,
        scale.float().reshape(codes.shape[0], k // block_size),
        levels.float().contiguous(),
        block_size,
        bias,
    )
    return y.reshape(*lead, y.shape[-1])


def _takes_double_quant_gemv(x, codes, qs, scaler_scale, mean, levels, block_size, bias) -> bool:
    """Whether :func:`nf4_mm_double_quant`'s one-launch GEMV applies; anything else takes the general
    path, which also reports bad arguments."""
    k = x.shape[-1] if x.dim() else 0
    n = codes.shape[0] if codes.dim() == 2 else 0
    tensors = (x, codes, qs, scaler_scale, mean, levels) + (() if bias is None else (bias,))
    return (
        use_triton(x) and not is_traced(x) and x.numel() == k > 0 and n > 0 and x.dtype.is_floating_point
        and codes.dtype == torch.uint8 and codes.shape[1] * 2 == k and qs.dtype == torch.int8
        and qs.is_contiguous() and qs.numel() * block_size == n * k and scaler_scale.is_contiguous()
        and scaler_scale.dtype == torch.float32 and mean.numel() == 1 and levels.shape == (16,)
        and (bias is None or (bias.shape == (n,) and bias.is_floating_point()))
        and all(t.device == x.device for t in tensors)
        and _kernel_problem(x, block_size) is None
    )  # fmt: skip


def nf4_mm_double_quant(
    x: Tensor, codes: Tensor, qs: Tensor, scaler_scale: Tensor, mean: Tensor, scaler_offset: int,
    scaler_block_size: int, levels: Tensor, block_size: int, bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """:func:`nf4_mm` with the block scales given as their double quantization (``NF4Tensor``'s
    ``quantized_scalers``, ``scaler_scale``, ``scaler_mean``, ``scaler_offset``, ``scaler_block_size``).

    One row of x on CUDA, eager: the GEMV computes each block's scale where it needs it (one launch;
    the separate scales kernel cost 3.6 us of a 28 us one-token call on the H200). Everything else
    (more rows, tracing, CPU, a strided ``qs``): :func:`nf4_block_scales` then :func:`nf4_mm`; the
    same values either way (the scales bit for bit, the sums up to order)."""
    if _takes_double_quant_gemv(x, codes, qs, scaler_scale, mean, levels, block_size, bias):
        n, k = codes.shape[0], x.shape[-1]
        x2 = x.reshape(1, k)
        y = torch.empty((1, n), dtype=x.dtype, device=x.device)
        qs2 = qs.view(n, k // block_size)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _nf4_gemv_kernel[grid](
            x2, codes, qs2, levels.float().contiguous(), bias if bias is not None else scaler_scale, y, 1, n, k,
            *x2.stride(), *codes.stride(), *qs2.stride(), *y.stride(), BLOCK_SIZE=block_size,
            HAS_BIAS=bias is not None, WORDS_OK=wmm.word_rows(codes, 8, k), BLOCK_M=1, ss_ptr=scaler_scale,
            mean_ptr=mean.float().reshape(()), q_offset=scaler_offset, DQ=True, SBS=scaler_block_size,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], n)
    scale = nf4_block_scales(qs, scaler_scale, mean, scaler_offset, scaler_block_size)
    return nf4_mm(x, codes, scale, levels, block_size, bias)


def nf4_dequantize_triton(codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """Triton version of :func:`nf4_dequantize` (bit for bit), one pass writing ``W [N, K]``, for
    block_size a power of two >= 16 dividing K (else ValueError)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    if block_size < 16 or block_size & (block_size - 1) or k % block_size:
        raise ValueError(f"nf4_dequantize_triton: block_size={block_size} must be a power of two >= 16 dividing K={k}")
    scale = scale.float().reshape(n, k // block_size)
    levels = levels.float().contiguous()
    return wmm.launch_dequantize(
        _nf4_dequantize_kernel, (codes, scale, levels), (*codes.stride(), *scale.stride()),
        n, k, dtype, min(128, block_size), BLOCK_SIZE=block_size,
    )  # fmt: skip


def nf4_dequantize(codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """``W [N, K]`` in ``dtype``: ``levels[code] * block scale`` in fp32, one rounding: one Triton pass
    on CUDA where the kernel applies, else torch ops."""
    k = codes.shape[1] * 2
    if use_triton(codes) and block_size >= 16 and not block_size & (block_size - 1) and k % block_size == 0:
        return nf4_dequantize_triton(codes, scale, levels, block_size, dtype)
    return _dequantize(codes, scale, levels, block_size).to(dtype)


# One opaque op: under torch.compile the transient 16-bit W never enters the graph, so the
# partitioner cannot save it for backward (a QLoRA base would cost 2 bytes a weight again).
@torch.library.custom_op("quantframe::nf4_mm_dense", mutates_args=())
def _nf4_mm_dense_op(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None
) -> Tensor:
    w = nf4_dequantize(codes, scale, levels, block_size, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@_nf4_mm_dense_op.register_fake
def _(x, codes, scale, levels, block_size, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


_nf4_mm_dense_op.register_autograd(_backward, setup_context=_setup_context)  # nf4_mm's: same arguments


def nf4_mm_dense(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None = None
) -> Tensor:
    """The prefill path: ``W`` dequantized once to ``x.dtype`` (:func:`nf4_dequantize`, a transient
    ``[N, K]`` copy), then the dense matmul (cuBLAS on a GPU). Same arguments, result (to ``x.dtype``
    rounding of ``W``) and errors as :func:`nf4_mm_reference`; differentiable with respect to x and bias."""
    _check_args(x, codes, scale, levels, block_size, bias, "nf4_mm_dense")
    y = torch.ops.quantframe.nf4_mm_dense(x.reshape(-1, x.shape[-1]), codes, scale, levels, block_size, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def nf4_mm(
    x: Tensor, codes: Tensor, scale: Tensor, levels: Tensor, block_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x [..., K] @ dequant(W).T (+ bias [N])``: on CUDA, where the kernels apply, the GEMV kernel
    (:func:`nf4_mm_triton`) up to ``FUSED_MAX_ROWS`` rows of x and :func:`nf4_mm_dense` from
    ``DENSE_MIN_ROWS`` on; else :func:`nf4_mm_reference` (same arguments, result and errors).

    Example::

        q = NF4Tensor.from_float(w)  # w [N, K], K a multiple of 64
        y = nf4_mm(x, q.codes, q.block_scales(), torch.tensor(NF4_LEVELS, device=x.device), q.block_size)
    """
    if use_triton(x) and _kernel_problem(x, block_size) is None:
        if wmm.rows(x) >= wmm.DENSE_MIN_ROWS:
            return nf4_mm_dense(x, codes, scale, levels, block_size, bias)
        return nf4_mm_triton(x, codes, scale, levels, block_size, bias)
    return nf4_mm_reference(x, codes, scale, levels, block_size, bias)
