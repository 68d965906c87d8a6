"""BitNet b1.58: ternary weights {-1, 0, +1} x one scale, with INT8 per-token activations.

Two formats:

* :class:`BitNetTrainingLinearWeight` (``bitnet_training()``): quantization-aware training. The
  weight stays a float master copy (``float_data``, updated by the optimizer); every ``F.linear``
  quantizes it on the fly to ternary and the input to INT8, and backpropagates with the
  straight-through estimator (STE).
* :class:`TernaryWeight` (``ternary_weight_only()``, frozen): the inference format. Codes packed
  four per byte (2 bits each) along K, one fp32 scale. ``convert_bitnet_to_ternary_`` turns a
  trained model into it exactly.

Formulas (W [N, K] the float weight, x [M, K] the input, both taken in fp32)::

    weights      s   = max(mean(|W|), 1e-5)                       (absmean, one scalar)
                 Wt  = clamp(round(W / s), -1, 1)                 (int8 codes in {-1, 0, 1})
                 Wq  = Wt * s
    activations  a   = max(max_k |x[m, k]|, 1e-5)                 (absmax per token, [M, 1])
                 xt  = clamp(round(x * (127 / a)), -128, 127)     (int8 codes)
                 sx  = a / 127,  xq = xt * sx
    output       y   = xq @ Wq.T + bias
    STE backward dx  = g @ Wq       (the activation quantizer passes gradients as identity)
                 dW  = g.T @ xq     (dense, to the float master weight)

``round`` is round-half-to-even (``torch.round``). The activation codes multiply by ``127 / a``, as
BitNet b1.58's reference ``activation_quant`` does: one division per token, none per element (the
kernels' cost), every step an IEEE fp32 operation on CPU and GPU alike (tensor / tensor divisions:
CUDA turns a division by a Python scalar into a multiplication by its reciprocal). The reference
computes all of this in fp32
and casts the output to the input's dtype, so a converted model's outputs equal the training
model's forward bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantframe.api import QuantConfig, register_quantize_handler
from quantframe.kernels import is_traced, use_triton
from quantframe.primitives import pack_bits, unpack_bits
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    FOREACH_OPS,
    REQUANTIZING_INPLACE_OPS,
    WINDOW_OPS,
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
    same_layout_copy,
    dequantizing_op,
    window_op,
)

aten = torch.ops.aten

__all__ = [
    "BitNetTrainingConfig",
    "bitnet_training",
    "BitNetTrainingLinearWeight",
    "TernaryWeightOnlyConfig",
    "ternary_weight_only",
    "TernaryWeight",
    "ternary_quantize",
    "quantize_activations_int8",
    "convert_bitnet_to_ternary_",
]

_EPS = 1e-5
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---- the quantizers ---------------------------------------------------------------------------
def _ternary(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, s) of ``w`` without input checks (traceable: no data-dependent branch)."""
    w = w.float()
    s = w.abs().mean().clamp(min=_EPS)
    return torch.round(w / s).clamp(-1, 1).to(torch.int8), s


def ternary_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization of a weight: ``(codes int8 in {-1, 0, 1}, scale fp32 scalar)``.

    ``s = max(mean(|W|), 1e-5)``, ``codes = clamp(round(W / s), -1, 1)``; ``W ~ codes * s``.
    Raises ``TypeError``/``ValueError`` as :func:`~quantframe.tensor.check_weight` (2-D, float,
    finite, non-empty) and ``ValueError`` for an all-zero weight (its absmean is 0).
    """
    check_weight(w, "ternary_quantize")
    if not w.detach().abs().amax() > 0:
        raise ValueError(
            "ternary_quantize: the weight is all zeros (absmean 0), so it has no ternary scale; "
            "initialize the weight (e.g. nn.init.kaiming_uniform_) before quantizing it"
        )
    return _ternary(w.detach())


def quantize_activations_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax INT8 quantization of ``x [M, K]``: ``(codes int8 [M, K], scale fp32 [M, 1])``.

    With ``a = max(max_k |x[m, k]|, 1e-5)``: ``codes = clamp(round(x * (127 / a)), -128, 127)``,
    ``scale = a / 127``; ``x ~ codes * scale``. Raises ``TypeError`` for a non-float input.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"quantize_activations_int8: input must be a float tensor, got {got}")
    x = x.float()
    a = x.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)
    c127 = torch.full_like(a, 127.0)  # tensor / tensor: IEEE division on CUDA too
    return torch.round(x * (c127 / a)).clamp(-128, 127).to(torch.int8), a / c127


def _act(x2d: Tensor) -> Tensor:
    """xq = codes * scale, fp32."""
    codes, scale = quantize_activations_int8(x2d)
    return codes.float() * scale


def _bitlinear(xq: Tensor, wq: Tensor, bias: Tensor | None) -> Tensor:
    """The shared fp32 reference product: both formats call exactly this."""
    return F.linear(xq, wq, None if bias is None else bias.float())


# ---- configs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitNetTrainingConfig(QuantConfig):
    """BitNet b1.58 quantization-aware training: float master weights, ternary x INT8 forward, STE."""


def bitnet_training() -> BitNetTrainingConfig:
    """Config for BitNet b1.58 training of every ``nn.Linear``.

    Example::

        quantize_(model, bitnet_training())
        opt = quantframe.optim.AdamW(model.parameters(), lr=1e-3)
        ...  # train
        convert_bitnet_to_ternary_(model)  # packed 2-bit inference weights, same outputs
    """
    return BitNetTrainingConfig()


@dataclass(frozen=True)
class TernaryWeightOnlyConfig(QuantConfig):
    """Ternary (1.58-bit) packed weights with INT8 per-token activations; an inference format."""

    frozen = True


def ternary_weight_only() -> TernaryWeightOnlyConfig:
    """Config that quantizes every ``nn.Linear`` weight to a packed :class:`TernaryWeight` (frozen)."""
    return TernaryWeightOnlyConfig()


# ---- training weight ----------------------------------------------------------------------------
class BitNetTrainingLinearWeight(QuantTensor):
    """A float master weight whose ``F.linear`` is BitNet's ternary x INT8 product with STE.

    Inner tensor: ``float_data`` (the weight itself). Outer dtype: the gradient's dtype. Math ops
    act on ``float_data`` (in-place updates land in it, out-of-place math returns plain tensors),
    views view it; ``dequantize()`` is the float weight, :meth:`ternary` its quantized value.
    """

    tensor_names = ("float_data",)
    attr_names = ()

    @staticmethod
    def __new__(cls, float_data, *, shape=None, dtype=None, requires_grad=False):
        shape = float_data.shape if shape is None else shape
        return QuantTensor.__new__(cls, float_data, shape=shape, dtype=dtype or float_data.dtype,
                                   requires_grad=requires_grad)  # fmt: skip

    def __init__(self, float_data, *, shape=None, dtype=None, requires_grad=False):
        super().__init__(float_data, shape=shape, dtype=dtype)

    @classmethod
    def from_float(cls, w: Tensor) -> BitNetTrainingLinearWeight:
        """A copy of the float weight ``w [N, K]``; outer dtype = ``w.dtype``.

        Raises as :func:`ternary_quantize` (an all-zero weight included).
        """
        ternary_quantize(w)  # the checks
        return cls(w.detach().clone(), dtype=w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """A copy of the float master weight in ``dtype`` (default: outer dtype)."""
        return self.float_data.to(dtype or self.dtype, copy=True)

    def ternary(self) -> tuple[Tensor, Tensor]:
        """``(codes, scale)`` the forward uses now (see :func:`ternary_quantize`)."""
        return _ternary(self.float_data.detach())

    @torch.no_grad()
    def requantize_(self, value: Tensor) -> BitNetTrainingLinearWeight:
        """Write ``value`` (same shape) into ``float_data``: the optimizer's write-back."""
        if value.shape != self.shape:
            raise ValueError(f"{type(self).__name__}: cannot copy a {tuple(value.shape)} tensor into {tuple(self.shape)}")
        self.float_data.copy_(value)
        return self

    def _window(self, start: int, length: int, shape: torch.Size, op: str) -> BitNetTrainingLinearWeight:
        if not self.float_data.is_contiguous():
            raise NotImplementedError(f"{type(self).__name__}: {op} of a non-contiguous weight is not supported")
        data = self.float_data.view(-1)[start : start + length].view(shape)
        return self._rebuild(float_data=data, shape=data.shape)

    # FSDP2: all-gather the float master weight (cast to the mixed-precision param dtype), so the
    # forward quantizes the whole weight: one absmean scale, the single-process codes.
    fsdp_pre_all_gather = float_master_fsdp_pre_all_gather
    fsdp_post_all_gather = float_master_fsdp_post_all_gather


class _BitNetLinear(torch.autograd.Function):
    """y = xq @ Wq.T + b; backward by the straight-through estimator.

    Where Triton runs (CUDA) the forward is an INT8 tensor-core GEMM: per-token int8 codes of x
    (one Triton pass) times the ternary codes of W, both scales applied in the GEMM's epilogue
    (``int8_scaled_mm``; the integer sum is exact, so this is the reference's product up to fp32
    rounding); the backward runs in x's dtype on the tensor cores (cuBLAS, fp32 accumulation) with
    W and xq dequantized to it, and the int8 codes of x are what is saved for it (1 byte a value,
    not x's 2). Under torch.compile the codes come from torch ops instead of the Triton pass, which
    the partitioner can see through: it keeps only each row's absmax and recomputes the codes in the
    backward from what the block saves anyway. Elsewhere everything is fp32 (the reference math of
    ``TernaryWeight``'s linear).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        codes, s = _ternary(weight.float_data)
        ctx.fast = use_triton(x)
        if ctx.fast:
            from quantframe.kernels.int8_mm import int8_scaled_mm
            from quantframe.kernels.ternary_mm import _quantize_tokens, _quantize_tokens_triton

            # Traced: the torch ops (inductor fuses them into one kernel), which the joint graph's
            # common-subexpression pass merges when two layers quantize the same input (an MLP's gate
            # and up), so one int8 copy is computed and saved instead of two; eager: one Triton launch.
            x8, sx = _quantize_tokens(x2d) if is_traced(x2d) else _quantize_tokens_triton(x2d)
            w_scale = s.reshape(1).expand(codes.shape[0]).contiguous()
            y = int8_scaled_mm(x8, codes, sx.reshape(-1), w_scale, bias, out_dtype=x.dtype)
            ctx.save_for_backward(x8, sx, weight)
        else:
            ctx.save_for_backward(x, weight)
            y = _bitlinear(_act(x2d), codes.float() * s, bias).to(x.dtype)
        return aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_w = grad_b = None
        if ctx.fast:
            x8, sx, weight = ctx.saved_tensors
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.x_dtype)
            if ctx.needs_input_grad[0]:
                codes, s = _ternary(weight.float_data)
                grad_x = (g @ (codes * s).to(g.dtype)).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                grad_w = (g.T @ (x8 * sx).to(g.dtype)).to(weight.dtype)
        else:
            x, weight = ctx.saved_tensors
            g = grad_out.reshape(-1, grad_out.shape[-1]).float()
            if ctx.needs_input_grad[0]:
                codes, s = _ternary(weight.float_data)
                grad_x = (g @ (codes.float() * s)).to(x.dtype).reshape(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = (g.T @ _act(x.reshape(-1, x.shape[-1]))).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def _check_linear(x, w, bias, cls) -> None:
    if isinstance(x, QuantTensor) or not isinstance(x, Tensor) or x.dtype not in _FLOATS:
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')}".strip()
        raise TypeError(f"F.linear: input to a {cls.__name__} must be a plain float32/float16/bfloat16 tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1] if x.dim() else 0} features, weight expects {w.shape[1]}")


@BitNetTrainingLinearWeight.implements([F.linear])
def _bitnet_linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, BitNetTrainingLinearWeight):
        raise TypeError(f"F.linear: only the weight may be a BitNetTrainingLinearWeight, got input {type(x).__name__}")
    _check_linear(x, w, bias, BitNetTrainingLinearWeight)
    return _BitNetLinear.apply(x, w, bias)


# Optimizer math and copies act on the float master weight itself (quantframe.tensor).
BitNetTrainingLinearWeight.implements(DEQUANTIZING_OPS)(float_master_math_op)
BitNetTrainingLinearWeight.implements(REQUANTIZING_INPLACE_OPS + FOREACH_OPS)(float_master_inplace_op)
BitNetTrainingLinearWeight.implements([aten.copy_.default])(float_master_copy_op)
BitNetTrainingLinearWeight.implements(WINDOW_OPS)(window_op)


BitNetTrainingLinearWeight.implements([aten.new_zeros.default])(float_master_new_zeros_op)
# Collectives (DTensor.full_tensor): gather the float data, keep the class.
BitNetTrainingLinearWeight.implements(FLOAT_MASTER_COLLECTIVE_OPS)(float_master_collective_op)


# ---- packed inference weight --------------------------------------------------------------------
class TernaryWeight(QuantTensor):
    """Ternary weight: ``packed`` uint8 ``[N, ceil(K / 4)]`` (codes + 1, 2 bits each, first in the
    lowest bits, K padded with zeros) and ``scale`` fp32 scalar; value = ``codes * scale``.

    ``F.linear`` quantizes the input to INT8 per token and multiplies (fp32 reference), exactly as
    :class:`BitNetTrainingLinearWeight`'s forward. Frozen: no optimizer updates.
    """

    tensor_names = ("packed", "scale")
    attr_names = ()
    window_unit = "row"

    @staticmethod
    def __new__(cls, packed, scale, *, shape, dtype=torch.float32, requires_grad=False):
        return QuantTensor.__new__(cls, packed, scale, shape=shape, dtype=dtype, requires_grad=requires_grad)

    def __init__(self, packed, scale, *, shape, dtype=torch.float32, requires_grad=False):
        super().__init__(packed, scale, shape=shape, dtype=dtype)

    @classmethod
    def _from_codes(cls, codes: Tensor, scale: Tensor, dtype: torch.dtype) -> TernaryWeight:
        n, k = codes.shape
        u = (codes + 1).to(torch.uint8)
        pad = -k % 4
        if pad:
            u = torch.cat([u, u.new_ones(n, pad)], dim=1)  # code 1 = ternary 0
        return cls(pack_bits(u, 2), scale.float().reshape(()), shape=torch.Size((n, k)), dtype=dtype)

    @classmethod
    def from_float(cls, w: Tensor) -> TernaryWeight:
        """Absmean ternary of ``w [N, K]`` (:func:`ternary_quantize`); outer dtype = ``w.dtype``."""
        codes, scale = ternary_quantize(w)
        return cls._from_codes(codes, scale, w.dtype)

    @classmethod
    def from_bitnet(cls, w: BitNetTrainingLinearWeight) -> TernaryWeight:
        """The exact ternary value ``w``'s forward uses now: same codes, same scale."""
        if not isinstance(w, BitNetTrainingLinearWeight):
            raise TypeError(f"TernaryWeight.from_bitnet: expected a BitNetTrainingLinearWeight, got {type(w).__name__}")
        codes, scale = w.ternary()
        return cls._from_codes(codes, scale, w.dtype)

    def codes(self) -> Tensor:
        """int8 codes ``[N, K]`` in {-1, 0, 1}."""
        return unpack_bits(self.packed, 2)[:, : self.shape[1]].to(torch.int8) - 1

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``codes * scale`` (fp32 math) in ``dtype`` (default: outer dtype)."""
        return (self.codes().float() * self.scale).to(dtype or self.dtype)

    def _window(self, start: int, length: int, shape: torch.Size, op: str) -> TernaryWeight:
        k = self.shape[1]
        if start % k or length % k or len(shape) != 2 or shape[1] != k:
            raise NotImplementedError(
                f"TernaryWeight: {op} must select whole rows of {k} elements as [rows, {k}] "
                f"(got elements [{start}, {start + length}) as {list(shape)}); codes are packed along rows"
            )
        packed = self.packed[start // k : (start + length) // k]
        return self._rebuild(packed=packed, shape=torch.Size(shape))


class _TernaryLinear(torch.autograd.Function):
    """y = xq @ Wq.T + b from the packed codes (quantframe.kernels.ternary_mm: Triton on CUDA, the
    fp32 reference elsewhere); dx by STE, no weight gradient (frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None):
        from quantframe.kernels.ternary_mm import ternary_mm  # lazy: keeps `import quantframe` triton-free

        ctx.save_for_backward(packed, scale)
        ctx.k, ctx.x_dtype, ctx.bias_dtype = x.shape[-1], x.dtype, None if bias is None else bias.dtype
        y = ternary_mm(x.reshape(-1, x.shape[-1]), packed, scale, bias)
        return aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        packed, scale = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).float()
        wq = (unpack_bits(packed, 2)[:, : ctx.k].to(torch.int8) - 1).float() * scale  # [N, K], TernaryWeight.dequantize
        grad_x = (g @ wq).to(ctx.x_dtype).reshape(*grad_out.shape[:-1], ctx.k)
        grad_b = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


@TernaryWeight.implements([F.linear])
def _ternary_linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, TernaryWeight):
        raise TypeError(f"F.linear: only the weight may be a TernaryWeight, got input {type(x).__name__}")
    _check_linear(x, w, bias, TernaryWeight)
    return _TernaryLinear.apply(x, w.packed, w.scale, bias)


TernaryWeight.implements([aten.copy_.default])(same_layout_copy("TernaryWeight.from_float"))


TernaryWeight.implements(DEQUANTIZING_OPS)(dequantizing_op)
TernaryWeight.implements(WINDOW_OPS)(window_op)


# ---- conversion, quantize_ handlers, safe loading ----------------------------------------------
@torch.no_grad()
def convert_bitnet_to_ternary_(model: nn.Module) -> nn.Module:
    """Swap every :class:`BitNetTrainingLinearWeight` parameter of ``model`` for a frozen
    :class:`TernaryWeight` holding its exact ternary value (tied weights stay tied). Returns ``model``.

    The converted model's outputs equal the training model's forward exactly (fp32 reference).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_bitnet_to_ternary_ expects an nn.Module, got {type(model).__name__}")
    swapped: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, BitNetTrainingLinearWeight):
                if id(p) not in swapped:
                    swapped[id(p)] = nn.Parameter(TernaryWeight.from_bitnet(p.detach()), requires_grad=False)
                setattr(module, name, swapped[id(p)])
    return model


@register_quantize_handler(BitNetTrainingConfig)
def _quantize_bitnet(module: nn.Module, config: BitNetTrainingConfig) -> Tensor:
    return BitNetTrainingLinearWeight.from_float(module.weight)


@register_quantize_handler(TernaryWeightOnlyConfig)
def _quantize_ternary(module: nn.Module, config: TernaryWeightOnlyConfig) -> Tensor:
    return TernaryWeight.from_float(module.weight)


torch.serialization.add_safe_globals([BitNetTrainingLinearWeight, TernaryWeight])
