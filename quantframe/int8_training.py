"""INT8 weight-only quantized training: ``Int8QTLinearWeight`` and its config.

The weight lives in INT8 between steps, per-output-row symmetric (scale = absmax / 127). The
forward and grad-input matmuls read the INT8 weight and dequantize it inside the kernel; the
weight gradient is a plain dense tensor; the optimizer updates the weight in fp32 and writes it
back with *stochastic* rounding, so updates far smaller than one quantization step still move
the weight on average (round-to-nearest would drop them). See docs/int8_training.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe.api import QuantConfig, register_quantize_handler
from quantframe.primitives import quantize_rowwise_int8
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    FOREACH_OPS,
    REQUANTIZING_INPLACE_OPS,
    WINDOW_OPS,
    QuantTensor,
    fsdp_all_gather_inputs,
    fsdp_gathered,
    fsdp_pre_all_gather_hook,
    check_weight,
    dequantizing_op,
    foreach_op,
    requantizing_inplace_op,
    window_op,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = ["Int8WeightOnlyQuantizedTrainingConfig", "int8_weight_only_quantized_training", "Int8QTLinearWeight"]


# ---- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8WeightOnlyQuantizedTrainingConfig(QuantConfig):
    """Per-row symmetric INT8 weights, updated with stochastic rounding."""


def int8_weight_only_quantized_training() -> Int8WeightOnlyQuantizedTrainingConfig:
    """Config for INT8 weight-only quantized training.

    Example::

        quantize_(model, int8_weight_only_quantized_training())
        opt = quantframe.optim.AdamW(model.parameters(), lr=1e-3)
    """
    return Int8WeightOnlyQuantizedTrainingConfig()


# ---- the tensor ------------------------------------------------------------------------------
class Int8QTLinearWeight(QuantTensor):
    """INT8 weight for quantized training.

    Inner tensors: ``int_data`` int8 (logical shape, values in [-127, 127]) and ``scale`` fp32
    ``[rows]``; row ``r`` is the ``r``-th run of ``row_len = numel // rows`` contiguous elements
    (for the usual ``[N, K]`` weight: rows = N, row_len = K). Keeping the rows implicit lets
    ``view``/``as_strided``/``slice`` on row boundaries be real views, which FSDP2 relies on.
    Outer dtype: the gradient's dtype.
    """

    tensor_names = ("int_data", "scale")

    def __init__(self, int_data: Tensor, scale: Tensor, *, shape=None, dtype=torch.float32, requires_grad=False):
        super().__init__(int_data, scale, shape=shape, dtype=dtype)

    @staticmethod
    def __new__(cls, int_data: Tensor, scale: Tensor, *, shape=None, dtype=torch.float32, requires_grad=False):
        shape = int_data.shape if shape is None else shape
        return QuantTensor.__new__(cls, int_data, scale, shape=shape, dtype=dtype, requires_grad=requires_grad)

    @classmethod
    def from_float(cls, w: Tensor) -> Int8QTLinearWeight:
        """Round-to-nearest (deterministic) quantization of a float ``w [N, K]``; outer dtype = w.dtype."""
        check_weight(w, f"{cls.__name__}.from_float")
        int_data, scale = quantize_rowwise_int8(w.detach())
        return cls(int_data, scale, dtype=w.dtype)

    @property
    def row_len(self) -> int:
        rows = self.scale.numel()
        return self.int_data.numel() // rows if rows else (self.shape[-1] if self.dim() else 1)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight, ``int_data * scale`` per row (fp32 math), in ``dtype`` (default: outer dtype)."""
        rows = self.scale.numel()
        flat = self.int_data.reshape(rows, -1) if rows else self.int_data.reshape(0, 1)
        return (flat.float() * self.scale.view(-1, 1)).view(self.shape).to(dtype or self.dtype)

    window_unit = "row"

    def _window(self, start: int, length: int, shape: torch.Size, op: str) -> Int8QTLinearWeight:
        """Elements [start, start+length) of the flat data, viewed as ``shape``: whole rows only."""
        row = self.row_len
        if start % row or length % row:
            raise NotImplementedError(
                f"Int8QTLinearWeight: {op} must select whole rows of {row} elements "
                f"(got elements [{start}, {start + length})); per-row scales cannot be split"
            )
        if not self.int_data.is_contiguous():
            raise NotImplementedError(f"Int8QTLinearWeight: {op} of a non-contiguous tensor is not supported")
        int_data = self.int_data.view(-1)[start : start + length].view(shape)
        scale = self.scale[start // row : (start + length) // row]
        return self._rebuild(int_data=int_data, scale=scale, shape=int_data.shape)

    @torch.no_grad()
    def requantize_(self, value: Tensor, stochastic: bool = True) -> Int8QTLinearWeight:
        """Write float ``value`` (same shape) into this tensor, per row, with stochastic rounding."""
        from quantframe.kernels.int8_rowwise import quantize_rowwise_int8 as kernel

        if value.shape != self.shape:
            raise ValueError(f"{type(self).__name__}: cannot copy a {tuple(value.shape)} tensor into {tuple(self.shape)}")
        if self.numel() == 0:
            return self
        int_data, scale = kernel(value.reshape(self.scale.numel(), -1), stochastic=stochastic)
        self.int_data.copy_(int_data.view(self.int_data.shape))
        self.scale.copy_(scale)
        return self

    # FSDP2 extension: the all-gather moves int8 data + fp32 row scales, never a float weight.
    #   fully_shard: weight --split/narrow/new_zeros (dim 0, rows)--> local shard (this class)
    #   forward:     pre_all_gather -> (int_data, scale) --all-gather--> post_all_gather -> full weight
    @fsdp_pre_all_gather_hook
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        world = mesh.size()
        if outer_size is not None and outer_size[0] % world:
            # FSDP2 pads uneven shards and requires every all-gather input to have the padded
            # shape of the weight, which the [rows] scale cannot have.
            raise ValueError(
                f"{type(self).__name__}: FSDP2 needs out_features={outer_size[0]} divisible by the "
                f"shard world size {world}; leave this layer out of quantize_ (filter_fn) or pad it"
            )
        return fsdp_all_gather_inputs(world, (self.int_data, self.scale))

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if out is not None:  # later steps: FSDP2 refilled the storages `out` already views
            return fsdp_gathered(outputs, metadata, (out.scale,))
        int_data, scale = fsdp_gathered(outputs, metadata)
        # _rebuild keeps the class (and attributes) of a subclass, as every op below does
        return self._rebuild(int_data=int_data, scale=scale, shape=int_data.shape, dtype=param_dtype), (int_data, scale)


# ---- linear ----------------------------------------------------------------------------------
class _Int8QTLinear(torch.autograd.Function):
    """y = x @ dequant(W).T + b; dx = g @ dequant(W); dW = g.T @ x (dense, activation dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Int8QTLinearWeight, bias: Tensor | None):
        from quantframe.kernels.int8_weight_mm import int8_weight_mm

        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return int8_weight_mm(x, weight.int_data, weight.scale, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from quantframe.kernels.int8_weight_mm import int8_weight_mm

        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_weight_mm(grad_out, weight.int_data, weight.scale, transpose=True)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2d.T @ x.reshape(-1, x.shape[-1]).to(g2d.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0)
        return grad_x, grad_w, grad_b


@Int8QTLinearWeight.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, Int8QTLinearWeight):
        raise TypeError(f"F.linear: only the weight may be an Int8QTLinearWeight, got input {type(x).__name__}")
    if w.dim() != 2 or w.scale.numel() != w.shape[0]:
        raise ValueError(f"F.linear: Int8QTLinearWeight must be a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    devices = {t.device for t in (x, w, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"F.linear: input, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"F.linear: input must be floating point, got {x.dtype}")
    return _Int8QTLinear.apply(x, w, bias)


# ---- views and FSDP2 sharding: real views on row boundaries (Int8QTLinearWeight._window) ------
Int8QTLinearWeight.implements(WINDOW_OPS)(window_op)


@Int8QTLinearWeight.implements([aten.cat.default])
def _cat(func, types, args, kwargs):
    tensors, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if dim != 0 or not all(isinstance(t, Int8QTLinearWeight) for t in tensors):
        raise NotImplementedError("Int8QTLinearWeight: cat supports Int8QTLinearWeights along dim 0 only")
    int_data = torch.cat([t.int_data for t in tensors])
    scale = torch.cat([t.scale for t in tensors])
    return tensors[0]._rebuild(int_data=int_data, scale=scale, shape=int_data.shape)


@Int8QTLinearWeight.implements([aten.new_zeros.default])
def _new_zeros(func, types, args, kwargs):
    w, size = args[0], torch.Size(args[1])
    row = w.row_len
    if math.prod(size) % row:
        raise NotImplementedError(f"Int8QTLinearWeight: new_zeros({list(size)}) is not whole rows of {row}")
    int_data = torch.zeros(size, dtype=torch.int8, device=w.device)
    scale = torch.full((math.prod(size) // row,), 1e-12, device=w.device)  # what from_float gives a zero row
    return w._rebuild(int_data=int_data, scale=scale, shape=size, dtype=kwargs.get("dtype") or w.dtype)


# ---- math: out-of-place reads the value, in-place requantizes with SR (see quantframe.tensor) --
Int8QTLinearWeight.implements(DEQUANTIZING_OPS)(dequantizing_op)
Int8QTLinearWeight.implements(REQUANTIZING_INPLACE_OPS)(requantizing_inplace_op)
Int8QTLinearWeight.implements(FOREACH_OPS)(foreach_op)


@Int8QTLinearWeight.implements([aten.copy_.default])
def _copy(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if isinstance(dst, Int8QTLinearWeight) and isinstance(src, Int8QTLinearWeight):
        if dst.shape != src.shape:
            raise ValueError(f"Int8QTLinearWeight.copy_: shape {tuple(src.shape)} != {tuple(dst.shape)}")
        dst.int_data.copy_(src.int_data.view(dst.int_data.shape))
        dst.scale.copy_(src.scale)
    elif isinstance(dst, Int8QTLinearWeight):
        dst.requantize_(src.to(dst.device))  # a float value written into a quantized weight: SR
    else:
        dst.copy_(src.dequantize(dst.dtype))
    return dst


# ---- collectives (DTensor.full_tensor, FSDP2) ------------------------------------------------
@Int8QTLinearWeight.implements([c10d.all_gather_into_tensor.default])
def _all_gather(func, types, args, kwargs):
    # Wait on the inner results here: the wrapper handed back is not an AsyncCollectiveTensor.
    w, rest = args[0], args[1:]
    int_data = c10d.wait_tensor(func(w.int_data.contiguous(), *rest, **kwargs))
    scale = c10d.wait_tensor(func(w.scale, *rest, **kwargs))
    shape = (int_data.shape[0], *w.shape[1:]) if w.dim() else int_data.shape
    return w._rebuild(int_data=int_data.view(shape), scale=scale, shape=shape)


@Int8QTLinearWeight.implements([c10d.wait_tensor.default])
def _wait(func, types, args, kwargs):
    w = args[0]
    return w._rebuild(func)


@Int8QTLinearWeight.implements([c10d._wrap_tensor_autograd.default])
def _wrap_autograd(func, types, args, kwargs):
    return args[0]


# ---- quantize_ handler and safe loading -------------------------------------------------------
@register_quantize_handler(Int8WeightOnlyQuantizedTrainingConfig)
def _quantize_module(module: nn.Module, config: Int8WeightOnlyQuantizedTrainingConfig) -> Tensor:
    return Int8QTLinearWeight.from_float(module.weight)


torch.serialization.add_safe_globals([Int8QTLinearWeight])
