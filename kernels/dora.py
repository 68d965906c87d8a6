"""DoRA column norm: ``norm = ||W + s * B @ A||_2`` per output row and ``scale = m / norm``.

DoRA needs the row norms of ``W + s B A`` (``W [N, K]``, ``B [N, r]``, ``A [r, K]``, r <= 64) every
step. Unfused, that writes and re-reads the ``[N, K]`` product ``B @ A`` (as big as the weight);
the kernel instead forms each ``[BLOCK_N, BLOCK_K]`` tile of ``B @ A`` in registers (a small-K
``tl.dot``), adds the base tile, accumulates squares in fp32, and writes only ``[N]`` vectors.
The base comes in dense (the caller dequantizes it); reading NF4/int codes directly is left to a
later flag.

``dora_lora_scale`` is the unfused layer's output epilogue after the base GEMM:
``y = (x W.T + xa (sB).T) * scale + bias`` in one pass, the rank-r term formed per tile (eager
PyTorch would write the ``[M, N]`` rank-r product and make four more passes: add, upcast, multiply,
downcast). ``dora_row_scale`` is the backward's ``c W``, one pass over the weight.

``dora_linear`` is the whole forward product in one GEMM: ``pre = x W.T + xa (sB).T`` (the LoRA
output added in the epilogue, a second small-K ``tl.dot`` with ``r <= 64``), stored once in x's
dtype for the backward, and ``y = pre * scale + bias`` from the same registers; unfused, the LoRA
add and the epilogue are two more passes over the ``[M, N]`` output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import use_triton
from ._weight_mm import interpreted
from .int8_rowwise import _round_to_bf16

__all__ = [
    "addmm_inplace",
    "dora_linear",
    "dora_linear_reference",
    "dora_linear_triton",
    "dora_column_norm",
    "dora_column_norm_reference",
    "dora_column_norm_triton",
    "dora_lora_scale",
    "dora_lora_scale_reference",
    "dora_lora_scale_triton",
    "dora_row_scale",
    "dora_row_scale_reference",
    "dora_row_scale_triton",
]

_MAX_RANK = 64  # B @ A tiles keep all r columns of B in registers
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_args(w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor) -> None:
    if w.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2 or magnitude.dim() != 1:
        raise ValueError(
            f"dora_column_norm: expected w [N, K], lora_A [r, K], lora_B [N, r], magnitude [N], got shapes "
            f"{tuple(w.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}, {tuple(magnitude.shape)}"
        )
    (n, k), r = w.shape, lora_A.shape[0]
    if lora_A.shape != (r, k) or lora_B.shape != (n, r) or magnitude.shape != (n,):
        raise ValueError(
            f"dora_column_norm: shapes do not agree: w {tuple(w.shape)}, lora_A {tuple(lora_A.shape)}, "
            f"lora_B {tuple(lora_B.shape)}, magnitude {tuple(magnitude.shape)}"
        )
    for name, t in (("w", w), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dora_column_norm: {name}.dtype={t.dtype}, expected a float dtype")


def dora_column_norm_reference(
    w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """``(norm, scale)``, both ``[N]``: ``norm = ||w + scaling * lora_B @ lora_A||_2`` per row,
    ``scale = magnitude / norm``.

    ``w`` ``[N, K]``, ``lora_A`` ``[r, K]``, ``lora_B`` ``[N, r]``, ``magnitude`` ``[N]``, any float
    dtypes; math and results in fp32 (fp64 if ``w`` is fp64). No gradient flows (DoRA's norm is a
    constant for autograd). Raises ``ValueError`` for shapes that do not agree, ``TypeError`` for
    non-float inputs.
    """
    _check_args(w, lora_A, lora_B, magnitude)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        v = w.to(acc) + scaling * (lora_B.detach().to(acc) @ lora_A.detach().to(acc))
        norm = torch.linalg.vector_norm(v, dim=1)
        return norm, magnitude.detach().to(acc) / norm


def _norm_configs() -> list[triton.Config]:
    if interpreted():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    # (BLOCK_N, BLOCK_K, warps): one fixed 32 x 64 tile ran at ~60 us for a 4096 x 4096 bf16 weight on the
    # H200 (128 programs; the read alone is ~8 us): more, longer-K programs are offered
    shapes = [(32, 64, 4), (16, 128, 4), (16, 256, 4), (8, 256, 4), (32, 128, 8), (64, 64, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3) for n, k, w in shapes]


@triton.autotune(configs=_norm_configs(), key=["N", "K", "BLOCK_R"])
@triton.jit
def _dora_column_norm_kernel(
    w_ptr,  # [N, K] float, contiguous
    a_ptr,  # [R, K] float, contiguous
    b_ptr,  # [N, R] float, contiguous
    m_ptr,  # [N] float
    norm_ptr,  # [N] float32 out
    scale_ptr,  # [N] float32 out
    N,
    K,
    R,
    scaling,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)  # rows * K can pass 2**31 for large weights
    ranks = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    # B's rows stay in registers for the whole K loop: [BLOCK_N, BLOCK_R], zero-padded past R
    b = tl.load(b_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
    b = b.to(tl.float32)
    s = tl.cast(scaling, tl.float32)  # torch.compile passes Python floats to the kernel as fp64
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        col_ok = cols < K
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & col_ok[None, :], other=0.0)
        # ieee: tf32 would cost ~3 decimal digits of the norm; the GEMM is tiny (K = r) anyway
        ba = tl.dot(b, a.to(tl.float32), input_precision="ieee")  # [BLOCK_N, BLOCK_K], never stored
        w = tl.load(w_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        v = w.to(tl.float32) + s * ba
        sq += tl.sum(v * v, axis=1)
    norm = tl.sqrt(sq)
    m = tl.load(m_ptr + rows, mask=row_ok, other=1.0).to(tl.float32)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    tl.store(scale_ptr + rows, m / tl.where(row_ok, norm, 1.0), mask=row_ok)  # no 0/0 in padding rows


@triton_op("quantframe::dora_column_norm", mutates_args=())
def _dora_column_norm_op(
    w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """Contiguous inputs, already checked by :func:`dora_column_norm_triton`."""
    (n, k), r = w.shape, lora_A.shape[0]
    norm = torch.empty((n,), dtype=torch.float32, device=w.device)
    scale = torch.empty((n,), dtype=torch.float32, device=w.device)
    if n == 0:
        return norm, scale
    wrap_triton(_dora_column_norm_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        w, lora_A, lora_B, magnitude, norm, scale, n, k, r, scaling,
        BLOCK_R=max(16, triton.next_power_of_2(r)),  # tl.dot needs >= 16
    )  # fmt: skip
    return norm, scale


def dora_column_norm_triton(
    w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`dora_column_norm_reference` (fp32 results; fp64 inputs are not taken)."""
    _check_args(w, lora_A, lora_B, magnitude)
    if w.dtype == torch.float64:
        raise TypeError("dora_column_norm_triton: float64 is reference-only")
    r = lora_A.shape[0]
    if r > _MAX_RANK:
        raise ValueError(f"dora_column_norm_triton: rank={r} must be <= {_MAX_RANK}")
    return torch.ops.quantframe.dora_column_norm(
        *(t.detach().contiguous() for t in (w, lora_A, lora_B, magnitude)), float(scaling)
    )


def dora_column_norm(
    w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """``(norm, scale)`` of :func:`dora_column_norm_reference`: Triton for CUDA tensors with
    rank <= 64 that are not fp64, else the reference."""
    if use_triton(w) and lora_A.shape[0] <= _MAX_RANK and w.dtype != torch.float64:
        return dora_column_norm_triton(w, lora_A, lora_B, magnitude, scaling)
    return dora_column_norm_reference(w, lora_A, lora_B, magnitude, scaling)


# ---- the backward's row-scaled weight: c W ----------------------------------------------------
@triton.jit
def _dora_row_scale_kernel(w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    out = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(s_ptr + rows, mask=row_ok)[:, None]
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton_op("quantframe::dora_row_scale", mutates_args=())
def _dora_row_scale_op(w: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Contiguous ``w [N, K]``, fp32 ``scale [N]``; checked by :func:`dora_row_scale_triton`."""
    n, k = w.shape
    y = torch.empty((n, k), dtype=out_dtype, device=w.device)
    if y.numel():
        grid = (triton.cdiv(n, 16), triton.cdiv(k, 256))
        wrap_triton(_dora_row_scale_kernel)[grid](w, scale, y, n, k, BLOCK_N=16, BLOCK_K=256)
    return y


def dora_row_scale_reference(w: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``w [N, K] * scale [N, 1]`` in fp32 (fp64 for fp64 ``w``), one rounding to ``out_dtype``: the
    backward's ``c W`` (``dx = g @ (c W)`` scales the ``[N, K]`` weight, not the ``[M, N]`` gradient)."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    return (w.to(acc) * scale.to(acc)[:, None]).to(out_dtype)


def dora_row_scale_triton(w: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Triton version of :func:`dora_row_scale_reference` for fp32/fp16/bf16 ``w`` (one pass)."""
    if w.dim() != 2 or scale.shape != (w.shape[0],):
        got = tuple(w.shape), tuple(scale.shape)
        raise ValueError(f"dora_row_scale: expected w [N, K], scale [N], got shapes {got[0]}, {got[1]}")
    if w.dtype not in _FLOAT_DTYPES[:3]:
        raise TypeError(f"dora_row_scale_triton: w.dtype={w.dtype}, expected float32, float16 or bfloat16")
    return torch.ops.quantframe.dora_row_scale(w.contiguous(), scale.float().contiguous(), out_dtype)


def dora_row_scale(w: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``w * scale[:, None]`` -> ``out_dtype``: one Triton pass on CUDA (not fp64), else the reference."""
    if use_triton(w) and w.dtype != torch.float64:
        return dora_row_scale_triton(w, scale, out_dtype)
    return dora_row_scale_reference(w, scale, out_dtype)


# ---- out += a @ b in place, also under torch.compile -------------------------------------------
@torch.library.custom_op("quantframe::addmm_inplace", mutates_args=("out",))
def _addmm_inplace_op(out: Tensor, a: Tensor, b: Tensor) -> None:
    out.addmm_(a, b)


@_addmm_inplace_op.register_fake
def _(out: Tensor, a: Tensor, b: Tensor) -> None:
    return None


def addmm_inplace(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out += a @ b`` in place (cuBLAS with beta = 1: the addend read in the GEMM's epilogue); returns ``out``.

    ``torch.addmm(c, a, b)`` with a new output copies ``c`` into it first (65 us for a [16384, 4096]
    bf16 addend on an H200), and ``c.addmm_(a, b)`` on an intermediate is functionalized by
    torch.compile into that same out-of-place call. As an opaque op that mutates ``out``, inductor's
    reinplacing keeps it in place whenever ``out`` has no other use (a fresh product, as here).
    """
    torch.ops.quantframe.addmm_inplace(out, a, b)
    return out


# ---- the unfused forward's epilogue: the LoRA add and the scale after a cuBLAS GEMM ------------
def dora_lora_scale_reference(
    base: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``y = (base + xa @ lora_b.T) * scale (+ bias)`` in fp32 (fp64 for fp64 ``base``), one rounding.

    ``base [M, N]`` (``x @ W.T`` from the GEMM), ``xa [M, r]``, ``lora_b [N, r]`` (``s B``), ``scale`` and
    ``bias`` ``[N]``. The rank-r product is formed per output tile and never stored: the unfused
    forward writes and re-reads ``[M, N]`` twice less than ``addmm`` + a scale pass.
    """
    n, r = lora_b.shape
    if base.dim() != 2 or xa.shape != (base.shape[0], r) or base.shape[1] != n or scale.shape != (n,):
        got = [tuple(t.shape) for t in (base, xa, lora_b, scale)]
        raise ValueError(
            f"dora_lora_scale: expected base [M, N], xa [M, r], lora_b [N, r], scale [N], got shapes {got}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"dora_lora_scale: bias.shape={tuple(bias.shape)}, expected ({n},)")
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    y = (base.to(acc) + xa.to(acc) @ lora_b.to(acc).T) * scale.to(acc)
    return (y if bias is None else y + bias.to(acc)).to(out_dtype)


@triton.jit
def _dora_lora_scale_kernel(
    base_ptr, xa_ptr, lb_ptr, s_ptr, b_ptr, y_ptr, M, N, R,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < R
    xa = tl.load(xa_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    lb = tl.load(lb_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
    if DOT_FP32:  # fp32 inputs exactly (and the interpreter, whose 16-bit dot is not fp32-accumulated)
        lora = tl.dot(xa.to(tl.float32), tl.trans(lb.to(tl.float32)), input_precision="ieee")
    else:  # 16-bit operands, fp32 accumulation
        lora = tl.dot(xa, tl.trans(lb))
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (base + lora) * tl.load(s_ptr + cols, mask=col_ok)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton_op("quantframe::dora_lora_scale", mutates_args=())
def _dora_lora_scale_op(
    base: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Contiguous arguments, checked by :func:`dora_lora_scale_triton`; fp32 ``scale``."""
    (m, n), r = base.shape, lora_b.shape[1]
    y = torch.empty((m, n), dtype=out_dtype, device=base.device)
    if y.numel():
        wrap_triton(_dora_lora_scale_kernel)[(triton.cdiv(m, 64), triton.cdiv(n, 128))](
            base, xa, lora_b, scale, bias if bias is not None else scale, y, m, n, r,
            HAS_BIAS=bias is not None, DOT_FP32=base.dtype == torch.float32 or interpreted(),
            R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_M=64, BLOCK_N=128,
        )  # fmt: skip
    return y


def dora_lora_scale_triton(
    base: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Triton version of :func:`dora_lora_scale_reference`: one pass over ``base``; r <= 64."""
    n, r = lora_b.shape
    if base.dim() != 2 or xa.shape != (base.shape[0], r) or base.shape[1] != n or scale.shape != (n,):
        return dora_lora_scale_reference(base, xa, lora_b, scale, bias, out_dtype)  # raises the ValueError
    if not 1 <= r <= _MAX_RANK:
        raise ValueError(f"dora_lora_scale_triton: rank {r} (lora_b.shape[1]) must be in [1, {_MAX_RANK}]")
    if base.dtype not in _FLOAT_DTYPES[:3] or xa.dtype != base.dtype or lora_b.dtype != base.dtype:
        raise TypeError(
            f"dora_lora_scale_triton: base, xa, lora_b are {base.dtype}, {xa.dtype}, {lora_b.dtype}; "
            "expected one of float32, float16, bfloat16 for all three"
        )
    return torch.ops.quantframe.dora_lora_scale(
        base.contiguous(), xa.contiguous(), lora_b.contiguous(), scale.float().contiguous(), bias, out_dtype
    )


def dora_lora_scale(
    base: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``(base + xa @ lora_b.T) * scale + bias``: one Triton pass on CUDA (16-bit / fp32, r <= 64), else
    the reference."""
    if use_triton(base) and base.dtype != torch.float64 and lora_b.shape[1] <= _MAX_RANK:
        return dora_lora_scale_triton(base, xa, lora_b, scale, bias, out_dtype)
    return dora_lora_scale_reference(base, xa, lora_b, scale, bias, out_dtype)


# ---- the forward GEMM with the LoRA add and the scale in its epilogue --------------------------
def _check_linear_args(x, w, xa, lora_b, scale, bias) -> None:
    if x.dim() != 2 or w.dim() != 2 or xa.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"dora_linear: expected x [M, K], w [N, K], xa [M, r], lora_b [N, r], got shapes {tuple(x.shape)}, "
            f"{tuple(w.shape)}, {tuple(xa.shape)}, {tuple(lora_b.shape)}"
        )
    (m, k), (n, r) = x.shape, lora_b.shape
    if w.shape != (n, k) or xa.shape != (m, r):
        raise ValueError(
            f"dora_linear: shapes do not agree: x {tuple(x.shape)}, w {tuple(w.shape)}, xa {tuple(xa.shape)}, "
            f"lora_b {tuple(lora_b.shape)}"
        )
    if not 1 <= r <= _MAX_RANK:
        raise ValueError(f"dora_linear: rank {r} (lora_b.shape[1]) must be in [1, {_MAX_RANK}]")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"dora_linear: {name}.shape={tuple(t.shape)}, expected ({n},)")
    for name, t in (("x", x), ("w", w), ("xa", xa), ("lora_b", lora_b)):
        if t.dtype != x.dtype or t.dtype not in _FLOAT_DTYPES[:3]:
            raise TypeError(
                f"dora_linear: {name}.dtype={t.dtype}; x, w, xa and lora_b must share one of float32, float16, bfloat16"
            )


def dora_linear_reference(
    x: Tensor, w: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(y, pre)``: ``pre = x @ w.T + xa @ lora_b.T`` in fp32, rounded once to x's dtype;
    ``y = pre * scale (+ bias)`` in fp32 (no scale: plain LoRA), rounded to ``out_dtype``.

    ``x [M, K]``, ``w [N, K]`` (the dense base), ``xa [M, r]`` (``x_lora @ A.T``), ``lora_b [N, r]``
    (``B`` times the LoRA scaling), all one float dtype; ``scale``, ``bias``: ``[N]`` or None.
    Raises ValueError (shapes, rank > 64) / TypeError (dtypes).
    """
    _check_linear_args(x, w, xa, lora_b, scale, bias)
    pre = (x.float() @ w.float().T + xa.float() @ lora_b.float().T).to(x.dtype)
    y = pre.float()
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype), pre


def _linear_configs() -> list[triton.Config]:
    if interpreted():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): Hopper bf16 GEMM tiles; not yet timed on a GPU
    shapes = [
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in shapes
    ]


@triton.autotune(configs=_linear_configs(), key=["M", "N", "K", "R_PAD", "DOT_FP32"])
@triton.jit
def _dora_linear_kernel(
    x_ptr, w_ptr, xa_ptr, lb_ptr, s_ptr, b_ptr, pre_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_ar, stride_bn, stride_br,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grouped tile order: programs that run together share rows of x and columns of W in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (8 * num_n)
    first_m = group * 8
    size_m = tl.minimum(num_m - first_m, 8)
    pid_m = first_m + (pid % (8 * num_n)) % size_m
    pid_n = (pid % (8 * num_n)) // size_m
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_ptr + cols[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=mask_n[:, None] & (rk < K)[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong: numpy has no bf16)
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    # the LoRA output, xa [BLOCK_M, r] @ lora_b[BLOCK_N, r].T, into the same accumulator
    rr = tl.arange(0, R_PAD)
    xa = tl.load(xa_ptr + rows[:, None] * stride_am + rr[None, :] * stride_ar,
                 mask=mask_m[:, None] & (rr < R)[None, :], other=0.0)  # fmt: skip
    lb = tl.load(lb_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                 mask=mask_n[:, None] & (rr < R)[None, :], other=0.0)  # fmt: skip
    if DOT_FP32:
        acc = tl.dot(xa.to(tl.float32), tl.trans(lb.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(xa, tl.trans(lb), acc)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if pre_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_to_bf16(acc)  # the interpreter's cast truncates; a no-op on the GPU
    pre = acc.to(pre_ptr.dtype.element_ty)
    tl.store(pre_ptr + offs, pre, mask=mask)
    out = pre.to(tl.float32)  # the epilogue reads the stored (rounded) pre, as the unfused path does
    if HAS_SCALE:
        out = out * tl.load(s_ptr + cols, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if y_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16(out)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton_op("quantframe::dora_linear", mutates_args=())
def _dora_linear_op(
    x: Tensor, w: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor | None, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Arguments checked by :func:`dora_linear_triton`; ``scale`` fp32 or None."""
    (m, k), (n, r) = x.shape, lora_b.shape
    pre = torch.empty((m, n), dtype=x.dtype, device=x.device)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        wrap_triton(_dora_linear_kernel)[grid](
            x, w, xa, lora_b, scale if scale is not None else x, bias if bias is not None else x, pre, y,
            m, n, k, r, *x.stride(), *w.stride(), *xa.stride(), *lora_b.stride(),
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
            DOT_FP32=x.dtype == torch.float32 or interpreted(),
            R_PAD=max(16, triton.next_power_of_2(r)),
        )  # fmt: skip
    return y, pre


def dora_linear_triton(
    x: Tensor, w: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`dora_linear_reference`: one GEMM writes ``pre`` and ``y``."""
    _check_linear_args(x, w, xa, lora_b, scale, bias)
    return torch.ops.quantframe.dora_linear(
        x, w, xa, lora_b, None if scale is None else scale.float().contiguous(), bias, out_dtype
    )


def dora_linear(
    x: Tensor, w: Tensor, xa: Tensor, lora_b: Tensor, scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(y, pre)`` of :func:`dora_linear_reference`: the fused Triton GEMM on CUDA, else the reference."""
    if use_triton(x) and x.dtype in _FLOAT_DTYPES[:3]:
        return dora_linear_triton(x, w, xa, lora_b, scale, bias, out_dtype)
    return dora_linear_reference(x, w, xa, lora_b, scale, bias, out_dtype)
