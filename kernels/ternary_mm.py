"""BitNet b1.58 inference matmul: INT8 per-token activations x packed 2-bit ternary weights.

``y [..., N] = xq [..., K] @ Wq.T (+ bias)`` with, per token, ``sx = max(max_k |x|, 1e-5) / 127``,
``xq = clamp(round(x / sx), -128, 127) * sx`` and ``Wq = (code - 1) * s``, where ``packed`` uint8
``[N, ceil(K / 4)]`` holds four 2-bit codes a byte (first in the lowest bits, K padded with
code 1 = ternary 0) and ``s`` is one fp32 scale: the layout of :class:`quantframe.ternary.TernaryWeight`.

The activation codes (the fp32 formula of ``quantframe.ternary.quantize_activations_int8``) come
from one Triton pass (``_quantize_tokens_kernel``; one token: inside the GEMV); the kernels unpack
the weight in registers and accumulate ``int8 x ternary`` products exactly in int32, then apply
``sx * s`` once per output:

* ``M <= 16`` (decode): ``_ternary_gemv_kernel``, one program per ``BLOCK_N`` outputs holding
  every row of x, multiply-and-sum on CUDA cores; the weight is read once at 2 bits a value. One
  row of word-aligned codes takes int32 words, four products a ``dp4a`` (``_ternary_dp4a_row``), and
  one float token (``FUSE_ONE_TOKEN``) is quantized inside that GEMV (``_ternary_token_gemv_kernel``:
  one launch instead of two).
* more rows: ``_ternary_gemm_kernel``, ``tl.dot`` of int8 tiles into int32 (fp32 tiles under
  the interpreter, exact below 2**24).

Forward only: :class:`quantframe.ternary.TernaryWeight`'s ``F.linear`` supplies the STE backward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from quantframe import primitives as P

from . import call_op, use_triton
from . import _weight_mm as wmm
# dp4a, load_words, round_half_even: bare names (inductor resolves a user kernel's jit helpers by name)
from ._weight_mm import DENSE_MIN_ROWS, dp4a, load_words, rows
from .int8_rowwise import round_half_even

__all__ = ["ternary_mm", "ternary_mm_dense", "ternary_mm_reference", "ternary_mm_triton", "ternary_unpack_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() == 0:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"ternary_mm: x must be a float tensor [..., K], got {got}")
    k = x.shape[-1]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-k // 4):
        raise ValueError(
            f"ternary_mm: packed must be uint8 [N, {-(-k // 4)}] for K={k} (x.shape[-1]), got {packed.dtype} {tuple(packed.shape)}"
        )
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"ternary_mm: scale must be one float value, got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (packed.shape[0],)):
        raise ValueError(
            f"ternary_mm: bias must be a float [{packed.shape[0]}] tensor, got {bias.dtype} {tuple(bias.shape)}"
        )
    devices = {t.device for t in (x, packed, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"ternary_mm: x, packed, scale and bias must share a device, got {sorted(map(str, devices))}")


def _quantize_tokens(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes ``[M, K]`` and fp32 ``sx [M, 1]``: quantframe.ternary.quantize_activations_int8's ops."""
    x2d = x2d.float()
    a = x2d.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    c127 = torch.full_like(a, 127.0)  # tensor / tensor: IEEE division on CUDA too
    return torch.round(x2d * (c127 / a)).clamp(-128, 127).to(torch.int8), a / c127


def ternary_mm_reference(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``xq @ Wq.T (+ bias)`` in fp32, cast to ``x.dtype``: exactly TernaryWeight's ``F.linear`` on CPU.

    Args:
        x: ``[..., K]`` float activations (quantized here, per token).
        packed: uint8 ``[N, ceil(K / 4)]``; scale: fp32 scalar; bias: ``[N]`` float or None.

    Returns ``[..., N]`` in ``x.dtype``. Raises TypeError / ValueError for mismatched arguments.
    """
    _check_args(x, packed, scale, bias)
    k = x.shape[-1]
    codes, sx = _quantize_tokens(x.reshape(-1, k))
    wq = (P.unpack_bits(packed, 2)[:, :k].to(torch.int8) - 1).float() * scale
    y = torch.nn.functional.linear(codes.float() * sx, wq, None if bias is None else bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], packed.shape[0])


# ---- Triton ------------------------------------------------------------------------------------
@triton.jit
def _ternary_tile(p_ptr, offs_n, mask_n, k0, KB, stride_pn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 ternary ``[BLOCK_N, BLOCK_K]`` tile at column ``k0`` (a multiple of 4); 0 past K."""
    # The tile's BLOCK_K / 4 bytes load as one contiguous (vectorized) run; element 4i + j is bits
    # 2j..2j+1 of byte i, put back into K order by two rounds of interleaving.
    rb = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    p = tl.load(p_ptr + offs_n[:, None] * stride_pn + rb[None, :], mask=mask_n[:, None] & (rb < KB)[None, :], other=85)
    p = p.to(tl.int32)  # 85 = 0b01010101: four codes 1 (ternary 0) in masked bytes
    q = tl.interleave(tl.interleave(p & 3, (p >> 4) & 3), tl.interleave((p >> 2) & 3, (p >> 6) & 3))
    return (q - 1).to(tl.int8)


@triton.jit
def _epilogue(
    acc, sx_ptr, s_ptr, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS: tl.constexpr
):
    """``y.T [BLOCK_N, BLOCK_M] = acc * s * sx (+ bias)`` in fp32, stored in y's dtype."""
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    out = acc.to(tl.float32) * tl.load(s_ptr) * sx[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn, out.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_m[None, :])  # fmt: skip


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dp4a_codes(word, t: tl.constexpr, xt, acc, x_sum):
    """``acc += codes . x`` and ``x_sum += sum(x)`` for the four codes ``t`` of each byte of ``word``
    (``(word >> 2t) & 0x03030303``: elements ``16i + t + {0, 4, 8, 12}``, one a byte) and ``xt``, the
    int8 x codes of those elements packed in the same byte order (one ``dp4a`` each)."""
    codes = (word >> 2 * t) & 0x03030303
    acc = dp4a(codes, tl.broadcast_to(xt[None, :], codes.shape), acc)
    return acc, dp4a(tl.full(xt.shape, 0x01010101, tl.int32), xt, x_sum)


@triton.jit
def _ternary_dp4a_row(x_ptr, p_ptr, offs_n, mask_n, K, stride_pn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 ``[BLOCK_N, 1]`` = one row of int8 x codes times ternary codes read as int32 words
    (``packed`` rows and x 4-byte aligned, ``K % 16 == 0``; ``stride_pn`` in bytes), exact, four codes
    a ``dp4a``. Word ``i`` holds elements ``16i + 4b + t`` in bits ``8b + 2t .. 8b + 2t + 1`` (code
    ``c``, weight ``c - 1``), so ``(word >> 2t) & 0x03030303`` is four codes, one a byte: elements
    ``16i + t + (0, 4, 8, 12)``; x's four words of the same 16 elements are transposed once per tile
    into that order (bytes ``t`` of each), shared by the ``BLOCK_N`` rows. Per row and word: one
    mask, three shift-and-masks, four ``dp4a``; the ``- 1`` comes off once per x word as
    ``dp4a(0x01010101, x)``."""
    offs_w = tl.arange(0, BLOCK_K // 16).to(tl.int64)
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N, BLOCK_K // 16), dtype=tl.int32)
    x_sum = tl.zeros((BLOCK_K // 16,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w_idx = k0 // 16 + offs_w
        mask_w = w_idx < K // 16
        word = load_words(p_ptr, offs_n, mask_n, w_idx, K // 16, stride_pn)  # 0 past K or N: codes 0
        xw0 = tl.load(x32 + 4 * w_idx, mask=mask_w, other=0)  # x[16i .. 16i + 3]
        xw1 = tl.load(x32 + 4 * w_idx + 1, mask=mask_w, other=0)
        xw2 = tl.load(x32 + 4 * w_idx + 2, mask=mask_w, other=0)
        xw3 = tl.load(x32 + 4 * w_idx + 3, mask=mask_w, other=0)
        for t in tl.static_range(4):
            # bytes t of x's four words: x[16i + t + (0, 4, 8, 12)], the order of the codes below
            xt = ((xw0 >> 8 * t) & 0xFF) | (((xw1 >> 8 * t) & 0xFF) << 8)
            xt = xt | (((xw2 >> 8 * t) & 0xFF) << 16) | ((xw3 >> 8 * t) << 24)
            acc, x_sum = _dp4a_codes(word, t, xt, acc, x_sum)
    # codes 0 past K meet x = 0; rows past N are masked at the store
    return (tl.sum(acc, axis=1) - tl.sum(x_sum, axis=0))[:, None]


def _gemv_configs() -> list[triton.Config]:
    if _interpreted():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "WORDS": False}, num_warps=4)]
    shapes = [(16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (16, 256), (64, 128), (32, 256)]
    # Long K tiles: for the one-row affine GEMVs they decided the time on H200 (int8 16 x 256: 20.7 us,
    # 16 x 128: 28.0; int4 30 -> 17 us with 1,024-code tiles).
    shapes += [(16, 512), (8, 512), (8, 1024)]
    plain = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "WORDS": False}, num_warps=4, num_stages=3) for n, k in shapes]
    # WORDS: _ternary_dp4a_row, ~0.8 sm_90 instructions a code in its loop, no spills. H200, 14336 x 4096, one
    # row: 10.0-17.2 us (16 x 2,048 best) against 20.2 for float-trick words (removed) and 31.4 for bytes.
    dp4a = [(16, 1024), (32, 1024), (16, 2048), (32, 2048), (64, 1024), (64, 2048)]
    return plain + [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "WORDS": True}, num_warps=4, num_stages=3)
                    for n, k in dp4a]  # fmt: skip


def _prune_gemv(configs, named_args, **kwargs):
    """The ``[BLOCK_N, BLOCK_K, BLOCK_M]`` int32 product must fit in registers (<= 64 a thread at 4
    warps); the words tiles (int32 tiles of ``BLOCK_K / 16`` per row) only for one row of aligned
    codes (``WORDS_OK``)."""
    plain = [c for c in configs if not c.kwargs["WORDS"]]
    fit = [c for c in plain if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * kwargs["BLOCK_M"] <= 8192]
    words = wmm.words_configs(configs, kwargs)
    return (fit or plain[:1]) + words


@triton.autotune(
    configs=_gemv_configs(), key=["N", "K", "BLOCK_M", "WORDS_OK"], prune_configs_by={"early_config_prune": _prune_gemv}
)
@triton.jit
def _ternary_gemv_kernel(
    x_ptr, sx_ptr, p_ptr, s_ptr, b_ptr, y_ptr,  # x int8 [M, K], sx fp32 [M], packed [N, KB], s fp32 [], bias [N], y [M, N]
    M, N, K, KB, stride_xm, stride_pn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    WORDS_OK: tl.constexpr,  # one row of codes in whole, aligned int32 words: the words tiles may run
    BLOCK_M: tl.constexpr,  # next power of two >= M (<= 16)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 4 (words tiles: of 16)
    WORDS: tl.constexpr,  # int32 words, four codes a dp4a (_ternary_dp4a_row); else byte tiles
):  # fmt: skip
    if WORDS:
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
        acc = _ternary_dp4a_row(x_ptr, p_ptr, offs_n, offs_n < N, K, stride_pn, BLOCK_N, BLOCK_K)
        _epilogue(acc, sx_ptr, s_ptr, b_ptr, y_ptr, offs_n, offs_m, offs_n < N, offs_m < M, stride_ym, stride_yn,
                  HAS_BIAS)  # fmt: skip
        return
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n, mask_m = offs_n < N, offs_m < M
    if BLOCK_M == 1:
        # One token: products accumulate in a [BLOCK_N, BLOCK_K] tile, reduced across K once at the end.
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            w = _ternary_tile(p_ptr, offs_n, mask_n, k0, KB, stride_pn, BLOCK_N, BLOCK_K).to(tl.int32)
            rk = k0 + tl.arange(0, BLOCK_K)
            acc1 += w * tl.load(x_ptr + rk, mask=rk < K, other=0).to(tl.int32)[None, :]  # exact
        acc = tl.sum(acc1, axis=1)[:, None]  # [BLOCK_N, 1]
        _epilogue(acc, sx_ptr, s_ptr, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)
        return
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w = _ternary_tile(p_ptr, offs_n, mask_n, k0, KB, stride_pn, BLOCK_N, BLOCK_K).to(tl.int32)
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + rk[:, None] + offs_m[None, :] * stride_xm, mask=(rk < K)[:, None] & mask_m[None, :], other=0
        )
        acc += tl.sum(w[:, :, None] * xt.to(tl.int32)[None, :, :], axis=1)  # exact
    _epilogue(acc, sx_ptr, s_ptr, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


def _gemm_configs() -> list[triton.Config]:
    if _interpreted():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4)]
    # (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages): compile for sm_90 without spills; not timed on a GPU.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (64, 16, 128, 4, 4),  # skinny tiles for a few rows (_weight_mm.MMA_MIN_ROWS)
        (128, 16, 128, 4, 3),
        (64, 16, 256, 4, 3),
        # more, smaller programs for a few rows (_weight_mm.GEMM_SHAPES); not yet timed
        (16, 16, 128, 1, 4), (32, 16, 128, 2, 4), (16, 16, 256, 1, 4), (32, 16, 256, 2, 4),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, m, k, w, st in shapes
    ]


def _prune_gemm(configs, named_args, **kwargs):
    """Token tiles that suit the problem (``_weight_mm.token_tiles``)."""
    return wmm.token_tiles(configs, named_args["M"], 64)


@triton.autotune(
    configs=_gemm_configs(), key=["M", "N", "K", "DOT_FP32"], prune_configs_by={"early_config_prune": _prune_gemm}
)
@triton.jit
def _ternary_gemm_kernel(
    x_ptr, sx_ptr, p_ptr, s_ptr, b_ptr, y_ptr,  # as in _ternary_gemv_kernel
    M, N, K, KB, stride_xm, stride_pn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter: fp32 tiles (exact); else an int8 x int8 -> int32 dot
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    # y.T [N, M] = W [N, K] @ xq.T [K, M]: the unpacked weight is the dot's first operand.
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_n, mask_m = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32 if DOT_FP32 else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w = _ternary_tile(p_ptr, offs_n, mask_n, k0, KB, stride_pn, BLOCK_N, BLOCK_K)
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + rk[:, None] + offs_m[None, :] * stride_xm, mask=(rk < K)[:, None] & mask_m[None, :], other=0
        )
        if DOT_FP32:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
    _epilogue(acc, sx_ptr, s_ptr, b_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


# ---- per-token activation quantization: one launch (eager torch ops make ~8 small ones) --------
@triton.jit
def _quantize_tokens_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Row ``pid`` of x: ``a = max(absmax, 1e-5)``, ``sx = a / 127``, ``codes = round_half_even(x * (127 / a))``
    (the ops of :func:`_quantize_tokens`, IEEE divisions: bit for bit)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    # div_rn: IEEE division like torch's; plain `/` is approximate for fp32 on NVIDIA GPUs.
    a = tl.maximum(tl.max(amax, axis=0), 1e-5)
    inv = tl.math.div_rn(127.0, a)
    tl.store(s_ptr + row, tl.math.div_rn(a, 127.0))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        v = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
        c = round_half_even(v * inv)
        tl.store(q_ptr + row * K + cols, tl.minimum(tl.maximum(c, -128.0), 127.0).to(tl.int8), mask=cols < K)


def _ternary_quantize_tokens_impl(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """``x2d [M, K]`` with unit column stride -> int8 codes ``[M, K]`` (contiguous), fp32 ``sx [M, 1]``."""
    m, k = x2d.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    sx = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    if m and k:
        block_k = min(4096, triton.next_power_of_2(k))
        wrap_triton(_quantize_tokens_kernel)[(m,)](x2d, codes, sx, k, x2d.stride(0), BLOCK_K=block_k,
                                                   num_warps=4 if block_k <= 1024 else 8)  # fmt: skip
    return codes, sx


# Registered from the plain function, which eager calls take directly where they can (call_op).
_quantize_tokens_op = triton_op("quantframe::ternary_quantize_tokens", mutates_args=())(
    _ternary_quantize_tokens_impl
)


def _quantize_tokens_triton(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`_quantize_tokens` (bit for bit), one launch."""
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    return call_op(torch.ops.quantframe.ternary_quantize_tokens, _ternary_quantize_tokens_impl, x2d)


# ---- more rows: unpack W to int8 once, cuBLAS's INT8 GEMM (torch._int_mm), one epilogue pass ----
@triton.jit
def _ternary_unpack_kernel(p_ptr, w_ptr, N, K, KB, stride_pn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 ``W [N, K]`` in {-1, 0, 1} from the packed codes: one ``[BLOCK_N, BLOCK_K]`` tile a program."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    w = _ternary_tile(p_ptr, offs_n, mask_n, k0, KB, stride_pn, BLOCK_N, BLOCK_K)
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * K + rk[None, :], w, mask=mask_n[:, None] & (rk < K)[None, :])


@triton.jit
def _ternary_scale_kernel(
    acc_ptr, sx_ptr, s_ptr, b_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """``y [M, N] = acc * s * sx (+ bias)`` in fp32 (the GEMM kernel's epilogue, same order), in y's dtype."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0)
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    out = acc.to(tl.float32) * tl.load(s_ptr) * sx[:, None]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def ternary_unpack_triton(packed: Tensor, k: int) -> Tensor:
    """int8 ``W [N, k]`` in {-1, 0, 1}: Triton version of ``unpack_bits(packed, 2)[:, :k] - 1``."""
    n = packed.shape[0]
    w = torch.empty((n, k), dtype=torch.int8, device=packed.device)
    if w.numel():
        grid = (triton.cdiv(n, 32), triton.cdiv(k, 128))
        wrap_triton(_ternary_unpack_kernel)[grid](packed, w, n, k, packed.shape[1], packed.stride(0),
                                                  BLOCK_N=32, BLOCK_K=128)  # fmt: skip
    return w


def _int_mm_takes(m: int, n: int, k: int) -> bool:
    """torch._int_mm's shapes on CUDA: more than 16 rows, K >= 16 and K, N multiples of 8."""
    return m > 16 and k >= 16 and k % 8 == 0 and n % 8 == 0


@triton_op("quantframe::ternary_mm_dense", mutates_args=())
def _ternary_mm_dense_op(
    x_codes: Tensor, sx: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """int8 ``x_codes [M, K]`` (contiguous), fp32 ``sx [M]``; shapes checked by :func:`ternary_mm_dense`."""
    m, k = x_codes.shape
    n = packed.shape[0]
    acc = torch._int_mm(x_codes, ternary_unpack_triton(packed, k).T)  # int32 [M, N]: exact sums
    y = torch.empty((m, n), dtype=out_dtype, device=x_codes.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    wrap_triton(_ternary_scale_kernel)[grid](acc, sx, scale, bias if bias is not None else sx, y, m, n,
                                             HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128)  # fmt: skip
    return y


def ternary_mm_dense(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The prefill path of :func:`ternary_mm_triton`: W unpacked once to int8 ``[N, K]`` (a transient
    copy, 1 byte a weight), the INT8 x INT8 -> INT32 GEMM of ``torch._int_mm`` (cuBLAS on a GPU; exact
    sums), then one Triton pass for the scales and bias. Same arguments and result as the GEMM kernel
    (bit for bit: the same integer sums and epilogue); ValueError for shapes ``torch._int_mm`` does
    not take (16 rows or fewer, K < 16, K or N not a multiple of 8)."""
    _check_args(x, packed, scale, bias)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ternary_mm_dense: x.dtype={x.dtype}, expected float32, float16 or bfloat16")
    k, n, m = x.shape[-1], packed.shape[0], rows(x)
    if not _int_mm_takes(m, n, k):
        raise ValueError(
            f"ternary_mm_dense: M={m}, N={n}, K={k}; torch._int_mm needs M > 16, K >= 16 and K, N multiples of 8"
        )
    codes, sx = _quantize_tokens_triton(x.reshape(-1, k))
    y = torch.ops.quantframe.ternary_mm_dense(
        codes, sx.reshape(-1), packed.contiguous(), scale.float().reshape(()), bias, x.dtype
    )
    return y.reshape(*x.shape[:-1], n)


# ---- one token, its quantization inside the GEMV --------------------------------------------------
# H200, 14336 x 4096, one token under a CUDA graph: 9.8 us against 19.9 for the two launches it replaces
# (the token's quantization, then the GEMV; before its dp4a tiles). Off: the two launches (tests compare).
FUSE_ONE_TOKEN = True


@triton.jit
def _ternary_token_gemv_kernel(
    x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_pn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """One float token ``x [K]`` (``K % 16 == 0``) times the ternary weight, with the token's int8
    quantization done by every program (``_quantize_tokens_kernel``'s ops, bit for bit: the token is
    8 KiB, L2-resident) and the products by ``_ternary_dp4a_row``'s scheme: one launch, where the
    unfused path makes two."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    offs_w = tl.arange(0, BLOCK_K // 16).to(tl.int64)
    # The first weight tile is requested before the token's absmax pass, so that its DRAM latency
    # overlaps the pass; each later tile is requested one tile ahead (past K: masked, no traffic).
    word = load_words(p_ptr, offs_n, mask_n, offs_w, K // 16, stride_pn)
    offs = tl.arange(0, BLOCK_X)
    amax = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_X):
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)))
    a = tl.maximum(tl.max(amax, axis=0), 1e-5)
    sx, inv = tl.math.div_rn(a, 127.0), tl.math.div_rn(127.0, a)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 16), dtype=tl.int32)
    x_sum = tl.zeros((BLOCK_K // 16,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        w_idx = k0 // 16 + offs_w
        mask_w = w_idx < K // 16
        ahead = load_words(p_ptr, offs_n, mask_n, w_idx + BLOCK_K // 16, K // 16, stride_pn)
        for t in tl.static_range(4):
            xt = tl.zeros((BLOCK_K // 16,), dtype=tl.int32)  # int8 codes of x[16i + t + (0, 4, 8, 12)]
            for q in tl.static_range(4):
                v = tl.load(x_ptr + 16 * w_idx + 4 * q + t, mask=mask_w, other=0.0).to(tl.float32)
                c = tl.minimum(tl.maximum(round_half_even(v * inv), -128.0), 127.0).to(tl.int32)
                xt = xt | ((c & 0xFF) << 8 * q)
            acc, x_sum = _dp4a_codes(word, t, xt, acc, x_sum)
        word = ahead
    acc1 = (tl.sum(acc, axis=1) - tl.sum(x_sum, axis=0))[:, None]
    offs_m = tl.arange(0, 1).to(tl.int64)
    out = acc1.to(tl.float32) * tl.load(s_ptr) * sx
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] + offs_n[:, None], out.to(y_ptr.dtype.element_ty), mask=mask_n[:, None])


def _token_configs() -> list[triton.Config]:
    if _interpreted():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    # H200, 14336 x 4096, each alone (CUDA graph, L2 flushed): 32 x 2,048 10.4 us, 16 x 2,048 11.6, 64 x 2,048
    # 11.9, 16 x 4,096 13.1; 1,024-wide and 8-warp tiles 13-79 us. The dp4a GEMV alone: 7.0 (its token's
    # quantization launch alone 4.2): the quantization every program repeats costs ~3.4 us.
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=3)
            for n, k in ((32, 2048), (16, 2048), (64, 2048), (16, 4096))]  # fmt: skip


_ternary_token_gemv = triton.autotune(configs=_token_configs(), key=["N", "K"])(_ternary_token_gemv_kernel)


def _ternary_token_gemv_impl(
    x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Float ``x [1, K]`` (unit stride, ``K % 16 == 0``); checked by :func:`ternary_mm_triton`. The
    word-alignment check is here, not there: dynamo cannot trace ``storage_offset()``, an op body sees
    real or fake tensors. ``packed`` rows that are not whole 4-byte-aligned words (a view at an odd
    offset; rare) are copied first."""
    n, k = packed.shape[0], x.shape[1]
    if not wmm.word_rows(packed, 16, k):
        packed = packed.clone(memory_format=torch.contiguous_format)  # fresh storage: offset 0, rows of K / 4 bytes
    y = torch.empty((1, n), dtype=out_dtype, device=x.device)
    if n:
        wrap_triton(_ternary_token_gemv)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x, packed, scale, bias if bias is not None else scale, y, n, k, packed.stride(0),
            HAS_BIAS=bias is not None, BLOCK_X=min(4096, triton.next_power_of_2(k)),
        )  # fmt: skip
    return y


# Registered from the plain function, which eager calls take directly where they can (call_op).
_ternary_token_gemv_op = triton_op("quantframe::ternary_token_gemv", mutates_args=())(_ternary_token_gemv_impl)


def _ternary_mm_impl(
    x_codes: Tensor, sx: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """int8 ``x_codes [M, K]`` (contiguous), fp32 ``sx [M]``; arguments checked by :func:`ternary_mm_triton`."""
    m, k = x_codes.shape
    n = packed.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_codes.device)
    if m == 0 or n == 0:
        return y
    args = (x_codes, sx, packed, scale, bias if bias is not None else sx, y,  # sx: dummy pointer without bias
            m, n, k, packed.shape[1], x_codes.stride(0), packed.stride(0), y.stride(0), y.stride(1))  # fmt: skip
    if m < wmm.MMA_MIN_ROWS:  # as the other weight families (_weight_mm.launch)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
        words_ok = m == 1 and wmm.word_rows(packed, 16, k)
        wrap_triton(_ternary_gemv_kernel)[grid](*args, HAS_BIAS=bias is not None, WORDS_OK=words_ok,
                                                BLOCK_M=triton.next_power_of_2(m))  # fmt: skip
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
        wrap_triton(_ternary_gemm_kernel)[grid](*args, HAS_BIAS=bias is not None, DOT_FP32=_interpreted())
    return y


# Registered from the plain function, which eager calls take directly where they can (call_op).
_ternary_mm_op = triton_op("quantframe::ternary_mm", mutates_args=())(_ternary_mm_impl)


def ternary_mm_triton(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Triton version of :func:`ternary_mm_reference` for fp32/fp16/bf16 ``x`` (else TypeError);
    equal up to fp32 summation order (the integer products are exact). Forward only."""
    _check_args(x, packed, scale, bias)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ternary_mm_triton: x.dtype={x.dtype}, expected float32, float16 or bfloat16")
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if FUSE_ONE_TOKEN and x2d.shape[0] == 1 and k % 16 == 0 and x2d.stride(-1) == 1:
        op, args = torch.ops.quantframe.ternary_token_gemv, (x2d, packed, scale.float().reshape(()), bias, x.dtype)
        y = call_op(op, _ternary_token_gemv_impl, *args)
        return y.reshape(*x.shape[:-1], packed.shape[0])
    codes, sx = _quantize_tokens_triton(x2d)
    y = call_op(
        torch.ops.quantframe.ternary_mm, _ternary_mm_impl,
        codes, sx.reshape(-1), packed.contiguous(), scale.float().reshape(()), bias, x.dtype
    )
    return y.reshape(*x.shape[:-1], packed.shape[0])


def ternary_mm(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``xq [..., K] @ Wq.T (+ bias)``: on CUDA (fp32/fp16/bf16 x) the GEMV kernel up to
    ``MMA_MIN_ROWS`` rows, :func:`ternary_mm_dense` from ``DENSE_MIN_ROWS`` on where
    ``torch._int_mm`` takes the shape, else the GEMM kernel (:func:`ternary_mm_triton`); elsewhere
    :func:`ternary_mm_reference` (same arguments and result up to summation order). Forward only.

    Example::

        w = TernaryWeight.from_float(linear.weight)
        y = ternary_mm(x, w.packed, w.scale, linear.bias)
    """
    if use_triton(x) and x.dtype in _FLOAT_DTYPES:
        m = rows(x)
        if m >= DENSE_MIN_ROWS and _int_mm_takes(m, packed.shape[0], x.shape[-1]):
            return ternary_mm_dense(x, packed, scale, bias)
        return ternary_mm_triton(x, packed, scale, bias)
    return ternary_mm_reference(x, packed, scale, bias)
