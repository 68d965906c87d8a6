"""Fused RMSNorm (+ residual add) + per-token absmax INT8 quantize-dequantize: BitLinear's input.

Per token (a row ``[D]``, all math in fp32)::

    h     = x + residual            (stored in x.dtype and returned: the next residual stream)
    rstd  = 1 / sqrt(mean(h ** 2) + eps)
    n     = h * rstd * weight
    a     = max(max_d |n|, 1e-5)                       (as quantframe.ternary.quantize_activations_int8)
    y     = clamp(round(n * (127 / a)), -128, 127) * (a / 127)   (returned in x.dtype)

``round`` is half to even. The backward is the straight-through estimator through the quantizer
(``dy/dn`` = identity) and RMSNorm's exact backward; it recomputes ``rstd`` from the saved ``h``
(``x`` without a residual) instead of storing the normed output. ``grad h`` from the returned
sum is added to the gradient of ``x`` and of ``residual``.

Forward: one program per row with the whole row in registers (``D <= 16384``). Backward: a fixed
number of programs loop over rows, each keeping its ``grad weight`` partial sum in registers; the
partials ``[P, D]`` are summed in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import use_triton
from .int8_rowwise import _round_to_bf16, round_half_even

__all__ = ["rmsnorm_quant", "rmsnorm_quant_reference", "rmsnorm_quant_triton"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QEPS = 1e-5  # absmax floor of quantframe.ternary: an all-zero token gets codes 0, not NaN
MAX_D = 16384  # a row lives in registers; ptxas (sm_90): no spills up to 8192, a few hundred bytes at 16384


def _check_args(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> None:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() == 0:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"rmsnorm_quant: x must be a float tensor [..., D], got {got}")
    d = x.shape[-1]
    if not weight.dtype.is_floating_point or weight.shape != (d,):
        raise ValueError(
            f"rmsnorm_quant: weight must be a float [{d}] tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rmsnorm_quant: residual ({residual.dtype} {tuple(residual.shape)}) must match x ({x.dtype} {tuple(x.shape)})"
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"rmsnorm_quant: eps={eps!r} must be a positive float")
    devices = {t.device for t in (x, weight, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"rmsnorm_quant: x, weight and residual must share a device, got {sorted(map(str, devices))}")


class _QuantSTE(torch.autograd.Function):
    """Per-token absmax INT8 quantize-dequantize of fp32 ``n [M, D]``; backward = identity."""

    @staticmethod
    def forward(ctx, n: Tensor) -> Tensor:
        # Tensor / tensor: IEEE division on CPU and CUDA alike, as the kernel's div_rn (see int8_rowwise).
        a = n.abs().amax(dim=-1, keepdim=True).clamp(min=_QEPS)
        c127 = torch.full_like(a, 127.0)
        return torch.round(n * (c127 / a)).clamp(-128, 127) * (a / c127)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def rmsnorm_quant_reference(
    x: Tensor, weight: Tensor, residual: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor | None]:
    """RMSNorm (+ residual) then INT8 per-token quantize-dequantize, in plain differentiable torch.

    Args:
        x: ``[..., D]`` float activations.
        weight: ``[D]`` float RMSNorm weight.
        residual: ``[..., D]`` like ``x`` (same dtype) or None; normalized is ``x + residual``.
        eps: added to ``mean(h ** 2)``.

    Returns:
        ``(y, h)``: ``y [..., D]`` in ``x.dtype`` (the dequantized INT8 codes), ``h = x + residual``
        in ``x.dtype``, or None without a residual. Gradients: STE through the quantizer.

    Raises:
        TypeError / ValueError: a non-float ``x``, mismatched shapes, dtypes or devices, ``eps <= 0``.
    """
    _check_args(x, weight, residual, eps)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)  # rounded as stored
    hf = h.reshape(-1, h.shape[-1]).float()
    rstd = torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
    y = _QuantSTE.apply(hf * rstd * weight.float()).to(x.dtype).reshape(x.shape)
    return y, (None if residual is None else h)


# ---- Triton ------------------------------------------------------------------------------------
@triton.jit
def _as_stored(v, ptr):
    """fp32 ``v`` cast to ``ptr``'s element type, rounding to nearest even (the interpreter's
    bf16 cast truncates; :func:`_round_to_bf16` makes both round)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bf16(v)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _rmsnorm_quant_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,  # x, residual, y, h [M, D] (row stride, unit column stride); w [D]
    D, stride_xm, stride_rm, stride_ym, stride_hm, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D: the row lives in registers
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        hs = _as_stored(h + tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32), h_ptr)
        tl.store(h_ptr + row * stride_hm + cols, hs, mask=mask)
        h = hs.to(tl.float32)  # normalize what is stored, so the backward's recompute matches
    rstd = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / D + tl.cast(eps, tl.float32))  # torch.compile passes floats as fp64
    n = h * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # div_rn: IEEE division like torch's; plain `/` is approximate for fp32 on NVIDIA GPUs.
    a = tl.maximum(tl.max(tl.abs(n), axis=0), 1e-5)
    scale = tl.math.div_rn(a, 127.0)
    v = round_half_even(n * tl.math.div_rn(127.0, a))  # the product rounded, then to an integer: |v| <= 127
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    tl.store(y_ptr + row * stride_ym + cols, _as_stored(v * scale, y_ptr), mask=mask)


@triton.jit
def _rmsnorm_quant_bwd_kernel(
    gy_ptr, gh_ptr, h_ptr, w_ptr, dx_ptr, dw_ptr,  # gy, gh, h, dx [M, D]; w [D]; dw partials [P, D] fp32
    M, D, stride_gym, stride_ghm, stride_hm, stride_dxm, eps,
    HAS_GH: tl.constexpr,  # the returned h = x + residual received a gradient
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # so row * stride is int64 (the interpreter's loop variable is an int)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        h = tl.load(h_ptr + row * stride_hm + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / D + tl.cast(eps, tl.float32))  # recomputed, as in the forward
        xhat = h * rstd
        g = tl.load(gy_ptr + row * stride_gym + cols, mask=mask, other=0.0).to(tl.float32)  # STE: dn = dy
        u = g * w
        dh = rstd * (u - xhat * (tl.sum(u * xhat, axis=0) / D))
        if HAS_GH:
            dh += tl.load(gh_ptr + row * stride_ghm + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dxm + cols, _as_stored(dh, dx_ptr), mask=mask)
        dw += g * xhat
    tl.store(dw_ptr + pid * D + cols, dw, mask=mask)


def _num_warps(block_d: int, backward: bool = False) -> int:
    """Warps for a row of ``block_d`` values (Liger's calculate_settings); the backward keeps about
    twice the live rows (h, grad, w, grad-w partial) and takes 32 warps at 16384 (fewer spills)."""
    if backward and block_d >= 16384:
        return 32
    return 16 if block_d >= 8192 else 8 if block_d >= 2048 else 4


def _bwd_programs(x: Tensor, m: int) -> int:
    """Programs of the backward: a few per SM, each accumulating ``grad weight`` over many rows."""
    if x.is_cuda:
        return min(m, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(m, 4)  # the interpreter: still more than one program, so the partial sum is tested


def _rows(t: Tensor) -> Tensor:
    """``[M, D]`` view with unit column stride (the kernels index columns densely)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# triton_op + wrap_triton let torch.compile trace into the kernels (on a GPU).
@triton_op("quantframe::rmsnorm_quant", mutates_args=())
def _rmsnorm_quant_op(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """``x, residual [M, D]`` with unit column stride; returns ``(y, h)``, ``h`` empty without a residual."""
    m, d = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0, d))
    if m == 0:
        return y, h
    block_d = triton.next_power_of_2(d)
    r = residual if residual is not None else x  # a dummy pointer without a residual
    hh = h if residual is not None else y
    wrap_triton(_rmsnorm_quant_fwd_kernel)[(m,)](
        x, r, weight, y, hh, d, x.stride(0), r.stride(0), y.stride(0), hh.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )  # fmt: skip
    return y, h


@triton_op("quantframe::rmsnorm_quant_backward", mutates_args=())
def _rmsnorm_quant_backward_op(
    grad_y: Tensor, grad_h: Tensor | None, h: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``(grad h, grad weight)`` of :func:`_rmsnorm_quant_op`; ``h [M, D]`` the normalized input."""
    m, d = h.shape
    dx = torch.empty_like(h)
    if m == 0:
        return dx, torch.zeros_like(weight)
    grad_y = grad_y.contiguous()
    grad_h = grad_h.contiguous() if grad_h is not None else None
    p = _bwd_programs(h, m)
    dw = torch.empty((p, d), dtype=torch.float32, device=h.device)
    gh = grad_h if grad_h is not None else grad_y
    block_d = triton.next_power_of_2(d)
    wrap_triton(_rmsnorm_quant_bwd_kernel)[(p,)](
        grad_y, gh, h, weight, dx, dw, m, d, grad_y.stride(0), gh.stride(0), h.stride(0), dx.stride(0), eps,
        HAS_GH=grad_h is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d, backward=True),
    )  # fmt: skip
    return dx, dw.sum(0).to(weight.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps = inputs
    ctx.save_for_backward(x if residual is None else output[1], weight)
    ctx.eps, ctx.has_residual = eps, residual is not None


def _backward(ctx, grad_y, grad_h):
    h, weight = ctx.saved_tensors
    dx, dw = torch.ops.quantframe.rmsnorm_quant_backward(
        grad_y, grad_h if ctx.has_residual else None, h, weight, ctx.eps
    )
    return dx, dw, (dx if ctx.has_residual else None), None


_rmsnorm_quant_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_problem(x: Tensor, weight: Tensor) -> Exception | None:
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        return TypeError(
            f"rmsnorm_quant_triton: x.dtype={x.dtype}, weight.dtype={weight.dtype}; expected float32, float16 or bfloat16"
        )
    if x.shape[-1] > MAX_D or x.shape[-1] == 0:
        return ValueError(f"rmsnorm_quant_triton: D={x.shape[-1]} must be in [1, {MAX_D}] (a row lives in registers)")
    return None


def rmsnorm_quant_triton(
    x: Tensor, weight: Tensor, residual: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor | None]:
    """Triton version of :func:`rmsnorm_quant_reference` (fp32/fp16/bf16, ``1 <= D <= 16384``, else
    TypeError / ValueError); differentiable through a Triton backward."""
    _check_args(x, weight, residual, eps)
    problem = _kernel_problem(x, weight)
    if problem is not None:
        raise problem
    y, h = torch.ops.quantframe.rmsnorm_quant(
        _rows(x), weight.contiguous(), None if residual is None else _rows(residual), float(eps)
    )
    return y.reshape(x.shape), (None if residual is None else h.reshape(x.shape))


def rmsnorm_quant(
    x: Tensor, weight: Tensor, residual: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor | None]:
    """``(y, h)`` of RMSNorm(+ residual) + INT8 quantize-dequantize: Triton on CUDA where it applies
    (see :func:`rmsnorm_quant_triton`), else :func:`rmsnorm_quant_reference` (same arguments and result).

    Example::

        y, h = rmsnorm_quant(x, norm.weight, residual=h, eps=1e-6)   # y: BitLinear input, h: new residual
        y, _ = rmsnorm_quant(x, norm.weight)
    """
    if use_triton(x) and _kernel_problem(x, weight) is None:
        return rmsnorm_quant_triton(x, weight, residual, eps)
    return rmsnorm_quant_reference(x, weight, residual, eps)
