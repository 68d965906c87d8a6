"""The whole AdamW step of a per-row INT8 weight in one pass per row.

For ``W = int_data [N, K] int8 * scale [N, 1]`` (INT8 quantized training) one program owns one
row: it reads the int8 row, its scale, the gradient and both moments; does the AdamW math in fp32;
re-quantizes the row with stochastic rounding under a new per-row scale (absmax / 127); writes
int8, scale and moments back in place. Per element that reads int8 + grad + states and writes
int8 + states once, instead of the dequantize / ~6 elementwise ops / requantize round trips of
the unfused step.

The moments are fp32 or bf16 ``[N, K]`` tensors (bf16 stored rounded to nearest, as torch's AdamW
keeps the moments of a bf16 model), or 8-bit ``OptimState8bit`` parts (``STATE_8BIT``):
uint8 codes ``[N, K]``, fp32 absmax per block of 256 consecutive elements ``[N * K / 256]`` and
the 256-entry code map. Then ``K % 256 == 0`` is required, so that a row holds whole blocks and
one program re-quantizes them alone (rows of 2048, 4096, 5632... qualify); otherwise the caller
takes the unfused path. The new state value is quantized to the nearest code (binary search over
the 255 midpoints, a tie to the lower code), and the weight update uses the fp32 moments, not
their 8-bit images. Nothing is computed outside the kernel: a step is one launch per weight.

The new row scale needs the updated row's absmax before any code can be written. A row is read in
chunks of up to ``_MAX_BLOCK_K`` elements; each chunk's new moments are written at once (they do
not depend on the scale) and its updated weights stay in registers until the row is done: one
read and one write of everything for rows of up to ``_MAX_CHUNKS`` chunks (8192 elements). A
longer row takes two passes and computes the update twice (pass 1: absmax only; pass 2: update
and write), re-reading int8 + grad + moments (5-13 bytes per element): storing the fp32 weight
instead would cost 4 bytes written + 4 read and an ``[N, K]`` buffer.

Stochastic rounding draws 16 bits per element from in-kernel Philox (:func:`_uniform`), or reads
``noise``.

``adamw_step_reference`` equals the kernel bit for bit on the interpreter given the same noise
(same fp32 ops in the same order, IEEE division and square root); on a GPU, FMA contraction can move
a result by an ulp, which flips a rounding decision once in a while.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import is_traced, use_triton
from .int8_rowwise import _round_to_bf16, quantize_rowwise_int8_reference

__all__ = ["adamw_step", "adamw_step_multi", "adamw_step_multi_triton", "adamw_step_reference", "adamw_step_triton"]

STATE_BLOCK = 256  # elements per 8-bit state block (quantframe.optim.state8bit.BLOCK_SIZE)
# Elements per chunk of a row. 2048 at 8 warps: 8 elements per thread; a 4096-element chunk needs 16
# warps at 128 registers (ptxas, sm_90), one program per SM.
_MAX_BLOCK_K = 2048
# Rows of up to this many chunks keep their updated weights in registers (8 more per thread and chunk)
# until the row's new scale is known: one pass. Longer rows take two.
_MAX_CHUNKS = 4
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(int_data, scale, grad, exp_avg, exp_avg_sq, states8, noise, bias_corrections) -> bool:
    """Raise TypeError / ValueError naming the bad argument; True for 8-bit states."""
    if int_data.dtype != torch.int8 or int_data.dim() != 2:
        raise TypeError(f"adamw_step: int_data must be 2-D int8 [N, K], got {int_data.dtype} {tuple(int_data.shape)}")
    n, k = int_data.shape
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"adamw_step: scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if grad.dtype not in _FLOAT_DTYPES or grad.shape != (n, k):
        raise ValueError(f"adamw_step: grad must be float [{n}, {k}], got {grad.dtype} {tuple(grad.shape)}")
    if {exp_avg.dtype, exp_avg_sq.dtype} not in ({torch.float32}, {torch.bfloat16}, {torch.uint8}):
        raise TypeError(
            f"adamw_step: exp_avg and exp_avg_sq must both be float32, both bfloat16 or both uint8 codes, "
            f"got {exp_avg.dtype} and {exp_avg_sq.dtype}"
        )
    if exp_avg.shape != (n, k) or exp_avg_sq.shape != (n, k):
        got = f"{tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)}"
        raise ValueError(f"adamw_step: states must be [{n}, {k}], got {got}")
    is_8bit = exp_avg.dtype == torch.uint8
    if is_8bit:
        if k % STATE_BLOCK:
            raise ValueError(
                f"adamw_step: 8-bit states need K={k} to be a multiple of {STATE_BLOCK} (whole state blocks per row)"
            )
        for name, t, shape in zip(("exp_avg_scale", "exp_avg_sq_scale", "exp_avg_qmap", "exp_avg_sq_qmap"),
                                  states8, [(n * k // STATE_BLOCK,)] * 2 + [(256,)] * 2):  # fmt: skip
            if t is None or t.dtype != torch.float32 or t.shape != shape:
                got = "None" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"adamw_step: 8-bit states need {name} float32 {list(shape)}, got {got}")
    elif any(t is not None for t in states8):
        raise ValueError("adamw_step: state scales and qmaps are only for uint8 (8-bit) states")
    mutated = [int_data, scale, exp_avg, exp_avg_sq] + ([states8[0], states8[1]] if is_8bit else [])
    if not all(t.is_contiguous() for t in mutated):
        raise ValueError("adamw_step: int_data, scale and the states are written in place and must be contiguous")
    if noise is not None and (noise.dtype != torch.float32 or noise.shape != (n, k)):
        raise ValueError(f"adamw_step: noise must be float32 [{n}, {k}], got {noise.dtype} {tuple(noise.shape)}")
    devices = {t.device for t in [int_data, scale, grad, exp_avg, exp_avg_sq, noise, *states8] if t is not None}
    if len(devices) > 1:
        raise ValueError(f"adamw_step: all tensors must share a device, got {sorted(map(str, devices))}")
    if not all(0.0 < b <= 1.0 for b in bias_corrections):
        raise ValueError(f"adamw_step: bias corrections must be in (0, 1], got {bias_corrections}")
    return is_8bit


def _scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2) -> dict[str, float]:
    """The step's scalars, folded once in float64 and used as fp32 by both implementations."""
    return dict(decay=1.0 - lr * weight_decay, c1=1.0 - beta1, beta2=beta2, c2=1.0 - beta2, eps=eps,
                sqrt_bc2=math.sqrt(bias_correction2), neg_step=-lr / bias_correction1)  # fmt: skip


# ---- reference ---------------------------------------------------------------------------------
def adamw_step_reference(
    int_data: Tensor, scale: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction1: float, bias_correction2: float, maximize: bool = False,
    exp_avg_scale: Tensor | None = None, exp_avg_sq_scale: Tensor | None = None,
    exp_avg_qmap: Tensor | None = None, exp_avg_sq_qmap: Tensor | None = None, noise: Tensor | None = None,
) -> None:  # fmt: skip
    """One AdamW step of ``W = int_data * scale[:, None]`` in plain PyTorch (fp32 math), in place.

    Args:
        int_data: ``[N, K]`` int8 codes and ``scale`` ``[N]`` float32: the weight, rewritten.
        grad: ``[N, K]`` float32, float16 or bfloat16 gradient.
        exp_avg, exp_avg_sq: ``[N, K]`` float32 or bfloat16 moments, or uint8 codes of 8-bit states (then
            ``exp_avg_scale`` / ``exp_avg_sq_scale`` ``[N * K / 256]`` block absmax and
            ``exp_avg_qmap`` / ``exp_avg_sq_qmap`` ``[256]`` code maps, and ``K % 256 == 0``).
        bias_correction1, bias_correction2: ``1 - beta1**step`` and ``1 - beta2**step``.
        noise: ``[N, K]`` float32 in ``[0, 1)`` for the stochastic rounding; ``torch.rand`` if None.

    The step: ``W *= 1 - lr * wd``; ``m += (1 - beta1) (g - m)``; ``v = beta2 v + (1 - beta2) g^2``;
    ``W -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``; then ``W`` is re-quantized per row with
    stochastic rounding (``quantize_rowwise_int8_reference``) and the moments are stored.

    Raises:
        TypeError, ValueError: wrong dtypes, shapes, devices, non-contiguous outputs, 8-bit states
            with ``K % 256 != 0``, bias corrections outside (0, 1].
    """
    states8 = (exp_avg_scale, exp_avg_sq_scale, exp_avg_qmap, exp_avg_sq_qmap)
    bias_corrections = (bias_correction1, bias_correction2)
    is_8bit = _check_args(int_data, scale, grad, exp_avg, exp_avg_sq, states8, noise, bias_corrections)
    c = _scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2)
    g = -grad.float() if maximize else grad.float()
    p = int_data.float() * scale[:, None]
    m = _state_value(exp_avg, exp_avg_scale, exp_avg_qmap) if is_8bit else exp_avg.float()
    v = _state_value(exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap) if is_8bit else exp_avg_sq.float()
    # Written op by op (no lerp/addcmul, which CPU torch computes with fused multiply-adds) so the
    # interpreted kernel, which performs the same ops in the same order, agrees bit for bit.
    p = p * c["decay"]
    m = m + c["c1"] * (g - m)
    v = v * c["beta2"] + c["c2"] * (g * g)
    denom = torch.sqrt(v) / c["sqrt_bc2"] + c["eps"]
    p = p + c["neg_step"] * (m / denom)
    q, s = quantize_rowwise_int8_reference(p, stochastic=True, noise=noise)
    int_data.copy_(q)
    scale.copy_(s)
    _write_state(m, exp_avg, exp_avg_scale, exp_avg_qmap)
    _write_state(v, exp_avg_sq, exp_avg_sq_scale, exp_avg_sq_qmap)


def _state_value(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    return (qmap[codes.long()].view(-1, STATE_BLOCK) * absmax[:, None]).view(codes.shape)


def _write_state(x: Tensor, out: Tensor, absmax: Tensor | None, qmap: Tensor | None) -> None:
    if absmax is None:
        out.copy_(x)
        return
    blocks = x.view(-1, STATE_BLOCK)
    new_absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)  # as OptimState8bit's quantize_8bit
    codes = torch.bucketize(blocks / new_absmax[:, None], (qmap[1:] + qmap[:-1]) / 2)
    out.copy_(codes.view(out.shape))
    absmax.copy_(new_absmax)


# ---- Triton --------------------------------------------------------------------------------------
@triton.jit
def _nearest_code_search(x, mid_ptr):
    """Index of the nearest code: how many of the 255 midpoints between codes are < x.

    Branchless binary search over the midpoint table (``(q[1:] + q[:-1]) / 2``, as torch's
    ``bucketize`` boundaries), steps 128, 64, ..., 1: the probed index ``pos + step - 1`` is at most
    254. One load per step (the 1 KB table stays in L1).
    """
    pos = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        mid = tl.load(mid_ptr + pos + ((128 >> i) - 1))
        pos = tl.where(mid < x, pos + (128 >> i), pos)
    return pos


@triton.jit
def _nearest_code_bucketed(x, info_ptr):
    """:func:`_nearest_code_search` in two loads, for a map whose code boundaries are far enough apart.

    The upper 16 bits of an fp32 value (sign, exponent, 7 mantissa bits) name its bucket: 1/128 of an
    octave, 65,536 buckets. ``info[256 + b]`` holds the code of bucket ``b``'s end nearest to 0
    (:func:`_bucket_codes`, int32 bits in the fp32 buffer); with at most one boundary between codes
    inside a bucket, one compare with the next midpoint settles the code. The 8-bit step is bound by
    instruction issue: this costs ~8 instructions a value, against ~65 for a candidate from the
    dynamic map's decades. (The table is 256 KB per map; the buckets a step touches, the magnitudes
    from ~1e-7 to 1 of a block's absmax, take ~25 KB.)
    """
    bits = x.to(tl.int32, bitcast=True)
    t = tl.load(info_ptr + 256 + ((bits >> 16) & 0xFFFF)).to(tl.int32, bitcast=True)
    return t + tl.where(tl.load(info_ptr + t) < x, 1, 0)  # info[255] = inf: code 255 stays


@triton.jit
def _nearest_code(x, info_ptr, MAP: tl.constexpr):
    """MAP 0: any sorted map (binary search; ``info`` holds the 255 midpoints); 1: ``info`` also holds
    inf and the bucket codes (:func:`_map_info`)."""
    if MAP == 0:
        return _nearest_code_search(x, info_ptr)
    else:
        return _nearest_code_bucketed(x, info_ptr)


@triton.jit
def _per_element(per_block, BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr):
    """``[BLOCK_B]`` block values repeated over each block's ``QBLOCK`` elements: ``[BLOCK_B * QBLOCK]``."""
    return tl.reshape(tl.broadcast_to(per_block[:, None], (BLOCK_B, QBLOCK)), (BLOCK_B * QBLOCK,))


@triton.jit
def _chunk_update(q_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, mq_ptr, vq_ptr, row, K, k0, old_scale,
                  decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                  STATE_8BIT: tl.constexpr, MAXIMIZE: tl.constexpr,
                  BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr):  # fmt: skip
    """The updated weight and moments (fp32) of one chunk of ``BLOCK_B * QBLOCK`` elements of a row, from
    the old ones. ``q_ptr``, ``g_ptr``, ``m_ptr``, ``v_ptr`` point at the row's first element.

    Tiles are 1-D (8-bit: BLOCK_B state blocks of QBLOCK = 256, reshaped to 2-D only to reduce each
    block): a 2-D tile with gathers (code -> value, midpoints) or [BLOCK_B, 1] block-scale pointers
    made Triton order the whole tile column-major, with 11 shared-memory layout conversions a chunk."""
    idx = k0 + tl.arange(0, BLOCK_B * QBLOCK)  # int32 offsets within the row
    mask = idx < K
    blk = (row * K + k0) // QBLOCK + tl.arange(0, BLOCK_B)  # 8-bit: the chunk's state blocks
    bmask = (k0 + tl.arange(0, BLOCK_B) * QBLOCK) < K
    p = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32) * old_scale
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if STATE_8BIT:
        m = tl.load(mq_ptr + tl.load(m_ptr + idx, mask=mask, other=0).to(tl.int32))
        m = m * _per_element(tl.load(ms_ptr + blk, mask=bmask, other=0.0), BLOCK_B, QBLOCK)
        v = tl.load(vq_ptr + tl.load(v_ptr + idx, mask=mask, other=0).to(tl.int32))
        v = v * _per_element(tl.load(vs_ptr + blk, mask=bmask, other=0.0), BLOCK_B, QBLOCK)
    else:
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    # The reference's ops in its order. `/` and sqrt are IEEE in the interpreter (bit-exact tests)
    # and the GPU's fast approximate forms (<= 2 ulp) in the kernel: their IEEE forms (div_rn,
    # sqrt_rn) cost more instructions than the step's memory traffic hides. Masked lanes stay 0.
    p = p * decay
    m = m + c1 * (g - m)
    v = v * beta2 + c2 * (g * g)
    denom = tl.sqrt(v) / sqrt_bc2 + eps
    p = p + neg_step * (m / denom)
    return p, m, v, idx, mask, blk, bmask


@triton.jit
def _store_state(x, ptr, absmax_ptr, mid_ptr, idx, mask, blk, bmask, STATE_8BIT: tl.constexpr, MAP: tl.constexpr,
                 BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr):  # fmt: skip
    if STATE_8BIT:
        absmax = tl.max(tl.reshape(tl.abs(x), (BLOCK_B, QBLOCK)), axis=1)
        absmax = tl.maximum(absmax, 1e-12)  # one per state block
        tl.store(absmax_ptr + blk, absmax, mask=bmask)
        y = x / _per_element(absmax, BLOCK_B, QBLOCK)
        tl.store(ptr + idx, _nearest_code(y, mid_ptr, MAP).to(tl.uint8), mask=mask)
    elif ptr.dtype.element_ty == tl.bfloat16:  # rounded to nearest (even), as torch's bf16 moments
        tl.store(ptr + idx, _round_to_bf16(x).to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr + idx, x, mask=mask)


@triton.jit
def _uniform(seed, first, N: tl.constexpr):
    """U(0, 1) per element of a 1-D tile of N (% 8 == 0) elements with global indices ``first + i``,
    16 random bits each: one Philox call (4 x 32 bits) serves 8 elements, element ``8j + i`` takes
    half ``i % 2`` of draw ``i // 2`` of counter ``first + 8j + 7`` (a row's groups start at its first
    element, so two rows share a counter only in groups past the end of one of them, whose draws are
    unused). The draws are ``(k + 1/2) / 2**16`` for ``k`` uniform in ``[0, 2**16)``: stochastic
    rounding with them rounds up with probability ``f`` rounded to a multiple of 2**-16, an unbiased
    error of at most 2**-17 of a code step, for half the Philox work of a 32-bit draw per element."""
    ctr = first + 8 * tl.arange(0, N // 8) + 7  # a distinct counter per group of 8
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # [N // 2]: r0 r1 r2 r3 per group
    k = tl.interleave(bits & 0xFFFF, bits >> 16)  # [N]: low, high half of each
    return k.to(tl.float32) * (1.0 / 65536.0) + (0.5 / 65536.0)


@triton.jit
def _store_weight(p, rbase, k0, K, new_scale, q_row, n_row, seed, HAS_NOISE: tl.constexpr, N: tl.constexpr):
    """Re-quantize one chunk of N updated weights (fp32) of a row under its new scale with stochastic
    rounding and store the int8 codes; ``q_row`` / ``n_row`` point at the row's first element."""
    idx = k0 + tl.arange(0, N)
    mask = idx < K
    x = p / new_scale
    if HAS_NOISE:
        u = tl.load(n_row + idx, mask=mask, other=0.0)
    else:
        u = _uniform(seed, rbase + k0, N)  # counters: global element indices
    lo = tl.floor(x)
    x = lo + tl.where(u < x - lo, 1.0, 0.0)  # stochastic rounding, exact: x - floor(x) is exact in fp32
    x = tl.minimum(tl.maximum(x, -127.0), 127.0)
    tl.store(q_row + idx, x.to(tl.int8), mask=mask)


@triton.jit
def _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K, k0,
                old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                STATE_8BIT: tl.constexpr, MAP_M: tl.constexpr, MAP_V: tl.constexpr, MAXIMIZE: tl.constexpr,
                STORE_STATES: tl.constexpr, BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr):  # fmt: skip
    """The updated weights (fp32) of one chunk of a row; with STORE_STATES the chunk's new moments are
    written (they do not depend on the row's new scale; the chunk's old ones are read first)."""
    p, m, v, idx, mask, blk, bmask = _chunk_update(
        q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, row, K, k0, old_scale,
        decay, c1, beta2, c2, eps, sqrt_bc2, neg_step, STATE_8BIT, MAXIMIZE, BLOCK_B, QBLOCK)  # fmt: skip
    if STORE_STATES:
        _store_state(m, m_row, ms_ptr, mmid_ptr, idx, mask, blk, bmask, STATE_8BIT, MAP_M, BLOCK_B, QBLOCK)
        _store_state(v, v_row, vs_ptr, vmid_ptr, idx, mask, blk, bmask, STATE_8BIT, MAP_V, BLOCK_B, QBLOCK)
    return p


@triton.jit
def _adamw_row(
    row, q_ptr, s_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, noise_ptr,
    K, seed, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
    STATE_8BIT: tl.constexpr, MAP_M: tl.constexpr, MAP_V: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_NOISE: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    """The step of one row (int64 ``row``) of one weight; the kernels below pick the weight and row.

    CHUNKS 1-4: the row is that many chunks of ``BLOCK_B * QBLOCK`` elements, their updated weights
    held in registers (one read of everything, one write); 0: a longer row, two passes."""
    old_scale = tl.load(s_ptr + row)
    # Row pointers, so that per-element offsets are int32 (fewer registers, more programs per SM).
    rbase = row * K
    q_row, g_row, m_row, v_row = q_ptr + rbase, g_ptr + rbase, m_ptr + rbase, v_ptr + rbase
    n_row = noise_ptr + rbase if HAS_NOISE else noise_ptr
    C: tl.constexpr = BLOCK_B * QBLOCK
    if CHUNKS > 0:  # each chunk: read, update, write its moments; keep its weights until the scale is known
        p0 = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K, 0,
                         old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                         STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, True, BLOCK_B, QBLOCK)  # fmt: skip
        amax = tl.abs(p0)
        p1, p2, p3 = p0, p0, p0  # defined on every path; used only where CHUNKS says
        if CHUNKS > 1:
            p1 = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K,
                             C, old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                             STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, True, BLOCK_B, QBLOCK)  # fmt: skip
            amax = tl.maximum(amax, tl.abs(p1))
        if CHUNKS > 2:
            p2 = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K,
                             2 * C, old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                             STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, True, BLOCK_B, QBLOCK)  # fmt: skip
            amax = tl.maximum(amax, tl.abs(p2))
        if CHUNKS > 3:
            p3 = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K,
                             3 * C, old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                             STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, True, BLOCK_B, QBLOCK)  # fmt: skip
            amax = tl.maximum(amax, tl.abs(p3))
        new_scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), 1e-12)
        _store_weight(p0, rbase, 0, K, new_scale, q_row, n_row, seed, HAS_NOISE, C)
        if CHUNKS > 1:
            _store_weight(p1, rbase, C, K, new_scale, q_row, n_row, seed, HAS_NOISE, C)
        if CHUNKS > 2:
            _store_weight(p2, rbase, 2 * C, K, new_scale, q_row, n_row, seed, HAS_NOISE, C)
        if CHUNKS > 3:
            _store_weight(p3, rbase, 3 * C, K, new_scale, q_row, n_row, seed, HAS_NOISE, C)
    else:  # pass 1: absmax of the updated row; pass 2: the same update again, written
        acc = tl.zeros((C,), dtype=tl.float32)
        for k0 in range(0, K, C):
            p = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K, k0,
                            old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                            STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, False, BLOCK_B, QBLOCK)  # fmt: skip
            acc = tl.maximum(acc, tl.abs(p))
        new_scale = tl.maximum(tl.math.div_rn(tl.max(acc, axis=0), 127.0), 1e-12)
        for k0 in range(0, K, C):  # chunk k0 is read before it is overwritten
            p = _chunk_step(q_row, g_row, m_row, v_row, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, row, K, k0,
                            old_scale, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
                            STATE_8BIT, MAP_M, MAP_V, MAXIMIZE, True, BLOCK_B, QBLOCK)  # fmt: skip
            _store_weight(p, rbase, k0, K, new_scale, q_row, n_row, seed, HAS_NOISE, C)
    tl.store(s_ptr + row, new_scale)


# A fresh seed every call: without do_not_specialize, Triton specializes on seed % 16 == 0 and
# seed == 1 and compiles new variants mid-training (measured: 0.6-1.7 s stalls on H100).
@triton.jit(do_not_specialize=["seed"])
def _adamw_step_kernel(
    q_ptr, s_ptr, g_ptr,  # int8 [N, K] and fp32 [N] (read, then written); grad [N, K]
    m_ptr, v_ptr,  # states [N, K]: fp32, or uint8 codes if STATE_8BIT (read, then written)
    ms_ptr, vs_ptr, mq_ptr, vq_ptr,  # 8-bit only: block absmax [N * K / 256] and code maps [256]
    mmid_ptr, vmid_ptr,  # 8-bit only: the maps' nearest-code info (_map_info: midpoints, bucket codes)
    noise_ptr,  # [N, K] fp32 (read only if HAS_NOISE)
    K, seed, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
    STATE_8BIT: tl.constexpr, MAP_M: tl.constexpr, MAP_V: tl.constexpr,  # MAP_*: see _nearest_code
    MAXIMIZE: tl.constexpr, HAS_NOISE: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: row * K can pass 2**31 for large weights
    _adamw_row(row, q_ptr, s_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, noise_ptr,
               K, seed, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step, STATE_8BIT, MAP_M, MAP_V, MAXIMIZE,
               HAS_NOISE, CHUNKS, BLOCK_B, QBLOCK)  # fmt: skip


_TABLE = 8  # int64 entries per weight in the multi-tensor table: 7 addresses + the row count


@triton.jit
def _table_ptr(base, i, like):
    """Address ``i`` of a weight's table row, typed as ``like``; 16-byte aligned (the launcher checks), which
    the compiler must be told: without it, loads from a pointer read out of memory are not vectorized
    (measured on H200: the bf16-state step of the anchor model 2.23 ms instead of 1.31)."""
    return tl.multiple_of(tl.load(base + i).to(like.dtype), 16)


@triton.jit(do_not_specialize=["seed"])
def _adamw_step_multi_kernel(
    tab_ptr,  # int64 [T, 8]: addresses of int_data, scale, grad, exp_avg, exp_avg_sq, their 8-bit
    # block absmaxes (or 0), then the weight's row count
    q_ptr, s_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr,  # weight 0's tensors: their types type the table's addresses
    mq_ptr, vq_ptr, mmid_ptr, vmid_ptr,  # shared code maps and their nearest-code info (8-bit only)
    K, seed, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step,
    STATE_8BIT: tl.constexpr, MAP_M: tl.constexpr, MAP_V: tl.constexpr, MAXIMIZE: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, QBLOCK: tl.constexpr,
):  # fmt: skip
    """Weights sharing K, dtypes and step scalars in one launch: program (row, t) updates row ``row``
    of weight ``t`` (grid: the most rows x T); weight t draws its noise from ``seed + t``."""
    t = tl.program_id(1)
    row = tl.program_id(0).to(tl.int64)
    base = tab_ptr + t * 8
    if row < tl.load(base + 7):
        _adamw_row(
            row, _table_ptr(base, 0, q_ptr), _table_ptr(base, 1, s_ptr), _table_ptr(base, 2, g_ptr),
            _table_ptr(base, 3, m_ptr), _table_ptr(base, 4, v_ptr), _table_ptr(base, 5, ms_ptr),
            _table_ptr(base, 6, vs_ptr),
            mq_ptr, vq_ptr, mmid_ptr, vmid_ptr, s_ptr,  # s_ptr: a dummy noise pointer (never read)
            K, seed + t, decay, c1, beta2, c2, eps, sqrt_bc2, neg_step, STATE_8BIT, MAP_M, MAP_V, MAXIMIZE,
            False, CHUNKS, BLOCK_B, QBLOCK,
        )  # fmt: skip


def _tiles(k: int, is_8bit: bool) -> dict:
    """Chunk (BLOCK_B x QBLOCK elements), chunks per row held in registers (0: two passes) and warps
    for rows of ``k`` elements."""
    if is_8bit:  # chunks of BLOCK_B state blocks of 256: a state block's absmax is one row reduction
        qblock, block_b = STATE_BLOCK, min(triton.next_power_of_2(k // STATE_BLOCK), _MAX_BLOCK_K // STATE_BLOCK)
    else:
        qblock, block_b = min(max(8, triton.next_power_of_2(k)), _MAX_BLOCK_K), 1  # >= 8: _uniform's groups
    chunks = triton.cdiv(k, block_b * qblock)
    # ~8 elements per thread (see _MAX_BLOCK_K)
    return dict(CHUNKS=chunks if chunks <= _MAX_CHUNKS else 0, BLOCK_B=block_b, QBLOCK=qblock,
                num_warps=min(16, max(4, block_b * qblock // 256)))  # fmt: skip


def _launch(kernel, int_data, scale, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale,
            maps, mids, map_kinds, noise, scalars, seed, maximize) -> None:  # fmt: skip
    n, k = int_data.shape
    if n == 0 or k == 0:
        return
    is_8bit = exp_avg_scale is not None
    if not is_8bit:
        maps = mids = (scale, scale)  # dummy pointers: the kernel reads no map
    absmaxes = (exp_avg_scale, exp_avg_sq_scale) if is_8bit else (scale, scale)
    kernel[(n,)](
        int_data, scale, grad, exp_avg, exp_avg_sq, *absmaxes, *maps, *mids,
        noise if noise is not None else scale,  # a dummy pointer when the kernel reads no noise
        k, seed, *scalars,
        STATE_8BIT=is_8bit, MAP_M=map_kinds[0], MAP_V=map_kinds[1], MAXIMIZE=maximize, HAS_NOISE=noise is not None,
        **_tiles(k, is_8bit),
    )  # fmt: skip


# triton_op + wrap_triton let torch.compile trace into the kernel (e.g. a compiled optimizer step);
# eager calls launch it directly (adamw_step_triton): the op's dispatch cost ~30 us of host time a
# weight, which an optimizer step pays once per parameter.
@triton_op(
    "quantframe::adamw_step",
    mutates_args={"int_data", "scale", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"},
)
def _adamw_step_op(
    int_data: Tensor, scale: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    exp_avg_scale: Tensor | None, exp_avg_sq_scale: Tensor | None, exp_avg_qmap: Tensor | None,
    exp_avg_sq_qmap: Tensor | None, noise: Tensor | None, scalars: list[float], seed: int, maximize: bool,
) -> None:  # fmt: skip
    """Arguments already checked by :func:`adamw_step_triton`. Traced, a map is any sorted map (search)."""
    maps = (exp_avg_qmap, exp_avg_sq_qmap)
    mids = tuple((q[1:] + q[:-1]) * 0.5 for q in maps) if exp_avg_scale is not None else None
    _launch(wrap_triton(_adamw_step_kernel), int_data, scale, grad, exp_avg, exp_avg_sq, exp_avg_scale,
            exp_avg_sq_scale, maps, mids, (0, 0), noise, scalars, seed, maximize)  # fmt: skip


_MAPS: dict[tuple, tuple] = {}  # (device, data_ptr) -> (map, its _version, info, kind)


def _bucket_codes(mids: Tensor) -> Tensor | None:
    """int32 ``[65536]``: for each bucket of :func:`_nearest_code_bucketed` (the fp32 values sharing their
    upper 16 bits), the code of its end nearest to 0, i.e. ``bucketize`` there; None if some bucket
    holds more than one midpoint (codes closer than ~1/128 of their magnitude) or ``mids`` is unsorted."""
    if not bool((mids[1:] > mids[:-1]).all()):
        return None
    upper = torch.arange(2**15, dtype=torch.int32)  # sign 0; the sign only mirrors the bucket
    lo = (upper << 16).view(torch.float32)  # views of fresh int tensors: written below
    hi = ((upper + 1) << 16).view(torch.float32)  # the next bucket's start: inf after the last finite one
    special = upper >= 0x7F80  # inf and NaN: beyond every code
    lo[special], hi[special] = math.inf, math.inf
    pos = torch.bucketize(lo, mids)  # x in [lo, hi): code pos, or pos + 1 past mids[pos]
    neg = torch.bucketize(-hi, mids, right=True)  # x in (-hi, -lo]: code neg, or neg + 1 past mids[neg]
    if (torch.bucketize(hi, mids) - pos).max() > 1 or (torch.bucketize(-lo, mids) - neg).max() > 1:
        return None
    return torch.cat([pos, neg]).to(torch.int32)


def _map_info(qmap: Tensor) -> tuple[Tensor, int]:
    """``(info, kind)`` of a code map for :func:`_nearest_code`: ``info`` starts with the 255 midpoints
    ``(q[1:] + q[:-1]) / 2`` (bucketize's boundaries, as the reference); kind 1 if inf and the bucket
    codes follow (any sorted map whose neighbouring codes differ by more than ~1/128 of their size, as the
    dynamic maps), else 0 (binary search). Cached per map: OptimState8bit's maps are shared and never
    written (``_version`` catches one that is), so the table (one device sync) is built once per map,
    not per step; the entry holds the map, so no other tensor can take its address."""
    key = (qmap.device, qmap.data_ptr())
    hit = _MAPS.get(key)
    if hit is None or hit[1] != qmap._version or hit[0].shape != qmap.shape:
        mids = (qmap[1:] + qmap[:-1]) * 0.5
        codes = _bucket_codes(mids.cpu()) if qmap.numel() == 256 else None
        if codes is None:
            info = mids
        else:  # inf after the midpoints: the compare after code 255 is always false
            tail = torch.cat([torch.tensor([math.inf]), codes.view(torch.float32)]).to(mids.device)
            info = torch.cat([mids, tail])
        hit = _MAPS[key] = (qmap, qmap._version, info, 0 if codes is None else 1)
    return hit[2], hit[3]


def adamw_step_triton(
    int_data: Tensor, scale: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction1: float, bias_correction2: float, maximize: bool = False,
    exp_avg_scale: Tensor | None = None, exp_avg_sq_scale: Tensor | None = None,
    exp_avg_qmap: Tensor | None = None, exp_avg_sq_qmap: Tensor | None = None, noise: Tensor | None = None,
    seed: int | None = None,
) -> None:  # fmt: skip
    """Triton version of :func:`adamw_step_reference` (one program per row); same arguments and errors.

    ``seed`` (an int in ``[0, 2**31 - 1)``) seeds the in-kernel Philox draws when ``noise`` is None;
    by default it comes from torch's CPU generator, so ``torch.manual_seed`` makes a step reproducible.
    """
    states8 = (exp_avg_scale, exp_avg_sq_scale, exp_avg_qmap, exp_avg_sq_qmap)
    _check_args(int_data, scale, grad, exp_avg, exp_avg_sq, states8, noise, (bias_correction1, bias_correction2))
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if noise is None else 0
    scalars = list(_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2).values())
    grad, noise = grad.contiguous(), noise.contiguous() if noise is not None else None
    if is_traced(int_data):
        torch.ops.quantframe.adamw_step(
            int_data, scale, grad, exp_avg, exp_avg_sq, *states8, noise, scalars, seed, maximize
        )
        return
    maps = (exp_avg_qmap, exp_avg_sq_qmap)
    mids, kinds = zip(*map(_map_info, maps)) if exp_avg_scale is not None else (None, (0, 0))
    _launch(_adamw_step_kernel, int_data, scale, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale,
            maps, mids, kinds, noise, scalars, seed, maximize)  # fmt: skip


def adamw_step(int_data: Tensor, scale: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, **kwargs) -> None:
    """One fused AdamW step of a per-row int8 weight, in place: Triton on CUDA, else the reference.

    Same keyword arguments, effect and errors as :func:`adamw_step_reference`. Without ``noise``
    the two paths draw different (equally distributed) rounding noise.
    """
    if use_triton(int_data):
        adamw_step_triton(int_data, scale, grad, exp_avg, exp_avg_sq, **kwargs)
    else:
        adamw_step_reference(int_data, scale, grad, exp_avg, exp_avg_sq, **kwargs)


# ---- many weights, one launch ------------------------------------------------------------------
_WEIGHT_KEYS = ("int_data", "scale", "grad", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")


def _multi_args(weights: list[dict], kwargs: dict) -> tuple[bool, int]:
    """Check each weight as :func:`adamw_step` would, and that they can share one launch; (8-bit, K)."""
    if "noise" in kwargs:
        raise TypeError("adamw_step_multi: takes no noise (each weight draws its own from seed + t)")
    if not weights:
        raise ValueError("adamw_step_multi: no weights")
    shared = {key: kwargs.get(key) for key in ("exp_avg_qmap", "exp_avg_sq_qmap")}
    first = weights[0]
    for i, w in enumerate(weights):
        unknown = set(w) - set(_WEIGHT_KEYS)
        if unknown:
            raise TypeError(f"adamw_step_multi: weight {i} has unknown keys {sorted(unknown)}; allowed: {_WEIGHT_KEYS}")
        states8 = (w.get("exp_avg_scale"), w.get("exp_avg_sq_scale"), shared["exp_avg_qmap"], shared["exp_avg_sq_qmap"])
        _check_args(w["int_data"], w["scale"], w["grad"], w["exp_avg"], w["exp_avg_sq"], states8, None,
                    (kwargs["bias_correction1"], kwargs["bias_correction2"]))  # fmt: skip
        same = all(getattr(w[name], attr) == getattr(first[name], attr) for name, attr in
                   (("int_data", "device"), ("grad", "dtype"), ("exp_avg", "dtype"))) and (
            w["int_data"].shape[1] == first["int_data"].shape[1])  # fmt: skip
        if not same:
            raise ValueError(
                f"adamw_step_multi: weight {i} differs from weight 0 in K, grad dtype, state dtype or device; "
                f"one launch needs them equal (group the weights by them)"
            )
    return first["exp_avg"].dtype == torch.uint8, first["int_data"].shape[1]


def adamw_step_multi(weights: list[dict], *, seed: int | None = None, check: bool = True, **kwargs) -> None:
    """:func:`adamw_step` of several weights at once; on CUDA one launch for all of them.

    Each entry of ``weights`` holds that weight's tensors under the names :func:`adamw_step` takes
    them (``int_data``, ``scale``, ``grad``, ``exp_avg``, ``exp_avg_sq`` and, for 8-bit states,
    ``exp_avg_scale``, ``exp_avg_sq_scale``); ``kwargs`` are the shared keyword arguments of
    :func:`adamw_step` (hyperparameters, bias corrections, ``maximize``, the 8-bit code maps), without
    ``noise``. The weights must share K (row length), grad and state dtypes and device. One launch
    instead of one per weight: an optimizer step pays the Python and launch cost (~100 us per launch
    on the GPU host) once per group, not once per parameter. Weight ``t`` draws its rounding noise
    from ``seed + t``, so the result equals ``adamw_step`` of each weight with that seed.
    ``check=False`` skips the argument checks, for a caller that has passed the same layout through
    them before (the optimizer, once per weight; ~10 µs of Python a weight).

    Raises:
        TypeError / ValueError: as :func:`adamw_step` for each weight, an unknown key, or weights that
            cannot share a launch.
    """
    if check:
        is_8bit, k = _multi_args(weights, kwargs)
    else:
        is_8bit, k = weights[0]["exp_avg"].dtype == torch.uint8, weights[0]["int_data"].shape[1]
    int_data = weights[0]["int_data"]
    if not use_triton(int_data):
        for w in weights:
            adamw_step_reference(**w, **kwargs)
        return
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1 - len(weights), (1,)).item())
    if is_traced(int_data):  # traced: one traceable op per weight
        for t, w in enumerate(weights):
            adamw_step_triton(**w, **kwargs, seed=seed + t)
    else:
        _multi_launch(weights, is_8bit, k, seed, kwargs)


def adamw_step_multi_triton(weights: list[dict], *, seed: int, **kwargs) -> None:
    """The one launch of :func:`adamw_step_multi` (any device the Triton backend runs on: CUDA, or
    CPU under ``TRITON_INTERPRET=1``); same arguments and errors."""
    _multi_launch(weights, *_multi_args(weights, kwargs), seed, kwargs)


def _multi_launch(weights: list[dict], is_8bit: bool, k: int, seed: int, kwargs: dict) -> None:
    weights = [dict(w, grad=w["grad"].contiguous()) for w in weights if w["int_data"].numel()]
    if not weights:
        return
    if any(w[name].data_ptr() % 16 for w in weights for name in _WEIGHT_KEYS if w.get(name) is not None):
        for t, w in enumerate(weights):  # the kernel assumes 16-byte aligned tensors (_table_ptr)
            adamw_step_triton(**w, **kwargs, seed=seed + t)
        return
    lr, beta1, beta2, eps, wd = (kwargs[n] for n in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    scalars = list(_scalars(lr, beta1, beta2, eps, wd, kwargs["bias_correction1"], kwargs["bias_correction2"]).values())
    rows, table = 0, []
    for w in weights:
        rows = max(rows, w["int_data"].shape[0])
        table += [w[name].data_ptr() if w.get(name) is not None else 0 for name in _WEIGHT_KEYS]
        table.append(w["int_data"].shape[0])
    table = torch.tensor(table, dtype=torch.int64)
    device = weights[0]["int_data"].device
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
    first = weights[0]
    if is_8bit:
        maps = (kwargs["exp_avg_qmap"], kwargs["exp_avg_sq_qmap"])
        mids, kinds = zip(*map(_map_info, maps))
        absmaxes = (first["exp_avg_scale"], first["exp_avg_sq_scale"])
    else:
        maps = mids = absmaxes = (first["scale"], first["scale"])  # dummies: the kernel reads no map
        kinds = (0, 0)
    _adamw_step_multi_kernel[(rows, len(weights))](
        table, first["int_data"], first["scale"], first["grad"], first["exp_avg"], first["exp_avg_sq"], *absmaxes,
        *maps, *mids, k, seed, *scalars,
        STATE_8BIT=is_8bit, MAP_M=kinds[0], MAP_V=kinds[1], MAXIMIZE=kwargs.get("maximize", False),
        **_tiles(k, is_8bit),
    )  # fmt: skip
