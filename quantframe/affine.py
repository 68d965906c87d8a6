"""Affine (integer grid + scale + zero point) inference weights: ``AffineQuantizedTensor`` and its configs.

One class covers every layout; its attributes say which:

* ``bits`` 8, 4, 3 or 2. 8-bit codes are stored as they are (int8 when symmetric, uint8 when
  not); fewer bits are stored as unsigned codes packed along K by
  :func:`quantframe.primitives.pack_bits` (4-bit: two per byte, first in the low nibble).
* ``group_size`` None (one scale per output row) or 32/64/128/256 (one scale per group of
  that many consecutive elements of a row).
* ``symmetric``: the grid is ``[-qmax, qmax]`` around 0 (scale = absmax / qmax), else
  ``[0, 2**bits - 1]`` spanning ``[min, max]`` with an integer zero point.
* ``act_quant`` (W8A8): ``F.linear`` also quantizes the activation per token to int8 and runs an
  INT8 x INT8 -> INT32 GEMM; the weight is then 8-bit, symmetric, per row.

Value of element ``(n, k)``: ``(code[n, k] - zero_point[n, g]) * scale[n, g]`` with ``g = k //
group_size``. ``zero_point`` is always stored (one layout for flatten, FSDP and kernels): 0 for
symmetric int8, ``2**(bits-1)`` for symmetric packed codes (the offset that made them unsigned).

Inference only: ``F.linear`` propagates gradients to the input (weight-only configs) but never
to the weight. Weight-only layers run :func:`quantframe.kernels.affine_mm.affine_mm`: on CUDA its
Triton kernels (8, 4, 3 and 2 bits, group sizes that are powers of two >= 16: a GEMV up to 16 rows
of input reading the packed codes and dequantizing in registers, a one-pass dequantization + the
dense matmul above); elsewhere the pure-PyTorch path (dequantize, fp32 matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe import primitives as P
from quantframe.api import QuantConfig, SkipModule, register_quantize_handler
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    QuantTensor,
    check_weight,
    dequantizing_op,
    row_slice_op,
    same_layout_copy,
    same_shape_view_op,
)

aten = torch.ops.aten

__all__ = [
    "AffineQuantizedTensor",
    "Int8WeightOnlyConfig",
    "Int4WeightOnlyConfig",
    "IntxWeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "int8_weight_only",
    "int4_weight_only",
    "intx_weight_only",
    "int8_dynamic_activation_int8_weight",
]

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256)
_CODES_PER_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}  # K must be a multiple of this to pack a row


def _check_params(bits: int, group_size: int | None, symmetric: bool, act_quant: bool, who: str) -> None:
    if bits not in BITS:
        raise ValueError(f"{who}: bits={bits!r} is not supported; expected one of {BITS}")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"{who}: group_size={group_size!r} must be None (per row) or one of {GROUP_SIZES}")
    if act_quant and (bits != 8 or not symmetric or group_size is not None):
        raise ValueError(
            f"{who}: dynamic int8 activations need an 8-bit symmetric per-row weight, "
            f"got bits={bits}, symmetric={symmetric}, group_size={group_size}"
        )


def _shape_problem(k: int, bits: int, group_size: int | None) -> str | None:
    """Why a weight with ``in_features=k`` cannot take this layout (None when it can)."""
    if group_size is not None and k % group_size:
        return f"group_size={group_size} must divide in_features={k}"
    if k % _CODES_PER_UNIT[bits]:
        return f"{bits}-bit packing needs in_features={k} to be a multiple of {_CODES_PER_UNIT[bits]}"
    return None


# ---- configs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AffineConfig(QuantConfig):
    frozen = True  # inference formats: quantize_ gives the weight requires_grad=False

    def params(self) -> dict:
        raise NotImplementedError

    def __post_init__(self) -> None:
        _check_params(**self.params(), who=type(self).__name__)


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_AffineConfig):
    """Symmetric int8 weights, one fp32 scale per row (or per group); float activations."""

    group_size: int | None = None

    def params(self) -> dict:
        return {"bits": 8, "group_size": self.group_size, "symmetric": True, "act_quant": False}


@dataclass(frozen=True)
class Int4WeightOnlyConfig(_AffineConfig):
    """4-bit weights packed two per byte, per-group scales; asymmetric (uint4 + zero point) by default."""

    group_size: int | None = 128
    symmetric: bool = False

    def params(self) -> dict:
        return {"bits": 4, "group_size": self.group_size, "symmetric": self.symmetric, "act_quant": False}


@dataclass(frozen=True)
class IntxWeightOnlyConfig(_AffineConfig):
    """``bits``-bit (2, 3, 4 or 8) weights, packed, per-group scales."""

    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = False

    def params(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "act_quant": False}


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(_AffineConfig):
    """W8A8: per-row symmetric int8 weights, per-token symmetric int8 activations quantized at run time."""

    def params(self) -> dict:
        return {"bits": 8, "group_size": None, "symmetric": True, "act_quant": True}


def int8_weight_only(group_size: int | None = None) -> Int8WeightOnlyConfig:
    """Int8 weight-only (torchao's default: symmetric, per output row).

    Example::

        quantize_(model, int8_weight_only())
        y = model(x)  # x stays float; the weight is int8 + fp32 row scales
    """
    return Int8WeightOnlyConfig(group_size)


def int4_weight_only(group_size: int | None = 128, symmetric: bool = False) -> Int4WeightOnlyConfig:
    """Int4 weight-only, two codes per byte. Defaults follow torchao: groups of 128, asymmetric.

    torchao's tinygemm layout keeps a *float* zero point; here it is an integer code (the grid
    contains 0.0 exactly), so the numerics are close to, not bit-equal with, torchao's.

    Example::

        quantize_(model, int4_weight_only(group_size=64))
        print(summary(model))
    """
    return Int4WeightOnlyConfig(group_size, symmetric)


def intx_weight_only(bits: int, group_size: int | None = 32, symmetric: bool = False) -> IntxWeightOnlyConfig:
    """``bits``-bit weight-only (2, 3, 4 or 8), packed along K, per-group scales (default 32).

    Example::

        quantize_(model, intx_weight_only(bits=3, group_size=32))
        y = model(x)
    """
    return IntxWeightOnlyConfig(bits, group_size, symmetric)


def int8_dynamic_activation_int8_weight() -> Int8DynamicActivationInt8WeightConfig:
    """W8A8 (torchao's default: symmetric per-token activations, symmetric per-row weights).

    Example::

        quantize_(model, int8_dynamic_activation_int8_weight())
        y = model(x)  # x quantized per token at run time; INT8 GEMM with an fp32 epilogue
    """
    return Int8DynamicActivationInt8WeightConfig()


# ---- the tensor --------------------------------------------------------------------------------
class AffineQuantizedTensor(QuantTensor):
    """Logical ``[N, K]`` weight on an affine integer grid.

    Inner tensors:
        ``qdata``: ``[N, K]`` int8 (8-bit symmetric) or uint8 (8-bit asymmetric), or uint8
        ``[N, K * bits // 8]`` packed codes (fewer bits; layout in ``primitives.pack_bits``).
        ``scale``: fp32 ``[N, G]``; ``zero_point``: int32 ``[N, G]`` (G = 1 per row, else K // group_size).
    Attributes: ``bits``, ``group_size`` (None: per row), ``symmetric``, ``act_quant`` (W8A8).
    Outer dtype: the activation / gradient dtype.
    """

    tensor_names = ("qdata", "scale", "zero_point")
    attr_names = ("bits", "group_size", "symmetric", "act_quant")

    @classmethod
    def from_float(
        cls, w: Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True, act_quant: bool = False
    ) -> AffineQuantizedTensor:
        """Round-to-nearest quantization of a float ``w [N, K]``; outer dtype = ``w.dtype``.

        Raises ``TypeError`` for a non-float weight, ``ValueError`` for a weight that is not a
        finite 2-D tensor, unsupported ``bits``/``group_size``, or a ``group_size`` (or packing
        unit) that does not divide ``K``.
        """
        who = f"{cls.__name__}.from_float"
        _check_params(bits, group_size, symmetric, act_quant, who)
        check_weight(w, who)
        problem = _shape_problem(w.shape[1], bits, group_size)
        if problem:
            raise ValueError(f"{who}: {problem} (weight shape {tuple(w.shape)})")
        granularity = "row" if group_size is None else group_size
        scale, zero_point = P.choose_qparams(w.detach(), bits, granularity, symmetric)
        codes = P.quantize(w.detach(), scale, zero_point, bits)
        if symmetric:
            offset = 0 if bits == 8 else 2 ** (bits - 1)  # packed codes are unsigned
            zero_point = torch.full_like(scale, offset, dtype=torch.int32)
            codes = codes if bits == 8 else (codes.to(torch.int32) + offset).to(torch.uint8)
        qdata = codes if bits == 8 else P.pack_bits(codes, bits)
        return cls(qdata, scale, zero_point, bits, group_size, symmetric, act_quant, shape=w.shape, dtype=w.dtype)

    def codes(self) -> Tensor:
        """The unpacked integer codes ``[N, K]`` (int8 or uint8)."""
        return self.qdata if self.bits == 8 else P.unpack_bits(self.qdata, self.bits)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(codes - zero_point) * scale`` per group in fp32, cast to ``dtype`` (default: outer dtype)."""
        return P.dequantize(self.codes(), self.scale, self.zero_point, dtype or self.dtype)


# ---- linear --------------------------------------------------------------------------------------
def _check_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> None:
    if not isinstance(w, AffineQuantizedTensor) or isinstance(x, AffineQuantizedTensor):
        raise TypeError(f"F.linear: only the weight may be an AffineQuantizedTensor, got input {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"F.linear: input must be floating point, got {x.dtype}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")


def _w8a8_linear(x: Tensor, w: AffineQuantizedTensor, bias: Tensor | None) -> Tensor:
    # Lazy: `import quantframe` must not import triton. Module attributes (not names) so tests can spy.
    from quantframe.kernels import int8_mm, int8_rowwise

    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_scale = int8_rowwise.quantize_rowwise_int8(x2d)  # per token, symmetric, absmax / 127
    y = int8_mm.int8_scaled_mm(x_q, w.qdata, x_scale, w.scale.reshape(-1), bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


@AffineQuantizedTensor.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    _check_linear(x, w, bias)
    if w.act_quant:
        return _w8a8_linear(x, w, bias)
    # Lazy: `import quantframe` must not import triton. Triton on CUDA, the reference elsewhere.
    from quantframe.kernels import affine_mm

    return affine_mm.affine_mm(x, w.qdata, w.scale, w.zero_point, w.bits, w.group_size, bias)


# ---- views and copies --------------------------------------------------------------------------
AffineQuantizedTensor.implements([aten.slice.Tensor])(row_slice_op)
AffineQuantizedTensor.implements([aten.view.default, aten._unsafe_view.default])(same_shape_view_op)
AffineQuantizedTensor.implements([aten.copy_.default])(same_layout_copy("AffineQuantizedTensor.from_float"))
AffineQuantizedTensor.implements(DEQUANTIZING_OPS)(dequantizing_op)


# ---- quantize_ handler and safe loading -------------------------------------------------------
@register_quantize_handler(Int8WeightOnlyConfig)
@register_quantize_handler(Int4WeightOnlyConfig)
@register_quantize_handler(IntxWeightOnlyConfig)
@register_quantize_handler(Int8DynamicActivationInt8WeightConfig)
def _quantize_module(module: nn.Module, config: _AffineConfig) -> Tensor:
    params = config.params()
    problem = _shape_problem(module.weight.shape[-1], params["bits"], params["group_size"])
    if module.weight.dim() == 2 and problem:
        raise SkipModule(f"weight {tuple(module.weight.shape)}: {problem}")
    return AffineQuantizedTensor.from_float(module.weight, **params)


torch.serialization.add_safe_globals([AffineQuantizedTensor])
