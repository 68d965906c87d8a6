"""LLM.int8() (bitsandbytes' ``Linear8bitLt``): ``LLMInt8Weight`` and ``llm_int8(threshold)``.

The weight is symmetric int8 with one fp32 scale per output row (absmax / 127). ``F.linear`` splits
the input's features (columns of ``x [M, K]``) in two:

* outlier columns, where any ``|x[m, k]| > threshold``: ``x[:, outl] @ dequant(W)[:, outl].T`` in
  fp32 (bitsandbytes does this part in fp16);
* the rest: ``x`` quantized per row to int8 *with the outlier columns zeroed* (so they neither
  count twice nor inflate its absmax), times the int8 weight (its outlier columns meet those
  zeros), on the INT8 x INT8 -> INT32 GEMM (``int8_scaled_mm``), scales applied in its epilogue.

The two are summed in fp32, the bias is added once, and the result is rounded once to x's dtype.
On CUDA the outlier part multiplies the int8 weight directly (``int8_weight_mm`` in x's 16-bit
dtype, as bitsandbytes does in fp16; for 2-16 rows the affine int8 kernels' skinny GEMM), and one
token takes both parts in one pass over W: the int8 GEMV on ``where(outlier, x, x_q * sx)`` in
fp32 (that row built by one kernel, ``kernels/llm_int8_input.py``), equal to the sum of the two
parts up to fp32 rounding.

Outlier columns are data dependent. Gathering them (``x[:, outl]``) gives tensors of dynamic
shape, which ``torch.compile(fullgraph=True)`` cannot trace without graph breaks; so both parts
are written with the column *mask* instead: the INT8 part takes ``x.masked_fill(outl, 0)`` and
``qdata.masked_fill(outl, 0)``, the 16-bit part ``x.masked_fill(~outl, 0) @ dequant(W).T`` - the
same sums (a zeroed column adds exact zeros), static shapes. The cost is a full-K matmul for the
outlier part from 17 rows on; a kernel gathering the few columns would avoid it.

Gradients: ``grad_input = grad_out @ dequant(W)`` (bitsandbytes' backward); the weight gets
none (inference / frozen base); the bias, if it requires grad, gets ``grad_out.sum(0)``. An
empty batch (``M == 0``) returns an empty ``[..., N]`` and zero-size gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe import primitives as P
from quantframe.api import QuantConfig, register_quantize_handler
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    QuantTensor,
    check_weight,
    dequantizing_op,
    row_slice_op,
    same_shape_view_op,
)

aten = torch.ops.aten

__all__ = ["LLMInt8Config", "LLMInt8Weight", "llm_int8"]


def _check_threshold(threshold: object, who: str) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"{who}: threshold={threshold!r} must be a number > 0 (math.inf: no outliers)")


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMInt8Config(QuantConfig):
    """LLM.int8(): int8 per-row weights, input columns above ``threshold`` in 16-bit."""

    frozen = True  # an inference format: quantize_ gives the weight requires_grad=False
    threshold: float = 6.0

    def __post_init__(self) -> None:
        _check_threshold(self.threshold, "llm_int8")


def llm_int8(threshold: float = 6.0) -> LLMInt8Config:
    """bitsandbytes' LLM.int8() (``Linear8bitLt(threshold=6.0)``); ``ValueError`` unless threshold > 0.

    Example::

        quantize_(model, llm_int8(threshold=6.0))
        y = model(x)  # outlier features of x in 16-bit, the rest on the INT8 GEMM
    """
    return LLMInt8Config(threshold)


# ---- the tensor ----------------------------------------------------------------------------------
class LLMInt8Weight(QuantTensor):
    """Logical ``[N, K]`` weight: int8 ``qdata`` ``[N, K]`` in [-127, 127], fp32 ``scale`` ``[N]``.

    Attribute ``threshold`` (float > 0): an input column is an outlier when any of its entries
    exceeds it in magnitude. Outer dtype: the activation / gradient dtype.
    """

    tensor_names = ("qdata", "scale")
    attr_names = ("threshold",)

    @classmethod
    def from_float(cls, w: Tensor, threshold: float = 6.0) -> LLMInt8Weight:
        """Per-row absmax int8 of a float ``w [N, K]``; outer dtype = ``w.dtype``.

        Raises ``TypeError`` for a non-float weight, ``ValueError`` for a weight that is not a
        finite non-empty 2-D tensor or a threshold that is not > 0.
        """
        who = f"{cls.__name__}.from_float"
        _check_threshold(threshold, who)
        check_weight(w, who)
        qdata, scale = P.quantize_rowwise_int8(w.detach())
        return cls(qdata, scale, float(threshold), shape=w.shape, dtype=w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``qdata * scale[:, None]`` in fp32, cast to ``dtype`` (default: outer dtype)."""
        return P.dequantize_rowwise_int8(self.qdata, self.scale, dtype or self.dtype)


# ---- linear --------------------------------------------------------------------------------------
GEMV_MAX_ROWS = 16  # up to this many rows of x (decode) on CUDA, the outlier part on the skinny GEMM


def llm_int8_mm(x: Tensor, qdata: Tensor, scale: Tensor, threshold: float) -> Tensor:
    """``x [M, K]`` (M >= 1) @ dequant(W).T with the outlier decomposition -> fp32 ``[M, N]``."""
    from quantframe import kernels  # lazy: `import quantframe` stays triton-free
    from quantframe.kernels import affine_mm, int8_mm, int8_rowwise, int8_weight_mm, llm_int8_input

    on_gpu = kernels.use_triton(x)
    if on_gpu and x.shape[0] == 1:
        # One token, bound by reading W: both parts in one pass over it. Column k of x is x_q * sx (the
        # INT8 part's value, exact in fp32) or, in an outlier column, x itself (one Triton kernel builds
        # that row); the int8 weight family's GEMV (fp32 products on the CUDA cores, per-row scale, zero
        # point 0) sums them in fp32: the two parts' sum up to fp32 rounding. (H200: 27.0 us; through
        # the 2-D fp32 kernel, which multiplies a 16-row tile with FMAs, 259 us.)
        x_mixed = llm_int8_input.llm_int8_mixed_input(x, threshold)
        return affine_mm.affine_mm_triton(x_mixed, qdata, scale.reshape(-1, 1), _zero_points(qdata), 8, None)
    outl = (x.abs() > threshold).any(0)  # [K] bool
    x_q, x_scale = int8_rowwise.quantize_rowwise_int8(x.masked_fill(outl, 0))
    # W's outlier columns meet zeros of x_q: the INT8 GEMM needs no masked copy of W
    y = int8_mm.int8_scaled_mm(x_q, qdata, x_scale, scale, None, out_dtype=torch.float32)
    x_out = x.masked_fill(~outl, 0)
    if on_gpu and x.shape[0] <= GEMV_MAX_ROWS:
        # 2-16 rows: the outlier part on the affine int8 kernels' skinny tensor-core GEMM (W read a
        # second time; the one-pass fp32 route through int8_weight_mm's 2-D kernel took 267 us at 16
        # rows on H200). Not yet timed.
        return y + affine_mm.affine_mm_triton(x_out, qdata, scale.reshape(-1, 1), _zero_points(qdata), 8, None).float()
    if on_gpu:  # the outlier part on the int8 weight in x's 16-bit dtype (bitsandbytes: fp16)
        return y + int8_weight_mm.int8_weight_mm(x_out, qdata, scale).float()
    return y + x_out.float() @ P.dequantize_rowwise_int8(qdata, scale).T


def _zero_points(qdata: Tensor) -> Tensor:
    """int32 zeros ``[N, 1]`` (a stride-0 view of one element): symmetric codes for the affine kernels."""
    return torch.zeros((1, 1), dtype=torch.int32, device=qdata.device).expand(qdata.shape[0], 1)


class _LLMInt8Linear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] == 0:  # bitsandbytes special-cases empty batches too
            return x.new_empty(*x.shape[:-1], qdata.shape[0])
        y = llm_int8_mm(x2d, qdata, scale, threshold)
        if bias is not None:
            y = y + bias.float()
        # _unsafe_view, not reshape: an output that views an intermediate loses its gradient in a
        # compiled autograd.Function on torch 2.11 (see quantframe/nn/dora.py, _DoRALinearFn)
        return torch.ops.aten._unsafe_view(y.to(x.dtype), (*x.shape[:-1], qdata.shape[0]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, qdata, scale, bias, _ = inputs
        ctx.save_for_backward(qdata, scale)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        qdata, scale = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = P.dequantize_rowwise_int8(qdata, scale)
            grad_x = (g2d.float() @ w).to(ctx.x_dtype).reshape(*grad.shape[:-1], qdata.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g2d.sum(0)
        return grad_x, None, None, grad_bias, None


@LLMInt8Weight.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, LLMInt8Weight) or not x.dtype.is_floating_point:
        raise TypeError(f"F.linear: the input must be a plain float tensor, got {type(x).__name__} {x.dtype}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    return _LLMInt8Linear.apply(x, w.qdata, w.scale, bias, w.threshold)


# ---- views and copies --------------------------------------------------------------------------
LLMInt8Weight.implements([aten.slice.Tensor])(row_slice_op)
LLMInt8Weight.implements([aten.view.default, aten._unsafe_view.default])(same_shape_view_op)


@LLMInt8Weight.implements([aten.copy_.default])
def _copy(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, LLMInt8Weight):
        return dst.copy_(src.dequantize(dst.dtype))
    if not isinstance(src, LLMInt8Weight):
        raise NotImplementedError("LLMInt8Weight: copy_ of a plain tensor is not supported; use LLMInt8Weight.from_float")
    if src.shape != dst.shape:
        raise ValueError(f"LLMInt8Weight.copy_: shapes differ: {list(src.shape)} into {list(dst.shape)}")
    dst.qdata.copy_(src.qdata)
    dst.scale.copy_(src.scale)
    dst.threshold = src.threshold
    return dst


LLMInt8Weight.implements(DEQUANTIZING_OPS)(dequantizing_op)


# ---- quantize_ handler and safe loading -------------------------------------------------------
@register_quantize_handler(LLMInt8Config)
def _quantize_module(module: nn.Module, config: LLMInt8Config) -> Tensor:
    return LLMInt8Weight.from_float(module.weight, config.threshold)


torch.serialization.add_safe_globals([LLMInt8Weight])
