"""NF4 (QLoRA 4-bit NormalFloat) weights: ``NF4Tensor`` and ``nf4_weight_only``.

A weight is cut into blocks of ``block_size`` consecutive elements (row-major). Each block keeps
its absmax as a scale and each element the nearest of the 16 NormalFloat4 levels (quantiles of
N(0, 1), scaled to [-1, 1], with an exact 0) of ``x / absmax``; two 4-bit codes share one byte.
The block scales are themselves quantized ("double quantization", QLoRA section 3): subtract
their mean, then int8 with one fp32 scale per ``scaler_block_size`` blocks. With the defaults
(64, 256) a weight costs 4 + 8/64 + 32/16384 ≈ 4.127 bits per element.

NF4 is a *frozen* base (QLoRA): ``F.linear`` is differentiable with respect to its input only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from quantframe.api import QuantConfig, SkipModule, register_quantize_handler
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    WINDOW_OPS,
    QuantTensor,
    fsdp_all_gather_inputs,
    fsdp_gathered,
    fsdp_pre_all_gather_hook,
    check_weight,
    dequantizing_op,
    window_op,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = ["NF4_LEVELS", "NF4Tensor", "NF4WeightOnlyConfig", "nf4_weight_only"]

# The 16 NormalFloat4 levels (QLoRA, appendix E; bitsandbytes' create_normal_map), ascending.
# Code i means NF4_LEVELS[i]; code 7 is the exact zero.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_ZERO_BYTE = 0x77  # two zero codes
_LEVEL_TABLES: dict[torch.device, Tensor] = {}  # NF4_LEVELS as fp32, one tensor per device


def _level_table(device: torch.device) -> Tensor:
    """fp32 ``[16]`` tensor of ``NF4_LEVELS`` on ``device``.

    Eager: made once per device and reused, so a call does no host-to-device copy (which a CUDA
    graph capture forbids). Traced (torch.compile, export, fake or proxy modes): a fresh constant
    (the graph keeps it on the device, made once at compile time), never a cached tensor
    leaking into a trace.
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = _LEVEL_TABLES.get(device)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():  # usable later in any mode
            table = _LEVEL_TABLES[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return table


# ---- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NF4WeightOnlyConfig(QuantConfig):
    """NF4 weights with double-quantized block scales (a frozen base for QLoRA)."""

    block_size: int = 64  # elements per absmax scale; must divide in_features
    scaler_block_size: int = 256  # block scales per fp32 scaler scale (double quantization)
    frozen = True  # quantize_ gives the weight requires_grad=False: a frozen base, adapters train
    def __post_init__(self) -> None:
        _check_block_sizes(self.block_size, self.scaler_block_size, "nf4_weight_only")


def _check_block_sizes(block_size: object, scaler_block_size: object, who: str) -> None:
    for name, v in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{who}: {name}={v!r} must be a positive int")
    if block_size % 2:
        raise ValueError(f"{who}: block_size={block_size} must be even (two 4-bit codes per byte)")


def nf4_weight_only(block_size: int = 64, scaler_block_size: int = 256) -> NF4WeightOnlyConfig:
    """Config for NF4 weight-only quantization (QLoRA). The quantized weights are frozen.

    Example::

        quantize_(model, nf4_weight_only())      # every fitting nn.Linear -> NF4, requires_grad=False
        y = model(x); y.sum().backward()         # gradients reach the inputs (and adapters), not NF4
    """
    return NF4WeightOnlyConfig(block_size, scaler_block_size)


# ---- the tensor ------------------------------------------------------------------------------
def _codes_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 0 or shape[-1] % 2:
        raise NotImplementedError(f"NF4Tensor: the last dim of {list(shape)} must be even (two codes per byte)")
    return (*shape[:-1], shape[-1] // 2)


class NF4Tensor(QuantTensor):
    """NF4 weight, logical ``[N, K]``; element ``e`` of the row-major flat weight is in block ``e // block_size``.

    Inner tensors:

    * ``codes`` uint8 ``[N, K // 2]``: element ``2j`` in the high nibble of byte ``j``, ``2j+1`` in
      the low nibble (torchao's order); a code indexes ``NF4_LEVELS``;
    * ``quantized_scalers`` int8 ``[n_blocks]``; ``scaler_scale`` fp32 ``[n_scaler_blocks]``;
      ``scaler_mean`` fp32 ``[]``: block ``b`` has scale
      ``quantized_scalers[b] * scaler_scale[(b + scaler_offset) // scaler_block_size] + scaler_mean``.

    ``scaler_offset`` (attribute, 0 after ``from_float``) is where block 0 sits inside its scaler
    block: it lets any block-aligned window (a row slice, an FSDP2 shard) be a real view.
    Outer dtype: the activation / gradient dtype.
    """

    tensor_names = ("codes", "quantized_scalers", "scaler_scale", "scaler_mean")
    attr_names = ("block_size", "scaler_block_size", "scaler_offset")

    @classmethod
    def from_float(cls, w: Tensor, block_size: int = 64, scaler_block_size: int = 256) -> NF4Tensor:
        """Quantize a float ``w [N, K]``; outer dtype = ``w.dtype``.

        Raises ``TypeError`` for a non-tensor or non-float ``w``; ``ValueError`` for a non-2-D,
        empty or non-finite ``w``, an odd ``K``, ``K`` not a multiple of ``block_size`` (blocks
        never straddle rows, so row slices and dim-0 FSDP2 shards are block-aligned), or a numel
        that is not a multiple of ``block_size * scaler_block_size``.
        """
        who = f"{cls.__name__}.from_float"
        _check_block_sizes(block_size, scaler_block_size, who)
        check_weight(w, who)
        n, k = w.shape
        if k % 2:
            raise ValueError(f"{who}: in_features={k} must be even (two 4-bit codes per byte)")
        if k % block_size:
            raise ValueError(
                f"{who}: in_features={k} must be a multiple of block_size={block_size} (blocks never straddle rows)"
            )
        if w.numel() % (block_size * scaler_block_size):
            raise ValueError(
                f"{who}: numel={w.numel()} (shape {tuple(w.shape)}) must be a multiple of "
                f"block_size*scaler_block_size={block_size}*{scaler_block_size}={block_size * scaler_block_size}"
            )
        codes, absmax = _quantize_blocks(w.detach().float().reshape(-1, block_size))
        qs, scaler_scale, mean = _double_quantize(absmax, scaler_block_size)
        return cls(codes.view(n, k // 2), qs, scaler_scale, mean, block_size, scaler_block_size, 0,
                   shape=w.shape, dtype=w.dtype)  # fmt: skip

    @property
    def n_blocks(self) -> int:
        return self.quantized_scalers.numel()

    def block_scales(self) -> Tensor:
        """fp32 ``[n_blocks]``: the double-quantized absmax of each block (one Triton launch on CUDA)."""
        from quantframe.kernels.nf4_mm import nf4_block_scales  # lazy: keeps `import quantframe` triton-free

        qs, ss, mean = self.quantized_scalers, self.scaler_scale, self.scaler_mean
        return nf4_block_scales(qs, ss, mean, self.scaler_offset, self.scaler_block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight, ``NF4_LEVELS[code] * block_scale`` (fp32 math), in ``dtype`` (default: outer dtype)."""
        lut = _level_table(self.device)
        c = self.codes.reshape(-1)
        idx = torch.stack([c >> 4, c & 0xF], dim=-1).reshape(-1).long()  # high nibble first
        values = lut[idx].view(self.n_blocks, self.block_size) * self.block_scales()[:, None]
        return values.view(self.shape).to(dtype or self.dtype)

    window_unit = "block"

    def _window(self, start: int, length: int, shape: torch.Size, op: str) -> NF4Tensor:
        """Elements [start, start+length) of the flat weight, viewed as ``shape``: a real view."""
        bs = self.block_size
        if start % bs or length % bs:
            raise NotImplementedError(
                f"NF4Tensor: {op} must select whole blocks of {bs} elements (got elements [{start}, {start + length}) "
                f"of shape {list(self.shape)}); a block shares one scale"
            )
        if not self.codes.is_contiguous():
            raise NotImplementedError(f"NF4Tensor: {op} of a non-contiguous tensor is not supported")
        codes = self.codes.view(-1)[start // 2 : (start + length) // 2].view(_codes_shape(tuple(shape)))
        b0, nb = start // bs, length // bs
        s0 = (b0 + self.scaler_offset) // self.scaler_block_size
        s1 = (b0 + nb - 1 + self.scaler_offset) // self.scaler_block_size + 1 if nb else s0
        offset = (b0 + self.scaler_offset) % self.scaler_block_size if nb else 0
        return self._rebuild(codes=codes, quantized_scalers=self.quantized_scalers[b0 : b0 + nb],
                             scaler_scale=self.scaler_scale[s0:s1], scaler_offset=offset, shape=torch.Size(shape))  # fmt: skip

    @torch.no_grad()
    def requantize_(self, value: Tensor) -> NF4Tensor:
        """Write a float ``value`` of this shape into this tensor (``copy_`` from a float, ``load_state_dict``)."""
        if value.shape != self.shape:
            raise ValueError(f"NF4Tensor: cannot copy a {tuple(value.shape)} tensor into {tuple(self.shape)}")
        if self.scaler_offset or self.n_blocks % self.scaler_block_size:
            raise NotImplementedError("NF4Tensor: copy_ from a float needs a tensor made of whole scaler blocks")
        codes, absmax = _quantize_blocks(value.detach().float().reshape(-1, self.block_size))
        qs, scaler_scale, mean = _double_quantize(absmax, self.scaler_block_size)
        for (_, dst), src in zip(self._inner_tensors(), (codes, qs, scaler_scale, mean)):
            dst.copy_(src.view(dst.shape))
        return self

    # FSDP2 extension: the all-gather moves uint8 codes + int8 scalers + fp32 scaler scales.
    #   fully_shard: weight --split/slice/new_zeros/copy_ (dim 0, whole rows)--> local shard (NF4)
    #   forward:     pre_all_gather -> (codes, quantized_scalers, scaler_scale) --all-gather-->
    #                post_all_gather -> full NF4 weight (scaler_mean: the same on every shard)
    @fsdp_pre_all_gather_hook
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        world = mesh.size()
        rows = outer_size[0] if outer_size is not None else self.shape[0] * world
        per_shard = rows // world * math.prod(self.shape[1:])
        unit = self.block_size * self.scaler_block_size
        if rows % world or per_shard % unit or self.scaler_offset:
            raise ValueError(
                f"NF4Tensor: FSDP2 needs each of the {world} shards of the {rows}-row weight to hold whole scaler "
                f"blocks: rows={rows} divisible by {world} and rows/world*in_features={per_shard} a multiple of "
                f"block_size*scaler_block_size={unit}; "
                "leave this layer out of quantize_ (filter_fn) or change the sizes"
            )
        return fsdp_all_gather_inputs(world, (self.codes, self.quantized_scalers, self.scaler_scale))

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if out is not None:  # later steps: FSDP2 refilled the storages `out` already views
            return fsdp_gathered(outputs, metadata, (out.quantized_scalers, out.scaler_scale))
        codes, qs, scaler_scale = fsdp_gathered(outputs, metadata)
        shape = (codes.shape[0], codes.shape[1] * 2)
        full = self._rebuild(
            codes=codes, quantized_scalers=qs, scaler_scale=scaler_scale, shape=shape, dtype=param_dtype
        )
        return full, (codes, qs, scaler_scale)


def _quantize_blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``x [n_blocks, block_size]`` -> packed uint8 codes ``[numel // 2]``, fp32 absmax ``[n_blocks]``."""
    absmax = x.abs().amax(dim=1)
    normalized = x / torch.where(absmax > 0, absmax, 1.0)[:, None]  # an all-zero block stays 0
    lut = _level_table(x.device)
    # nearest level = number of midpoints below (bucketize on the 15 midpoints; no [numel, 16] buffer)
    codes = torch.bucketize(normalized.reshape(-1), (lut[1:] + lut[:-1]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def _double_quantize(absmax: Tensor, scaler_block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Block absmax ``[n_blocks]`` -> int8 ``[n_blocks]``, fp32 scale ``[n_blocks // sbs]``, fp32 mean ``[]``."""
    mean = absmax.mean()
    centered = (absmax - mean).view(-1, scaler_block_size)
    scale = centered.abs().amax(dim=1) / 128  # torchao: factor 256 / (2 absmax); +absmax clamps to 127
    q = torch.round(centered / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-128, 127)
    return q.to(torch.int8).view(-1), scale, mean


# ---- linear: differentiable with respect to the input only (frozen base) ---------------------
class _LinearNF4(torch.autograd.Function):
    """y = x @ dequant(W).T + b; dx = g @ dequant(W); no gradient for W (frozen base).

    CUDA: the Triton NF4 GEMV/GEMM (dequantized in registers) and, for dx, W dequantized once to
    the gradient's dtype + one matmul. Elsewhere fp32 math, one rounding to the activation dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: NF4Tensor, bias: Tensor | None):
        from quantframe.kernels.nf4_mm import nf4_mm_double_quant  # lazy: keeps `import quantframe` triton-free

        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        w = weight  # codes [N, K // 2]; the block scales as their double quantization
        return nf4_mm_double_quant(
            x, w.codes, w.quantized_scalers, w.scaler_scale, w.scaler_mean, w.scaler_offset, w.scaler_block_size,
            _level_table(w.device), w.block_size, bias,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from quantframe.kernels.nf4_mm import nf4_mm_grad_input

        (w,) = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_mm_grad_input(grad_out, w.codes, w.block_scales(), _level_table(w.device), w.block_size)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b


@NF4Tensor.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"F.linear: only the weight may be an NF4Tensor, got input {type(x).__name__}")
    if w.dim() != 2:
        raise ValueError(f"F.linear: NF4Tensor must be a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    if w.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "F.linear: an NF4Tensor weight is a frozen base and gets no gradient, but it has requires_grad=True; "
            "call weight.requires_grad_(False) (quantize_ with nf4_weight_only does) and train adapters instead"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"F.linear: input must be floating point, got {x.dtype}")
    return _LinearNF4.apply(x, w, bias)


# ---- views and FSDP2 sharding: real views on block boundaries --------------------------------
NF4Tensor.implements(WINDOW_OPS)(window_op)  # view/as_strided/slice/split through NF4Tensor._window


@NF4Tensor.implements([aten.new_zeros.default])
def _new_zeros(func, types, args, kwargs):
    w, size = args[0], torch.Size(args[1])
    numel = math.prod(size)
    if numel % w.block_size:
        raise NotImplementedError(f"NF4Tensor: new_zeros({list(size)}) is not whole blocks of {w.block_size}")
    n_blocks = numel // w.block_size
    codes = torch.full(_codes_shape(tuple(size)), _ZERO_BYTE, dtype=torch.uint8, device=w.device)  # code 7 = 0.0
    return w._rebuild(
        codes=codes,
        quantized_scalers=torch.zeros(n_blocks, dtype=torch.int8, device=w.device),
        scaler_scale=torch.zeros(-(-n_blocks // w.scaler_block_size), device=w.device),
        scaler_mean=torch.zeros((), device=w.device),
        scaler_offset=0,
        shape=size,
        dtype=kwargs.get("dtype") or w.dtype,
    )


@NF4Tensor.implements([aten.copy_.default])
def _copy(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if isinstance(dst, NF4Tensor) and isinstance(src, NF4Tensor):
        layout = ("block_size", "scaler_block_size", "scaler_offset")
        if dst.shape != src.shape or any(getattr(dst, a) != getattr(src, a) for a in layout) or (
            dst.scaler_scale.shape != src.scaler_scale.shape
        ):
            raise ValueError(
                f"NF4Tensor.copy_: the block layouts differ, {tuple(src.shape)} with {layout}="
                f"{[getattr(src, a) for a in layout]} into {tuple(dst.shape)} with "
                f"{[getattr(dst, a) for a in layout]}; "
                "under FSDP2 this means a shard does not hold whole scaler blocks (rows/world*in_features must be "
                "a multiple of block_size*scaler_block_size)"
            )
        for (_, d), (_, s) in zip(dst._inner_tensors(), src._inner_tensors()):
            d.copy_(s.view(d.shape))
    elif isinstance(dst, NF4Tensor):
        dst.requantize_(src.to(dst.device))  # a float value written into NF4: re-quantized
    else:
        dst.copy_(src.dequantize(dst.dtype))
    return dst


NF4Tensor.implements(DEQUANTIZING_OPS)(dequantizing_op)


# ---- collectives (DTensor.full_tensor, FSDP2) ------------------------------------------------
@NF4Tensor.implements([c10d.all_gather_into_tensor.default])
def _all_gather(func, types, args, kwargs):
    # Wait on the inner results here: the wrapper handed back is not an AsyncCollectiveTensor.
    w, rest = args[0], args[1:]
    if w.scaler_offset or w.n_blocks % w.scaler_block_size:
        raise NotImplementedError(
            f"NF4Tensor: all_gather needs whole scaler blocks per rank, got shape {list(w.shape)}"
        )
    codes = c10d.wait_tensor(func(w.codes.contiguous(), *rest, **kwargs))
    qs = c10d.wait_tensor(func(w.quantized_scalers, *rest, **kwargs))
    scaler_scale = c10d.wait_tensor(func(w.scaler_scale, *rest, **kwargs))
    shape = (codes.shape[0], *w.shape[1:])
    codes = codes.view(_codes_shape(shape))
    return w._rebuild(codes=codes, quantized_scalers=qs, scaler_scale=scaler_scale, shape=shape)


@NF4Tensor.implements([c10d.wait_tensor.default])
def _wait(func, types, args, kwargs):
    return args[0]._rebuild(func)


@NF4Tensor.implements([c10d._wrap_tensor_autograd.default])
def _wrap_autograd(func, types, args, kwargs):
    return args[0]


# ---- quantize_ handler and safe loading -------------------------------------------------------
@register_quantize_handler(NF4WeightOnlyConfig)
def _quantize_module(module: nn.Module, config: NF4WeightOnlyConfig) -> Tensor:
    w = module.weight
    if w.dim() != 2 or w.shape[1] % config.block_size or w.numel() % (config.block_size * config.scaler_block_size):
        raise SkipModule(
            f"nf4_weight_only: weight {tuple(w.shape)} needs in_features divisible by block_size={config.block_size} "
            f"and numel divisible by block_size*scaler_block_size={config.block_size * config.scaler_block_size}"
        )
    return NF4Tensor.from_float(w, config.block_size, config.scaler_block_size)


torch.serialization.add_safe_globals([NF4Tensor])
