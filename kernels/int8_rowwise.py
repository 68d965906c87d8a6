"""Per-row symmetric INT8 quantization: ``w [N, K]`` -> ``(int_data int8 [N, K], scale fp32 [N])``.

INT8 quantized training requantizes every weight after each optimizer step, so this runs once per
weight per step. ``scale = max(absmax(row) / 127, 1e-12)`` and ``code = round(w / scale)`` (or
stochastic ``floor(v) + [u < v - floor(v)]`` for ``v = w / scale``, ``u ~ U[0, 1)``), clamped to ``[-127, 127]``: 127, not 128 or
127.5, keeps the grid symmetric so ``-q`` is always representable and -128 is never produced.

The reference equals ``quantframe.primitives.quantize_rowwise_int8`` bit for bit; the kernel equals
the reference bit for bit when given the same noise (fp32 math and IEEE division in both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import call_op, use_triton

__all__ = ["quantize_rowwise_int8", "quantize_rowwise_int8_reference", "quantize_rowwise_int8_triton"]

_QMAX = 127  # symmetric int8 grid; see the module docstring
_EPS = 1e-12  # scale of an all-zero row: its codes are 0 and dequantize to exactly 0
_MAX_BLOCK_K = 1024  # longer rows are processed in chunks of this many elements
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(w: Tensor, noise: Tensor | None, col_scale: Tensor | None = None) -> None:
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"quantize_rowwise_int8: w must be 2-D [N, K] with K >= 1, got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_rowwise_int8: w.dtype={w.dtype}, expected float32, float16 or bfloat16")
    if col_scale is not None and (
        col_scale.dtype != torch.float32 or col_scale.shape != (w.shape[1],) or col_scale.device != w.device
    ):
        raise ValueError(
            f"quantize_rowwise_int8: col_scale must be float32 [{w.shape[1]}] on {w.device}, got "
            f"{col_scale.dtype} {tuple(col_scale.shape)} on {col_scale.device}"
        )
    if noise is None:
        return
    if noise.dtype != torch.float32:
        raise TypeError(f"quantize_rowwise_int8: noise.dtype={noise.dtype}, expected float32")
    if noise.shape != w.shape or noise.device != w.device:
        raise ValueError(
            f"quantize_rowwise_int8: noise (shape {tuple(noise.shape)}, {noise.device}) must match "
            f"w (shape {tuple(w.shape)}, {w.device})"
        )


def quantize_rowwise_int8_reference(
    w: Tensor, stochastic: bool = False, noise: Tensor | None = None, col_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantization in plain PyTorch (fp32 math).

    Args:
        w: ``[N, K]`` float32, float16 or bfloat16 weight.
        stochastic: round ``v = w / scale`` to ``floor(v) + [u < v - floor(v)]`` (unbiased) instead of
            to nearest (half to even).
        noise: ``[N, K]`` float32 in ``[0, 1)``, the ``u`` above; drawn with ``torch.rand`` if None.
            Ignored unless ``stochastic``.
        col_scale: ``[K]`` float32 or None: quantize ``w * col_scale`` (the fp32 product) instead of
            ``w``, without writing that product (INT8 mixed precision's ``g * W.scale``).

    Returns:
        ``int_data`` int8 ``[N, K]`` in ``[-127, 127]`` and ``scale`` float32 ``[N]``.

    Raises:
        ValueError: ``w`` not 2-D with K >= 1, ``noise`` of another shape or device, or a bad ``col_scale``.
        TypeError: ``w`` not a 16/32-bit float, or ``noise`` not float32.
    """
    _check_args(w, noise, col_scale)
    wf = w.detach().float()
    if col_scale is not None:
        wf = wf * col_scale
    absmax = wf.abs().amax(dim=1)
    # Divide by a tensor, not the Python int: CUDA torch turns `t / 127` into `t * fp32(1 / 127)`,
    # an ulp off for ~4% of rows (flipping round-half-even ties); tensor / tensor is IEEE on CPU
    # and CUDA alike, as is the kernel's div_rn. (full_like, not torch.tensor: no host->device copy.)
    scale = (absmax / torch.full_like(absmax, _QMAX)).clamp_min(_EPS)
    v = wf / scale[:, None]  # true division, as the kernel does, so the codes agree exactly
    if stochastic:
        u = noise if noise is not None else torch.rand(w.shape, dtype=torch.float32, device=w.device)
        lo = torch.floor(v)
        v = lo + (u < v - lo).float()  # never leaves {floor, ceil}, unlike floor(v + u) in fp32
    else:
        v = torch.round(v)
    return v.clamp(-_QMAX, _QMAX).to(torch.int8), scale


# The interpreter's fp32 -> bf16 cast truncates; a GPU's rounds to nearest even in one instruction.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_to_bf16(x):
    """fp32 ``x`` made ready for a cast to bf16 that rounds to nearest (ties to even), as
    ``Tensor.to(torch.bfloat16)`` does, for finite inputs. On the GPU the cast itself rounds
    (``cvt.rn.bf16.f32``), so ``x`` is returned as is; under the interpreter, whose cast truncates, ``x``
    is rounded here on its bits (8 instructions per element that a GPU build must not pay)."""
    if _INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def round_half_even(v):
    """fp32 ``v`` (|v| < 2**22) rounded to the nearest integer, ties to even, like ``torch.round``:
    adding 1.5 * 2**23 lands v in [2**23, 2**24), where the fp32 spacing is 1, so the add itself
    rounds. ``libdevice.rint`` would do the same but is not available in the interpreter.

    On the GPU the add is PTX ``add.rn``, which is never contracted into an FMA: ``round_half_even(a * b)``
    rounds the product first, as torch's ``round(a * b)`` does (a plain add fused into ``fma(a, b, 1.5 * 2**23)``
    rounds once, and may land on the other integer where a * b is within an fp32 rounding of .5: seen as
    one code in 2M differing between eager and inductor-compiled launches of the RMSNorm+quant kernel)."""
    if _INTERPRETED:  # numpy rounds every op on its own
        big = v + 12582912.0
    else:
        big = tl.inline_asm_elementwise("add.rn.f32 $0, $1, 0f4B400000;", "=f,f", [v], dtype=tl.float32,
                                        is_pure=True, pack=1)  # fmt: skip
    return big - 12582912.0


# A fresh seed every call: without do_not_specialize, Triton specializes on seed % 16 == 0 and
# seed == 1 and compiles new variants mid-training (measured: 0.6-1.7 s stalls on H100).
@triton.jit(do_not_specialize=["seed"])
def _quantize_rowwise_int8_kernel(
    w_ptr,  # [N, K] float, contiguous
    noise_ptr,  # [N, K] float32, contiguous (read only if HAS_NOISE)
    cs_ptr,  # [K] float32 column scale (read only if HAS_COL_SCALE)
    q_ptr,  # [N, K] int8 out
    s_ptr,  # [N] float32 out
    K,
    seed,
    STOCHASTIC: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * K can pass 2**31 for large weights
    offs = tl.arange(0, BLOCK_K)

    # Pass 1: absmax of the row, in fp32 (exact for fp16/bf16 inputs).
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        w = tl.load(w_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            w = w * tl.load(cs_ptr + cols, mask=cols < K, other=0.0)
        absmax = tl.maximum(absmax, tl.abs(w))
    # div_rn: IEEE division like torch's; plain `/` is approximate for fp32 on NVIDIA GPUs.
    scale = tl.maximum(tl.math.div_rn(tl.max(absmax, axis=0), 127.0), 1e-12)
    tl.store(s_ptr + row, scale)

    # Pass 2: codes. The row is re-read rather than kept in registers so that K is unbounded.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        mask = cols < K
        w = tl.load(w_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            w = w * tl.load(cs_ptr + cols, mask=mask, other=0.0)
        v = tl.math.div_rn(w, scale)
        if STOCHASTIC:
            if HAS_NOISE:
                u = tl.load(noise_ptr + row * K + cols, mask=mask, other=0.0)
            else:
                u = tl.rand(seed, row * K + cols)  # Philox: one counter per element
            lo = tl.floor(v)
            v = lo + tl.where(u < v - lo, 1.0, 0.0)  # exact: v - floor(v) is exact in fp32
        else:
            v = round_half_even(v)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(q_ptr + row * K + cols, v.to(tl.int8), mask=mask)


def quantize_rowwise_int8_triton(
    w: Tensor, stochastic: bool = False, noise: Tensor | None = None, seed: int | None = None,
    col_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Triton version of :func:`quantize_rowwise_int8_reference`; one program per row.

    ``seed`` (an int in ``[0, 2**31 - 1)``) seeds the in-kernel Philox draws when ``stochastic``
    and ``noise`` is None; by default it is drawn from torch's CPU generator, so
    ``torch.manual_seed`` makes the result reproducible. The draws differ from ``torch.rand``'s.
    """
    _check_args(w, noise, col_scale)
    if seed is None:
        # drawn outside the custom op: under torch.compile the op body only sees fake tensors
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if stochastic and noise is None else 0
    has_noise = stochastic and noise is not None
    return call_op(
        torch.ops.quantframe.quantize_rowwise_int8, _quantize_rowwise_int8_impl,
        w.detach().contiguous(), noise.contiguous() if has_noise else None, stochastic, seed,
        col_scale.contiguous() if col_scale is not None else None,
    )  # fmt: skip


# triton_op + wrap_triton let torch.compile trace into the kernel (the activation quantization of
# int8 mixed-precision training runs inside compiled forwards); in eager mode it just launches it.
def _quantize_rowwise_int8_impl(
    w: Tensor, noise: Tensor | None, stochastic: bool, seed: int, col_scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Contiguous ``w [N, K]``; arguments already checked by :func:`quantize_rowwise_int8_triton`."""
    n, k = w.shape  # the kernel indexes rows as row * K
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty((n,), dtype=torch.float32, device=w.device)
    if n == 0:
        return q, scale
    wrap_triton(_quantize_rowwise_int8_kernel)[(n,)](
        w,
        noise if noise is not None else w,  # a dummy pointer when the kernel reads no noise
        col_scale if col_scale is not None else w,  # likewise
        q,
        scale,
        k,
        seed,
        STOCHASTIC=stochastic,
        HAS_NOISE=noise is not None,
        HAS_COL_SCALE=col_scale is not None,
        BLOCK_K=min(triton.next_power_of_2(k), _MAX_BLOCK_K),
    )
    return q, scale


# Registered from the plain function, which eager calls take directly where they can (call_op).
_quantize_rowwise_int8_op = triton_op("quantframe::quantize_rowwise_int8", mutates_args=())(
    _quantize_rowwise_int8_impl
)


def quantize_rowwise_int8(
    w: Tensor, stochastic: bool = False, noise: Tensor | None = None, col_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of ``w [N, K]`` -> ``(int8 [N, K], fp32 [N])``: Triton on CUDA, else reference.

    Same arguments, result and errors as :func:`quantize_rowwise_int8_reference`. Stochastic
    rounding without ``noise`` draws different (equally distributed) noise on the two paths.
    """
    if use_triton(w):
        return quantize_rowwise_int8_triton(w, stochastic, noise, col_scale=col_scale)
    return quantize_rowwise_int8_reference(w, stochastic, noise, col_scale)
