"""INT8 mixed-precision training: the three matmuls of each linear run on INT8 tensor cores.

Activations, gradients and weights are quantized on the fly, symmetric int8 with one scale per
row or column ("vector-wise", as in SwitchBack and bitsandbytes' MatMul8bit), multiplied as
int8 x int8 -> int32 and rescaled in the matmul's epilogue
(:func:`quantframe.kernels.int8_mm.int8_scaled_mm`). Each of the three can be switched back to a
float matmul. Two weight formats:

* :class:`Int8MixedPrecisionLinearWeight`: the weight stays a float tensor (the master copy,
  updated as usual); only the matmuls are INT8.
* :class:`Int8MixedPrecisionQTLinearWeight` (``int8_weights=True``): the weight is stored as
  :class:`~quantframe.int8_training.Int8QTLinearWeight` (int8 + row scale, stochastic-rounding
  updates) *and* the matmuls are INT8. The stored codes are used as they are: no requantization.

Which dimension each scale runs along. ``int8_scaled_mm(a [P, R], b [Q, R], sa [P], sb [Q])`` sums
``(a[p, r] sa[p]) (b[q, r] sb[q]) = sa[p] sb[q] sum_r a[p, r] b[q, r]``: a scale may vary along the
output dims but must be constant along the reduction dim ``r``. So each operand is quantized per
vector *along its matmul's reduction dim* (``x [M, K]``, ``W [N, K]``, ``g = dL/dy [M, N]``)::

    output       y  [M, N] = x @ W.T    reduces K: x per token (rows),      W per output row (rows)
    grad_input   dx [M, K] = g @ W      reduces N: g per token (rows),      W per input column (cols)
    grad_weight  dW [N, K] = g.T @ x    reduces M: g per output feature (cols), x per input feature (cols)

Column-wise quantization writes the transposed ``[cols, rows]`` codes, the K-major operand the
tensor cores read (``quantize_colwise_int8``). With INT8 weights, ``W = int_data * scale[:, None]``
already has the output matmul's layout; for grad_input its scale runs along the reduction dim N,
so it moves onto g instead: ``g @ W = (g * scale[None, :]) @ int_data``, and the codes go in as
they are, with unit column scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import return_and_correct_aliasing

from quantframe.api import QuantConfig, register_quantize_handler
from quantframe.int8_training import Int8QTLinearWeight  # the INT8 weight this scheme composes with
from quantframe.primitives import quantize_rowwise_int8
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    FOREACH_OPS,
    REQUANTIZING_INPLACE_OPS,
    QuantTensor,
    check_weight,
    FLOAT_MASTER_COLLECTIVE_OPS,
    float_master_collective_op,
    float_master_copy_op,
    float_master_fsdp_post_all_gather,
    float_master_fsdp_pre_all_gather,
    float_master_inplace_op,
    float_master_math_op,
    float_master_new_zeros_op,
)

aten = torch.ops.aten

__all__ = [
    "Int8MixedPrecisionTrainingConfig",
    "int8_mixed_precision_training",
    "Int8MixedPrecisionLinearWeight",
    "Int8MixedPrecisionQTLinearWeight",
]

_FLAGS = ("output", "grad_input", "grad_weight")


# ---- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8MixedPrecisionTrainingConfig(QuantConfig):
    """Which of a linear's matmuls run in INT8, and whether the weight itself is INT8."""

    output: bool = True  # y = x @ W.T
    grad_input: bool = True  # dx = g @ W
    grad_weight: bool = True  # dW = g.T @ x
    int8_weights: bool = False  # store W as Int8QTLinearWeight (int8 + row scale, SR updates)

    def __post_init__(self) -> None:
        _check_flags("int8_mixed_precision_training", **{n: getattr(self, n) for n in (*_FLAGS, "int8_weights")})


def int8_mixed_precision_training(
    output: bool = True, grad_input: bool = True, grad_weight: bool = True, *, int8_weights: bool = False
) -> Int8MixedPrecisionTrainingConfig:
    """Config for INT8 mixed-precision training; each flag puts one matmul of every linear on INT8.

    ``int8_weights=True`` also stores the weights in INT8 (as ``int8_weight_only_quantized_training``).
    Raises ``TypeError`` for a flag that is not a bool.

    Example::

        quantize_(model, int8_mixed_precision_training(grad_weight=False))  # SwitchBack-style
        opt = quantframe.optim.AdamW(model.parameters(), lr=1e-3)
    """
    return Int8MixedPrecisionTrainingConfig(output, grad_input, grad_weight, int8_weights)


def _check_flags(who: str, **flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{who}: {name}={value!r} must be a bool (True or False)")


def _flags(w: Tensor) -> tuple[bool, bool, bool]:
    return tuple(getattr(w, name) for name in _FLAGS)


# ---- the float-weight tensor -----------------------------------------------------------------
class Int8MixedPrecisionLinearWeight(QuantTensor):
    """A float weight whose ``F.linear`` runs its matmuls in INT8.

    Inner tensor: ``float_data``, the weight itself (any float dtype; ``data`` is taken by
    ``torch.Tensor``). Attributes: the three flags of :class:`Int8MixedPrecisionTrainingConfig`.
    Outer dtype: the gradient's dtype; ``.to(bf16)`` changes it and keeps an fp32 ``float_data``
    as the master copy. Every other op acts on ``float_data``: in-place math updates it, views
    view it, and out-of-place math returns plain tensors.
    """

    tensor_names = ("float_data",)
    attr_names = _FLAGS

    @staticmethod
    def __new__(cls, float_data, output=True, grad_input=True, grad_weight=True, *, shape=None, dtype=None,
                requires_grad=False):  # fmt: skip
        shape = float_data.shape if shape is None else shape
        return QuantTensor.__new__(
            cls, float_data, shape=shape, dtype=dtype or float_data.dtype, requires_grad=requires_grad
        )

    def __init__(self, float_data, output=True, grad_input=True, grad_weight=True, *, shape=None, dtype=None,
                 requires_grad=False):  # fmt: skip
        super().__init__(float_data, output, grad_input, grad_weight, shape=shape, dtype=dtype)

    @classmethod
    def from_float(cls, w: Tensor, output: bool = True, grad_input: bool = True, grad_weight: bool = True):
        """A copy of the float weight ``w [N, K]``; outer dtype = ``w.dtype``.

        Raises ``TypeError``/``ValueError`` for a weight that is not a finite 2-D float tensor
        and ``TypeError`` for a flag that is not a bool.
        """
        check_weight(w, f"{cls.__name__}.from_float")
        _check_flags(f"{cls.__name__}.from_float", output=output, grad_input=grad_input, grad_weight=grad_weight)
        return cls(w.detach().clone(), output, grad_input, grad_weight, dtype=w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """A copy of the weight in ``dtype`` (default: outer dtype)."""
        return self.float_data.to(dtype or self.dtype, copy=True)

    @torch.no_grad()
    def requantize_(self, value: Tensor) -> Int8MixedPrecisionLinearWeight:
        """Write ``value`` (same shape) into ``float_data``, rounded to nearest in its dtype.

        The optimizer's write-back (``quantframe.optim.AdamW``); ``ValueError`` for another shape.
        """
        if value.shape != self.shape:
            got, want = tuple(value.shape), tuple(self.shape)
            raise ValueError(f"{type(self).__name__}: cannot copy a {got} tensor into {want}")
        self.float_data.copy_(value)
        return self

    # FSDP2: all-gather the float weight, cast to the mixed-precision param dtype first.
    fsdp_pre_all_gather = float_master_fsdp_pre_all_gather
    fsdp_post_all_gather = float_master_fsdp_post_all_gather


# ---- the INT8-weight tensor ------------------------------------------------------------------
class Int8MixedPrecisionQTLinearWeight(Int8QTLinearWeight):
    """An :class:`Int8QTLinearWeight` whose ``F.linear`` also runs its matmuls in INT8.

    Storage, optimizer updates (stochastic rounding), views and FSDP2 all-gather (int8 + scales)
    are Int8QTLinearWeight's; it adds the three flags of :class:`Int8MixedPrecisionTrainingConfig`.
    """

    attr_names = _FLAGS

    @staticmethod
    def __new__(cls, int_data, scale, output=True, grad_input=True, grad_weight=True, *, shape=None,
                dtype=torch.float32, requires_grad=False):  # fmt: skip
        return Int8QTLinearWeight.__new__(cls, int_data, scale, shape=shape, dtype=dtype, requires_grad=requires_grad)

    def __init__(self, int_data, scale, output=True, grad_input=True, grad_weight=True, *, shape=None,
                 dtype=torch.float32, requires_grad=False):  # fmt: skip
        QuantTensor.__init__(self, int_data, scale, output, grad_input, grad_weight, shape=shape, dtype=dtype)

    @classmethod
    def from_float(cls, w: Tensor, output: bool = True, grad_input: bool = True, grad_weight: bool = True):
        """Round-to-nearest per-row int8 of ``w [N, K]`` (as Int8QTLinearWeight); outer dtype = ``w.dtype``.

        Raises as :meth:`Int8MixedPrecisionLinearWeight.from_float`.
        """
        check_weight(w, f"{cls.__name__}.from_float")
        _check_flags(f"{cls.__name__}.from_float", output=output, grad_input=grad_input, grad_weight=grad_weight)
        int_data, scale = quantize_rowwise_int8(w.detach())
        return cls(int_data, scale, output, grad_input, grad_weight, dtype=w.dtype)


# ---- linear ----------------------------------------------------------------------------------
# Under torch.compile, quantize activations and gradients with torch ops instead of the Triton passes:
# inductor may then fuse the quantization into the kernels that produce those tensors (RMSNorm,
# SiLU-mul and their backward), and the partitioner may recompute codes rather than save them (as
# BitNet's linear does). Off until timed against the tuned Triton passes (H200 anchor step: 1.03x bf16).
TORCH_OPS_WHEN_TRACED = False


def _torch_ops(t: Tensor) -> bool:
    from quantframe.kernels import is_traced

    return TORCH_OPS_WHEN_TRACED and is_traced(t)


def _rowwise(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    from quantframe.kernels.int8_rowwise import quantize_rowwise_int8 as kernel
    from quantframe.kernels.int8_rowwise import quantize_rowwise_int8_reference

    return (quantize_rowwise_int8_reference if _torch_ops(t) else kernel)(t, col_scale=col_scale)


def _mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16) -> Tensor:
    from quantframe.kernels.int8_mm import int8_scaled_mm

    return int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)


def _colwise(t: Tensor) -> tuple[Tensor, Tensor]:
    from quantframe.kernels.int8_mm import quantize_colwise_int8, quantize_colwise_int8_reference

    return (quantize_colwise_int8_reference if _torch_ops(t) else quantize_colwise_int8)(t)


def _rowcol(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from quantframe.kernels.int8_mm import quantize_rowcol_int8, quantize_rowcol_int8_reference

    return (quantize_rowcol_int8_reference if _torch_ops(t) else quantize_rowcol_int8)(t, col_scale)


def _output(x: Tensor, w: Tensor, bias: Tensor | None, x_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """y [M, N] = x [M, K] @ W.T + bias; ``x_rows``: x's row codes and scales if already quantized."""
    int8_weights = isinstance(w, Int8QTLinearWeight)
    if not w.output:
        if int8_weights:
            from quantframe.kernels.int8_weight_mm import int8_weight_mm

            return int8_weight_mm(x, w.int_data, w.scale, bias)
        return F.linear(x, w.float_data.to(x.dtype), None if bias is None else bias.to(x.dtype))
    xq, xs = x_rows if x_rows is not None else _rowwise(x)
    wq, ws = (w.int_data, w.scale) if int8_weights else _rowwise(w.float_data)  # stored rows are these rows
    return _mm(xq, wq, xs, ws, bias, out_dtype=x.dtype)


def _grad_input(g: Tensor, w: Tensor, dtype: torch.dtype, g_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """dx [M, K] = g [M, N] @ W; ``g_rows``: g's row codes and scales (of ``g * W.scale`` with INT8
    weights) if already quantized."""
    int8_weights = isinstance(w, Int8QTLinearWeight)
    if not w.grad_input:
        if int8_weights:
            from quantframe.kernels.int8_weight_mm import int8_weight_mm

            return int8_weight_mm(g, w.int_data, w.scale, transpose=True).to(dtype)
        return (g @ w.float_data.to(g.dtype)).to(dtype)
    if int8_weights:  # (g * scale) @ int_data: the stored codes, their row scale folded into g
        gq, gs = g_rows if g_rows is not None else _rowwise(g, col_scale=w.scale)  # g * scale never written
        ones = torch.ones(w.shape[1], dtype=torch.float32, device=g.device)
        return _mm(gq, w.int_data.T, gs, ones, out_dtype=dtype)
    gq, gs = g_rows if g_rows is not None else _rowwise(g)
    wq_t, ws_t = _colwise(w.float_data)  # [K, N], one scale per input feature
    return _mm(gq, wq_t, gs, ws_t, out_dtype=dtype)


def _grad_weight(g_cols: tuple[Tensor, Tensor], x_cols: tuple[Tensor, Tensor], w: Tensor) -> Tensor:
    """dW [N, K] = g.T [N, M] @ x [M, K] in INT8, in the weight's (outer) dtype, from the column codes
    and scales of g (``[N, M]``, ``[N]``) and x (``[K, M]``, ``[K]``)."""
    return _mm(g_cols[0], x_cols[0], g_cols[1], x_cols[1], out_dtype=w.dtype)


class _Int8MixedPrecisionLinear(torch.autograd.Function):
    """y = x @ W.T + b with each of the three matmuls in INT8 as the weight's flags say.

    A tensor that feeds two INT8 matmuls is quantized per row and per column in one two-pass kernel
    (``quantize_rowcol_int8``): x for the output (rows) and the weight gradient (columns), g for the
    input gradient (rows) and the weight gradient (columns). When the weight gradient is INT8, the
    forward keeps x's column codes (int8, ``[K, M]``) for it instead of x itself (half the bytes).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        x2d = x.reshape(-1, x.shape[-1])
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # INT8 weight gradient: x's column codes now, so that backward needs neither x nor a pass over it
        ctx.x_codes = bool(weight.grad_weight and ctx.needs_input_grad[1] and x2d.shape[0] > 0)
        x_rows = x_cols = None
        if ctx.x_codes and weight.output:
            xq, xs, xq_t, xs_t = _rowcol(x2d)
            x_rows, x_cols = (xq, xs), (xq_t, xs_t)
        elif ctx.x_codes:
            x_cols = _colwise(x2d)
        # The weight (not its quantized copy) is saved: under FSDP2 it is freed after forward and
        # all-gathered again for backward; a saved int8 copy would stay alive unsharded.
        if ctx.x_codes:
            ctx.save_for_backward(*x_cols, weight)
        else:
            ctx.save_for_backward(x, weight)
        y = _output(x2d, weight, bias, x_rows)
        # _unsafe_view, as aten's matmul does: a plain view would make the output a view of a
        # temporary, which FSDP2 warns about (in-place ops on it would skip its backward hook).
        return aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.x_codes:
            xq_t, xs_t, weight = ctx.saved_tensors
        else:
            x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        g_rows = g_cols = None
        if need_w and ctx.x_codes:
            if need_x and weight.grad_input:  # g feeds two INT8 matmuls: one two-pass quantization
                col_scale = weight.scale if isinstance(weight, Int8QTLinearWeight) else None
                gq, gs, gq_t, gs_t = _rowcol(g, col_scale)
                g_rows, g_cols = (gq, gs), (gq_t, gs_t)
            else:
                g_cols = _colwise(g)  # [N, M], one scale per output feature
        if need_x:
            grad_x = _grad_input(g, weight, ctx.x_dtype, g_rows).reshape(ctx.x_shape)
        if need_w:
            if ctx.x_codes:
                grad_w = _grad_weight(g_cols, (xq_t, xs_t), weight)
            elif not weight.grad_weight:
                grad_w = (g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
            else:  # no tokens: nothing to quantize column-wise
                grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=g.device)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


@Int8MixedPrecisionLinearWeight.implements([F.linear])
@Int8MixedPrecisionQTLinearWeight.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    name = type(w).__name__
    if not isinstance(w, (Int8MixedPrecisionLinearWeight, Int8MixedPrecisionQTLinearWeight)):
        raise TypeError(
            f"F.linear: only the weight may be an INT8 mixed-precision weight, got input {type(x).__name__}"
        )
    if w.dim() != 2 or (isinstance(w, Int8QTLinearWeight) and w.scale.numel() != w.shape[0]):
        raise ValueError(f"F.linear: {name} must be a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1] if x.dim() else 0} features, weight expects {w.shape[1]}")
    devices = {t.device for t in (x, w, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"F.linear: input, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"F.linear: input must be float32, float16 or bfloat16, got {x.dtype}")
    return _Int8MixedPrecisionLinear.apply(x, w, bias)


# ---- the float weight's ops: views view float_data, math acts on it ------------------------
def _view_result(func, args, kwargs, w: Int8MixedPrecisionLinearWeight, data: Tensor):
    out = Int8MixedPrecisionLinearWeight(data, *_flags(w), dtype=w.dtype)
    return return_and_correct_aliasing(func, args, kwargs, out)


@Int8MixedPrecisionLinearWeight.implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, types, args, kwargs):
    return _view_result(func, args, kwargs, args[0], args[0].float_data.view(args[1]))


@Int8MixedPrecisionLinearWeight.implements([aten.slice.Tensor])
def _slice(func, types, args, kwargs):
    return _view_result(func, args, kwargs, args[0], func(args[0].float_data, *args[1:], **kwargs))


@Int8MixedPrecisionLinearWeight.implements([aten.as_strided.default])
def _as_strided(func, types, args, kwargs):
    w, size, stride = args[0], args[1], args[2]
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset") or 0
    data = w.float_data
    if not data.is_contiguous():
        # size/stride/offset address the wrapper's contiguous layout; only a contiguous
        # float_data has that layout, so only there do they mean the same elements.
        raise NotImplementedError(f"{type(w).__name__}: as_strided of a non-contiguous weight is not supported")
    return _view_result(func, args, kwargs, w, data.as_strided(size, stride, data.storage_offset() + offset))


@Int8MixedPrecisionLinearWeight.implements([aten.split.Tensor])
def _split(func, types, args, kwargs):
    w = args[0]
    parts = func(w.float_data, *args[1:], **kwargs)
    return [Int8MixedPrecisionLinearWeight(d, *_flags(w), dtype=w.dtype) for d in parts]


@Int8MixedPrecisionLinearWeight.implements([aten.cat.default])
def _cat(func, types, args, kwargs):
    tensors = args[0]
    if not all(isinstance(t, Int8MixedPrecisionLinearWeight) for t in tensors):
        raise NotImplementedError(f"Int8MixedPrecisionLinearWeight: cat supports Int8MixedPrecisionLinearWeights only, "
                                  f"got {sorted({type(t).__name__ for t in tensors})}")  # fmt: skip
    data = func([t.float_data for t in tensors], *args[1:], **kwargs)
    return Int8MixedPrecisionLinearWeight(data, *_flags(tensors[0]), dtype=tensors[0].dtype)


Int8MixedPrecisionLinearWeight.implements([aten.new_zeros.default])(float_master_new_zeros_op)


# Optimizer math and copies act on the float master weight itself (quantframe.tensor).
Int8MixedPrecisionLinearWeight.implements([aten.copy_.default])(float_master_copy_op)
Int8MixedPrecisionLinearWeight.implements(DEQUANTIZING_OPS)(float_master_math_op)
Int8MixedPrecisionLinearWeight.implements(REQUANTIZING_INPLACE_OPS + FOREACH_OPS)(float_master_inplace_op)


# ---- collectives (DTensor.full_tensor): gather the float data, keep the class ----------------
Int8MixedPrecisionLinearWeight.implements(FLOAT_MASTER_COLLECTIVE_OPS)(float_master_collective_op)


# ---- quantize_ handler and safe loading -------------------------------------------------------
@register_quantize_handler(Int8MixedPrecisionTrainingConfig)
def _quantize_module(module: nn.Module, config: Int8MixedPrecisionTrainingConfig) -> Tensor:
    cls = Int8MixedPrecisionQTLinearWeight if config.int8_weights else Int8MixedPrecisionLinearWeight
    return cls.from_float(module.weight, config.output, config.grad_input, config.grad_weight)


torch.serialization.add_safe_globals([Int8MixedPrecisionLinearWeight, Int8MixedPrecisionQTLinearWeight])
