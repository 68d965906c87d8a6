"""8-bit optimizer states: ``OptimState8bit``, blockwise quantized with a dynamic code map.

Adam's moments span many orders of magnitude inside one tensor, so a linear int8 grid (step =
absmax / 127) rounds most of them to zero. Like bitsandbytes, a state here is cut into blocks of
256 consecutive elements (flat order); each block is divided by its absmax and every value is
stored as the index (uint8) of the nearest of 256 *dynamic* codes: a few per decade for tiny values,
many near 1 (see :func:`create_dynamic_map`). The optimizer does its math in fp32 and writes the
state back once per step; ``quantframe.kernels.adamw_step`` reads and writes the codes directly.

Memory: 1 byte of code + 4 / 256 bytes of block scale per element; the 1 KB code map is shared by
every state of one signedness on one device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import return_and_correct_aliasing

from quantframe.tensor import (
    DEQUANTIZING_OPS,
    REQUANTIZING_INPLACE_OPS,
    QuantTensor,
    dequantizing_op,
    requantizing_inplace_op,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

__all__ = ["BLOCK_SIZE", "OptimState8bit", "create_dynamic_map", "dequantize_8bit", "quantize_8bit"]

BLOCK_SIZE = 256  # elements per block scale; the fused AdamW kernel relies on this value
_EPS = 1e-12  # scale of an all-zero block: its codes are those of 0 and dequantize to exactly 0


# ---- the code map and the numerics ------------------------------------------------------------
def create_dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted fp32 codes of bitsandbytes' dynamic 8-bit map (Dettmers et al., 2022).

    Magnitudes come in 7 decades, ``[0.1, 1) * 10**(d - 6)`` for ``d = 0..6``: decade ``d`` is cut
    into ``2**d`` equal pieces (``2**(d + 1)`` unsigned, which needs no sign) and each piece
    contributes its midpoint, so the grid is dense near 1 and still reaches ``~1e-7``; plus ``0``
    and ``1``. Signed: the same magnitudes with both signs (254) + 0 + 1 = 256 in bitsandbytes,
    whose most negative code is then -0.993; here -1 takes the slot of the smallest positive code
    (5.5e-7), so a block's absmax element round-trips exactly whatever its sign.

    Returns:
        float32 ``[256]``, strictly increasing; ``[-1, 1]`` if ``signed`` else ``[0, 1]``.
    """
    values = [0.0, 1.0]
    for d in range(7):
        pieces = 2**d if signed else 2 ** (d + 1)
        edges = torch.linspace(0.1, 1.0, pieces + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (d - 6)).tolist()
        values += mids + ([-m for m in mids] if signed else [])
    if signed:
        values.remove(min(v for v in values if v > 0))
        values.append(-1.0)
    return torch.tensor(sorted(values), dtype=torch.float32)


_QMAPS: dict[tuple[bool, torch.device], Tensor] = {}


def _shared_qmap(signed: bool, device: torch.device) -> Tensor:
    """One map per (signedness, device), shared by every state: never written in place."""
    key = (signed, torch.device(device))
    if key not in _QMAPS:
        _QMAPS[key] = create_dynamic_map(signed).to(device)
    return _QMAPS[key]


def quantize_8bit(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit codes of ``x``: ``(codes uint8 [x.shape], scale fp32 [ceil(numel / 256)])``.

    Each block of 256 consecutive elements (flat order; the last one may be shorter) is divided by
    its absmax (at least 1e-12), then each value takes the index of the nearest code in ``qmap``
    (a tie goes to the lower code): ``torch.bucketize`` on the 255 midpoints is a binary search.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % BLOCK_SIZE)).view(-1, BLOCK_SIZE)  # zero padding: absmax unchanged
    scale = blocks.abs().amax(dim=1).clamp_min(_EPS)
    codes = torch.bucketize(blocks / scale[:, None], (qmap[1:] + qmap[:-1]) / 2)
    return codes.to(torch.uint8).view(-1)[:n].view(x.shape), scale


def dequantize_8bit(codes: Tensor, scale: Tensor, qmap: Tensor) -> Tensor:
    """``qmap[codes] * scale`` of each code's block, fp32, in the shape of ``codes``."""
    n = codes.numel()
    per_element = scale.repeat_interleave(BLOCK_SIZE)[:n]
    return (qmap[codes.reshape(-1).long()] * per_element).view(codes.shape)


# ---- the tensor ---------------------------------------------------------------------------------
class OptimState8bit(QuantTensor):
    """An optimizer state (e.g. AdamW's ``exp_avg``) stored in 8 bits.

    Inner tensors: ``codes`` uint8 (the state's shape), ``scale`` fp32 ``[ceil(numel / 256)]`` (block
    absmax) and ``qmap`` fp32 ``[256]`` (:func:`create_dynamic_map`, signed or not). Outer dtype:
    fp32 by default, the dtype of the math. In-place math (``lerp_``, ``mul_``, ``addcmul_``...)
    dequantizes, applies the op in fp32 and quantizes again; an optimizer that updates a state
    with several ops should do them on ``dequantize()`` and ``copy_`` the result back once.

    Example::

        m = OptimState8bit.zeros(p.shape, signed=True)
        m.copy_(0.9 * m.dequantize() + 0.1 * grad)
    """

    tensor_names = ("codes", "scale", "qmap")
    attr_names = ("signed",)

    @staticmethod
    def __new__(cls, codes, scale, qmap, signed, *, shape=None, dtype=torch.float32, requires_grad=False):
        shape = codes.shape if shape is None else shape
        return QuantTensor.__new__(cls, codes, scale, qmap, signed, shape=shape, dtype=dtype)

    def __init__(self, codes, scale, qmap, signed, *, shape=None, dtype=torch.float32, requires_grad=False):
        # Metadata checks only: this runs on every rebuild, under torch.compile's fake tensors too.
        if codes.dtype != torch.uint8 or scale.dtype != torch.float32 or qmap.dtype != torch.float32:
            raise TypeError(
                f"OptimState8bit: codes must be uint8 and scale/qmap float32, got {codes.dtype}, "
                f"{scale.dtype}, {qmap.dtype}"
            )
        if scale.shape != (math.ceil(codes.numel() / BLOCK_SIZE),) or qmap.shape != (256,):
            raise ValueError(
                f"OptimState8bit: {codes.numel()} codes need scale [{math.ceil(codes.numel() / BLOCK_SIZE)}] "
                f"and qmap [256], got {list(scale.shape)} and {list(qmap.shape)}"
            )
        super().__init__(codes, scale, qmap, signed, shape=shape if shape is not None else codes.shape, dtype=dtype)

    @classmethod
    def from_float(cls, x: Tensor, signed: bool = True) -> OptimState8bit:
        """Quantize a float tensor (any shape); ``signed=False`` for non-negative states (``exp_avg_sq``)."""
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"OptimState8bit.from_float: expected a float tensor, got {getattr(x, 'dtype', type(x))}")
        qmap = _shared_qmap(signed, x.device)
        codes, scale = quantize_8bit(x, qmap)
        return cls(codes, scale, qmap, signed)

    @classmethod
    def zeros(cls, shape: tuple[int, ...] | torch.Size, signed: bool = True, device=None) -> OptimState8bit:
        """An all-zero state of ``shape`` (what an optimizer starts from)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        return cls.from_float(torch.zeros(shape, device=device), signed)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_8bit(self.codes, self.scale, self.qmap).to(dtype or self.dtype)

    def requantize_(self, value: Tensor) -> OptimState8bit:
        """Quantize a float ``value`` of this shape into this state, in place (keeps its map)."""
        _assign(self, value)
        return self


# ---- views: the codes keep their flat order, so blocks survive any reshape ----------------------
@OptimState8bit.implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, types, args, kwargs):
    s = args[0]
    out = OptimState8bit(s.codes.view(args[1]), s.scale, s.qmap, s.signed, dtype=s.dtype)
    return return_and_correct_aliasing(func, args, kwargs, out)


@OptimState8bit.implements([aten.slice.Tensor])
def _slice(func, types, args, kwargs):
    """Rows ``[start, end)`` along dim 0 as a view; they must begin on a block boundary and end on
    one or at the end. (dcp.load reads a saved shard back through such slices.)"""
    s, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start") or 0
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    if dim != 0 or step != 1:
        raise NotImplementedError(f"OptimState8bit: slice supports dim 0 with step 1, got dim={dim}, step={step}")
    rows = s.shape[0]
    start, end = max(0, min(start, rows)), max(0, min(rows if end is None else end, rows))
    end, inner = max(start, end), s.numel() // rows if rows else 0
    first, last = start * inner, end * inner
    if first % BLOCK_SIZE or (last % BLOCK_SIZE and last != s.numel()):
        raise NotImplementedError(
            f"OptimState8bit: slice [{start}:{end}] of shape {list(s.shape)} covers elements [{first}, {last}), "
            f"not whole blocks of {BLOCK_SIZE}; block scales cannot be split"
        )
    codes = s.codes[start:end]
    scale = s.scale[first // BLOCK_SIZE : math.ceil(last / BLOCK_SIZE)]
    out = OptimState8bit(codes, scale, s.qmap, s.signed, dtype=s.dtype)
    return return_and_correct_aliasing(func, args, kwargs, out)


# ---- writing: copy_ and in-place math re-quantize ----------------------------------------------
def _assign(dst: OptimState8bit, value: Tensor) -> None:
    """Quantize a float ``value`` into ``dst`` in place (keeps dst's map)."""
    if value.shape != dst.shape:
        raise ValueError(f"OptimState8bit: cannot write a {tuple(value.shape)} tensor into {tuple(dst.shape)}")
    codes, scale = quantize_8bit(value.to(dst.device), dst.qmap)
    dst.codes.copy_(codes)
    dst.scale.copy_(scale)


@OptimState8bit.implements([aten.copy_.default])
def _copy(func, types, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, OptimState8bit):  # a plain tensor receiving a state: its value
        return dst.copy_(src.dequantize(dst.dtype))
    if isinstance(src, OptimState8bit) and src.shape == dst.shape and torch.equal(src.qmap, dst.qmap.to(src.device)):
        dst.codes.copy_(src.codes)  # same map, same blocks: the codes are the value
        dst.scale.copy_(src.scale)
    else:
        _assign(dst, src.dequantize(torch.float32) if isinstance(src, OptimState8bit) else src)
    return dst


# The in-place math of torch's Adam/AdamW on their moments (lerp_, mul_, addcmul_...): fp32 on the
# dequantized state, one re-quantization per op; with a plain tensor written to and a state as an
# operand (`param.addcdiv_(exp_avg, denom)`), the state is read as its value. Reading a state for
# out-of-place math (`exp_avg_sq.sqrt()`) gives a plain fp32 tensor.
OptimState8bit.implements(REQUANTIZING_INPLACE_OPS)(requantizing_inplace_op)
OptimState8bit.implements(DEQUANTIZING_OPS)(dequantizing_op)


# ---- collectives (DTensor.full_tensor) -----------------------------------------------------------
@OptimState8bit.implements([c10d.all_gather_into_tensor.default])
def _all_gather(func, types, args, kwargs):
    s, rest = args[0], args[1:]
    if s.numel() % BLOCK_SIZE:
        raise NotImplementedError(
            f"OptimState8bit: all-gather needs shards of whole blocks of {BLOCK_SIZE} elements, "
            f"got a shard of {s.numel()}"
        )
    # Wait on the inner results here: the wrapper handed back is not an AsyncCollectiveTensor.
    codes = c10d.wait_tensor(func(s.codes.contiguous(), *rest, **kwargs))
    scale = c10d.wait_tensor(func(s.scale, *rest, **kwargs))
    shape = (codes.shape[0], *s.shape[1:]) if s.dim() else codes.shape
    return OptimState8bit(codes.view(shape), scale, s.qmap, s.signed, dtype=s.dtype)


@OptimState8bit.implements([c10d.wait_tensor.default])
def _wait(func, types, args, kwargs):
    s = args[0]
    return OptimState8bit(func(s.codes), func(s.scale), s.qmap, s.signed, shape=s.shape, dtype=s.dtype)


@OptimState8bit.implements([c10d._wrap_tensor_autograd.default])
def _wrap_autograd(func, types, args, kwargs):
    return args[0]


torch.serialization.add_safe_globals([OptimState8bit])
