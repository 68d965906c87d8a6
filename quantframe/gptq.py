"""GPTQ packed weights (AutoGPTQ / GPTQ-for-LLaMa "v1" checkpoints): ``GPTQLinearWeight``.

GPTQ needs calibration data, so there is no ``quantize_`` config: a checkpoint's tensors are
imported with :func:`from_gptq` or swapped into an ``nn.Linear`` with :func:`load_gptq_linear_`.
:func:`to_gptq` is a round-to-nearest packer producing the same layout (tests, toy checkpoints).

The format, for a linear layer with ``N`` = out_features, ``K`` = in_features, ``bits`` in
{2, 3, 4, 8}, ``G`` groups:

* ``qweight`` int32 ``[K * bits // 32, N]``: the codes of column ``n`` (values ``0 .. 2**bits - 1``)
  form a bit stream along K, code ``k`` at stream bits ``bits*k .. bits*k + bits - 1``; stream bit
  ``b`` is bit ``b % 32`` (LSB = 0) of word ``b // 32``. For 2/4/8 bits that is ``32 // bits``
  K-consecutive codes per int32, low bits first; for 3 bits, 32 codes fill 3 words and codes 10
  and 21 straddle two words (GPTQ-for-LLaMa's layout). Requires ``K * bits % 32 == 0``.
* ``qzeros`` int32 ``[G, N * bits // 32]``: zero points packed the same way, along N.
  ``format="v1"`` (AutoGPTQ, GPTQ-for-LLaMa; the default) stores ``(zero - 1) mod 2**bits``, the
  historical off-by-one: the true zero is ``(stored + 1) mod 2**bits``. ``format="v2"`` (GPTQModel)
  stores the zero itself.
* ``scales`` float16 ``[G, N]``.
* ``g_idx`` int32 ``[K]``: the group of each input column. Without act-order it is
  ``k // group_size``; with act-order (``desc_act``) it is a permutation of that, unsorted.
  ``None`` means the former; ``group_size=-1`` means one group for the whole row.

Value of element ``(n, k)``: ``(code[k, n] - zero[g, n]) * scales[g, n]`` with ``g = g_idx[k]``.

Stored layout (``GPTQLinearWeight``): ``qweight``, ``scales`` and ``g_idx`` exactly as loaded (what
a GPTQ GEMM kernel consumes, and slicing output rows is a column slice of each); ``zeros`` is
unpacked at load to int32 ``[G, N]`` true zero points: it is G*N small numbers, it resolves the
v1/v2 difference once, and rows can then be sliced at any N (packed qzeros only at multiples of
``32 // bits``). Inference only: ``F.linear`` gives gradients to the input, never to the weight;
it runs the pure-PyTorch reference (dequantize in fp32 + matmul); a Triton kernel is the next step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import return_and_correct_aliasing

from quantframe import primitives as P
from quantframe.tensor import (
    DEQUANTIZING_OPS,
    QuantTensor,
    check_weight,
    dequantizing_op,
    row_slice_range,
    same_layout_copy,
    same_shape_view_op,
)

aten = torch.ops.aten

__all__ = ["GPTQLinearWeight", "from_gptq", "to_gptq", "load_gptq_linear_"]

BITS = (2, 3, 4, 8)
FORMATS = ("v1", "v2")


# ---- the bit stream ------------------------------------------------------------------------------
def _stream_index(n_codes: int, bits: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per code: its word, its bit offset in it, and the next word (for codes that straddle)."""
    pos = torch.arange(n_codes, device=device, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    n_words = n_codes * bits // 32
    return word, off, (word + 1).clamp_max(n_words - 1)


def unpack_stream(packed: Tensor, bits: int, dim: int) -> Tensor:
    """int32 words packed along ``dim`` -> int32 codes (``dim`` grows by ``32 / bits``)."""
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF  # unsigned words
    n_codes = p.shape[0] * 32 // bits
    word, off, nxt = _stream_index(n_codes, bits, p.device)
    shape = (-1,) + (1,) * (p.dim() - 1)
    lo = p[word] >> off.view(shape)
    hi = p[nxt] << (32 - off).view(shape)  # bits of the next word, for codes that straddle
    codes = (lo | torch.where((off + bits > 32).view(shape), hi, 0)) & (2**bits - 1)
    return codes.to(torch.int32).movedim(0, dim)


def pack_stream(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Inverse of :func:`unpack_stream`: codes ``0 .. 2**bits - 1`` -> int32 words along ``dim``."""
    c = codes.movedim(dim, 0).to(torch.int64) & (2**bits - 1)
    n_codes = c.shape[0]
    if n_codes * bits % 32:
        raise ValueError(f"pack_stream: {n_codes} codes of {bits} bits do not fill whole int32 words")
    word, off, _ = _stream_index(n_codes, bits, c.device)
    shape = (-1,) + (1,) * (c.dim() - 1)
    words = torch.zeros((n_codes * bits // 32, *c.shape[1:]), dtype=torch.int64, device=c.device)
    words.index_add_(0, word, c << off.view(shape))  # fields never overlap: sum == OR
    spill = (off + bits > 32).nonzero().flatten()  # straddling codes: their high bits, next word
    words.index_add_(0, word[spill] + 1, c[spill] >> (32 - off[spill]).view(shape))
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(0, dim)


# ---- checks ----------------------------------------------------------------------------------------
def _check_gptq(qweight, qzeros, scales, g_idx, bits, group_size, fmt) -> tuple[int, int, int]:
    """Raise TypeError / ValueError naming the bad tensor; return ``(N, K, G)``."""
    if bits not in BITS:
        raise ValueError(f"from_gptq: bits={bits!r} is not supported; expected one of {BITS}")
    if fmt not in FORMATS:
        raise ValueError(f"from_gptq: format={fmt!r}; expected one of {FORMATS}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"from_gptq: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2:
            raise ValueError(f"from_gptq: {name} must be 2-D, got shape {tuple(t.shape)}")
    if not isinstance(scales, Tensor) or not scales.dtype.is_floating_point or scales.dim() != 2:
        raise TypeError(f"from_gptq: scales must be a 2-D float tensor [G, N], got {getattr(scales, 'dtype', scales)}")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if (qweight.shape[0] * 32) % bits:
        raise ValueError(f"from_gptq: qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit codes")
    if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0 and k % group_size == 0)):
        raise ValueError(f"from_gptq: group_size={group_size!r} must be -1 or a positive divisor of K={k}")
    g = 1 if group_size == -1 else k // group_size
    if scales.shape != (g, n):
        raise ValueError(f"from_gptq: scales.shape={tuple(scales.shape)}, expected [G={g}, N={n}] for K={k}")
    if n * bits % 32 or qzeros.shape != (g, n * bits // 32):
        raise ValueError(f"from_gptq: qzeros.shape={tuple(qzeros.shape)}, expected [G={g}, N*bits/32={n * bits / 32:g}]")
    if g_idx is not None:
        if not isinstance(g_idx, Tensor) or g_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"from_gptq: g_idx must be an int32 tensor, got {getattr(g_idx, 'dtype', g_idx)}")
        if g_idx.shape != (k,):
            raise ValueError(f"from_gptq: g_idx has shape {tuple(g_idx.shape)}, expected [K={k}]")
        if k and (g_idx.min() < 0 or g_idx.max() >= g):
            raise ValueError(f"from_gptq: g_idx values must be in [0, {g}), got [{g_idx.min()}, {g_idx.max()}]")
    return n, k, g


# ---- the tensor ----------------------------------------------------------------------------------
class GPTQLinearWeight(QuantTensor):
    """Logical ``[N, K]`` weight in the GPTQ layout (module docstring).

    Inner tensors: ``qweight`` int32 ``[K * bits // 32, N]``, ``zeros`` int32 ``[G, N]`` (unpacked,
    true zero points), ``scales`` float16 (as loaded) ``[G, N]``, ``g_idx`` int32 ``[K]``.
    Attributes: ``bits``, ``group_size`` (-1: one group). Outer dtype: the activation dtype.
    """

    tensor_names = ("qweight", "zeros", "scales", "g_idx")
    attr_names = ("bits", "group_size")

    def codes(self) -> Tensor:
        """The integer codes, int32 ``[K, N]`` (GPTQ's orientation)."""
        return unpack_stream(self.qweight, self.bits, dim=0)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(code - zero) * scale`` per (row n, column k), group ``g_idx[k]``; fp32 math -> ``[N, K]``."""
        g = self.g_idx.long()
        w = (self.codes() - self.zeros[g]).float() * self.scales[g].float()  # [K, N]
        return w.T.to(dtype or self.dtype)


def from_gptq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None = None, bits: int = 4,
    group_size: int = 128, *, format: str = "v1", dtype: torch.dtype | None = None,
) -> GPTQLinearWeight:  # fmt: skip
    """Import a GPTQ layer's tensors (layout in the module docstring) as a ``GPTQLinearWeight``.

    ``dtype`` is the outer (activation) dtype, default ``scales.dtype``. Tensors are kept, not
    copied (``qzeros`` is unpacked). Raises ``TypeError`` for wrong dtypes (qweight/qzeros not
    int32, g_idx not integer, scales not float) and ``ValueError`` for bits, format, group_size or
    shapes that do not fit together (K = qweight.shape[0] * 32 / bits, N = qweight.shape[1]).

    Example::

        w = from_gptq(sd["qweight"], sd["qzeros"], sd["scales"], sd["g_idx"], bits=4, group_size=128)
        y = F.linear(x, w)
    """
    n, k, _ = _check_gptq(qweight, qzeros, scales, g_idx, bits, group_size, format)
    zeros = unpack_stream(qzeros, bits, dim=1)
    if format == "v1":
        zeros = (zeros + 1) & (2**bits - 1)
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device, dtype=torch.int32) // (k if group_size == -1 else group_size)
    dtype = dtype or scales.dtype
    return GPTQLinearWeight(
        qweight, zeros, scales, g_idx.to(torch.int32), bits, group_size, shape=torch.Size((n, k)), dtype=dtype
    )


def quantize_gptq_groups(
    w: Tensor, bits: int, group_size: int, act_order_perm: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Round-to-nearest asymmetric codes of ``w [N, K]`` in GPTQ groups.

    Returns ``(codes uint8 [N, K], zeros int32 [N, G], scales float16 [N, G], g_idx int32 [K])``.
    With ``act_order_perm`` (a permutation of K), group ``j`` holds columns
    ``perm[j*group_size : (j+1)*group_size]``, as GPTQ's act-order does.
    """
    k = w.shape[1]
    gs = k if group_size == -1 else group_size
    perm = torch.arange(k, device=w.device) if act_order_perm is None else act_order_perm.long()
    if perm.shape != (k,) or not torch.equal(perm.sort().values, torch.arange(k, device=w.device)):
        raise ValueError(f"to_gptq: act_order_perm must be a permutation of range({k})")
    wp = w.detach().float()[:, perm]
    scale, zero = P.choose_qparams(wp, bits, gs, symmetric=False)
    # scales are stored in fp16: quantize with the rounded scale so that dequantization is exact.
    scale16 = scale.clamp(torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max).half()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    codes[:, perm] = P.quantize(wp, scale16.float(), zero, bits)
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[perm] = (torch.arange(k, device=w.device) // gs).to(torch.int32)
    return codes, zero, scale16, g_idx


def to_gptq(
    w: Tensor, bits: int = 4, group_size: int = 128, act_order_perm: Tensor | None = None, *, format: str = "v1"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize a float ``w [N, K]`` (RTN, asymmetric, per group) and pack it the GPTQ way.

    Returns ``(qweight, qzeros, scales, g_idx)`` as :func:`from_gptq` takes them. Raises
    ``ValueError`` for bits, group_size, K or N that the layout cannot hold, or a bad permutation.

    Example::

        qweight, qzeros, scales, g_idx = to_gptq(w, bits=4, group_size=32)
        wq = from_gptq(qweight, qzeros, scales, g_idx, bits=4, group_size=32)
    """
    check_weight(w, "to_gptq")
    n, k = w.shape
    if bits not in BITS or format not in FORMATS:
        raise ValueError(f"to_gptq: bits={bits!r} (expected one of {BITS}), format={format!r} (expected {FORMATS})")
    if not (group_size == -1 or (group_size > 0 and k % group_size == 0)):
        raise ValueError(f"to_gptq: group_size={group_size!r} must be -1 or a positive divisor of K={k}")
    if k * bits % 32 or n * bits % 32:
        raise ValueError(f"to_gptq: {bits}-bit packing needs K*bits and N*bits to be multiples of 32, got N={n}, K={k}")
    codes, zero, scale16, g_idx = quantize_gptq_groups(w, bits, group_size, act_order_perm)
    stored = (zero - 1) & (2**bits - 1) if format == "v1" else zero
    qzeros = pack_stream(stored.T, bits, dim=1)
    return pack_stream(codes.T, bits, dim=0), qzeros, scale16.T.contiguous(), g_idx


def load_gptq_linear_(
    module: nn.Linear, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None = None,
    bits: int = 4, group_size: int = 128, bias: Tensor | None = None, *, format: str = "v1",
) -> nn.Linear:  # fmt: skip
    """Swap ``module.weight`` for the imported GPTQ weight (a frozen Parameter); returns ``module``.

    The outer dtype is the module's weight dtype. ``bias`` ([N], optional) is copied into
    ``module.bias``. Raises ``TypeError`` for a module that is not an ``nn.Linear`` and
    ``ValueError`` when the GPTQ shape ``[N, K]`` is not ``[out_features, in_features]``.

    Example::

        load_gptq_linear_(model.q_proj, sd["qweight"], sd["qzeros"], sd["scales"], sd["g_idx"], bits=4)
    """
    if not isinstance(module, nn.Linear):
        raise TypeError(f"load_gptq_linear_: expected an nn.Linear, got {type(module).__name__}")
    w = from_gptq(qweight, qzeros, scales, g_idx, bits, group_size, format=format, dtype=module.weight.dtype)
    if tuple(w.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"load_gptq_linear_: GPTQ weight is [N={w.shape[0]}, K={w.shape[1]}], module is "
            f"[out_features={module.out_features}, in_features={module.in_features}]"
        )
    module.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        if bias.shape != (module.out_features,):
            raise ValueError(f"load_gptq_linear_: bias.shape={tuple(bias.shape)}, expected ({module.out_features},)")
        module.bias = nn.Parameter(bias.detach().to(module.weight.dtype).clone(), requires_grad=False)
    return module


# ---- ops -------------------------------------------------------------------------------------------
@GPTQLinearWeight.implements([F.linear])
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, GPTQLinearWeight) or not x.dtype.is_floating_point:
        raise TypeError(f"F.linear: the input must be a plain float tensor, got {type(x).__name__} {x.dtype}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"F.linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}")
    y = F.linear(x.float(), w.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


@GPTQLinearWeight.implements([aten.slice.Tensor])
def _slice(func, types, args, kwargs):
    """Whole output rows: a column slice of qweight, zeros and scales (g_idx is shared)."""
    w = args[0]
    rows = row_slice_range(w, args, kwargs)
    cols = slice(rows.start, rows.stop)
    out = GPTQLinearWeight(
        w.qweight[:, cols], w.zeros[:, cols], w.scales[:, cols], w.g_idx, w.bits, w.group_size,
        shape=torch.Size((len(rows), w.shape[1])), dtype=w.dtype,
    )  # fmt: skip
    return return_and_correct_aliasing(func, args, kwargs, out)


GPTQLinearWeight.implements([aten.view.default, aten._unsafe_view.default])(same_shape_view_op)
GPTQLinearWeight.implements([aten.copy_.default])(same_layout_copy("from_gptq"))


GPTQLinearWeight.implements(DEQUANTIZING_OPS)(dequantizing_op)

torch.serialization.add_safe_globals([GPTQLinearWeight])
