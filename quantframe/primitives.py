"""Quantization numerics in plain PyTorch: the source of truth every kernel is tested against.

Granularity of the scales for a 2-D tensor ``x [N, K]``:

* ``"tensor"``  one scale for the whole tensor  -> ``scale [1, 1]``
* ``"row"``     one scale per output row        -> ``scale [N, 1]``
* ``g: int``    one scale per group of ``g`` consecutive elements of a row -> ``scale [N, K // g]``

Symmetric quantization maps ``[-absmax, absmax]`` onto ``[-qmax, qmax]`` with
``qmax = 2**(bits-1) - 1`` (127 for int8, *not* 127.5: the code -128 is never produced, so the
grid is symmetric around zero and ``-q`` is always representable). Asymmetric quantization maps
``[min, max]`` onto ``[0, 2**bits - 1]`` with an integer zero point.
All math is fp32; scales are fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["tensor", "row"] | int

__all__ = [
    "qrange",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_rowwise_int8",
    "dequantize_rowwise_int8",
    "stochastic_round",
    "fp32_to_bf16_stochastic",
    "pack_bits",
    "unpack_bits",
    "pack_int4",
    "unpack_int4",
]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer code range ``(qmin, qmax)`` for ``bits`` bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8]")
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs bits >= 2")
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _groups(x: Tensor, granularity: Granularity) -> Tensor:
    """View ``x [N, K]`` as ``[N, G, g]`` so that a reduction over dim -1 gives one value per group."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    n, k = x.shape
    if granularity == "tensor":
        return x.reshape(1, 1, n * k)
    if granularity == "row":
        return x.reshape(n, 1, k)
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        if k % granularity:
            raise ValueError(f"group_size={granularity} must divide the row length {k}")
        return x.reshape(n, k // granularity, granularity)
    raise ValueError(f"granularity={granularity!r}: expected 'tensor', 'row' or a positive group size")


def _expand(s: Tensor, shape: torch.Size) -> Tensor:
    """Broadcast a ``[N', G]`` scale / zero point back over ``[N, K]`` (N' is 1 or N)."""
    n, k = shape
    return s.repeat_interleave(k // s.shape[1], dim=1).expand(n, k)


def choose_qparams(
    x: Tensor,
    bits: int = 8,
    granularity: Granularity = "row",
    symmetric: bool = True,
    eps: float = 1e-12,
) -> tuple[Tensor, Tensor | None]:
    """Scale (fp32 ``[N', G]``) and zero point (int32, or None when symmetric) for ``x [N, K]``."""
    qmin, qmax = qrange(bits, symmetric)
    g = _groups(x.detach().float(), granularity)
    # Divide by a tensor, not a Python number: CUDA torch turns `t / 127` into `t * fp32(1/127)`,
    # an ulp off for some values; tensor / tensor is IEEE division on CPU and CUDA alike.
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        return (absmax / torch.full_like(absmax, qmax)).clamp_min(eps), None
    lo = g.amin(dim=-1).clamp_max(0)  # the grid must contain 0 exactly (padding, ReLU zeros)
    hi = g.amax(dim=-1).clamp_min(0)
    scale = ((hi - lo) / torch.full_like(hi, qmax - qmin)).clamp_min(eps)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def stochastic_round(x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased stochastic rounding: ``floor(x) + [u < x - floor(x)]``, ``u ~ U[0, 1)``; ``E[result] = x``.

    ``x`` rounds up with probability ``x - floor(x)``. ``noise`` (same shape, values in [0, 1))
    may be passed to make the result reproducible, e.g. to compare a kernel with this reference.
    """
    if noise is None:
        noise = torch.rand(x.shape, dtype=torch.float32, device=x.device, generator=generator)
    # floor(x) + [u < frac(x)] rather than floor(x + u): the sum can round up to the next integer
    # in fp32 when x is a whole number and u is within an ulp of 1; this form never leaves
    # {floor, ceil}. frac(x) = x - floor(x) is exact in fp32.
    x = x.float()
    lo = torch.floor(x)
    return lo + (noise < x - lo).float()


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None = None,
    bits: int = 8,
    stochastic: bool = False,
    noise: Tensor | None = None,
) -> Tensor:
    """Integer codes of ``x [N, K]`` for the given scale/zero point; int8 (symmetric) or uint8 codes."""
    symmetric = zero_point is None
    qmin, qmax = qrange(bits, symmetric)
    v = x.float() / _expand(scale, x.shape)
    if not symmetric:
        v = v + _expand(zero_point, x.shape).float()
    v = stochastic_round(v, noise) if stochastic else torch.round(v)
    return v.clamp(qmin, qmax).to(torch.int8 if symmetric else torch.uint8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Float values of codes ``q [N, K]``: ``(q - zero_point) * scale``, computed in fp32."""
    v = q.float()
    if zero_point is not None:
        v = v - _expand(zero_point, q.shape).float()
    return (v * _expand(scale, q.shape)).to(dtype)


def quantize_rowwise_int8(
    w: Tensor, stochastic: bool = False, noise: Tensor | None = None, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 as used by INT8 quantized training.

    ``w [N, K]`` -> ``(int_data int8 [N, K] in [-127, 127], scale fp32 [N])`` with
    ``scale = absmax(row) / 127``. An all-zero row gets ``scale = eps`` and codes 0.
    """
    scale, _ = choose_qparams(w, bits=8, granularity="row", symmetric=True, eps=eps)
    return quantize(w, scale, bits=8, stochastic=stochastic, noise=noise), scale.view(-1)


def dequantize_rowwise_int8(int_data: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``int_data [N, K] * scale [N]`` in fp32, cast to ``dtype``."""
    return (int_data.float() * scale.float().view(-1, 1)).to(dtype)


def fp32_to_bf16_stochastic(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 -> bf16 with unbiased stochastic rounding (exact, by bit manipulation).

    A bf16 value is the top 16 bits of an fp32. Truncate, then round away with probability
    equal to the dropped 16 bits / 2**16.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"fp32_to_bf16_stochastic expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    low = bits & 0xFFFF
    trunc = bits & -65536  # 0xFFFF0000 as a signed int32
    bits = torch.where(r < low, trunc + 0x10000, trunc)
    return bits.view(torch.float32).to(torch.bfloat16)


# ---- bit packing (low-bit weights) ------------------------------------------------------------
# Codes are unsigned (``0 .. 2**bits - 1``) and packed along the last dim, first element in the
# lowest bits:
#
# * 4 bits: 2 codes per byte, ``byte = q[2i] | q[2i + 1] << 4`` (q[2i] in the low nibble);
# * 2 bits: 4 codes per byte, ``byte = q[4i] | q[4i + 1] << 2 | q[4i + 2] << 4 | q[4i + 3] << 6``;
# * 3 bits: 8 codes in 3 bytes: the 24-bit little-endian word ``sum(q[8i + j] << 3j, j < 8)``
#   is stored as bytes ``(word & 255, word >> 8 & 255, word >> 16)``.
#
# The shifts run in int32 (uint8 shifts are not supported everywhere torch.compile lowers to).
_PACK_GROUP = {2: (4, 1), 3: (8, 3), 4: (2, 1)}  # bits -> (codes, bytes) per packed unit


def _check_pack(q: Tensor, bits: int, who: str) -> tuple[int, int]:
    if bits not in _PACK_GROUP:
        raise ValueError(f"{who}: bits={bits} is not supported; expected one of {sorted(_PACK_GROUP)}")
    if q.dtype != torch.uint8:
        raise TypeError(f"{who}: expected uint8 codes, got {q.dtype}")
    if q.dim() == 0:
        raise ValueError(f"{who}: expected a tensor with at least one dim, got a scalar")
    return _PACK_GROUP[bits]


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``q [..., K]`` (values ``0 .. 2**bits - 1``) into uint8 ``[..., K * bits // 8]``.

    ``bits`` is 2, 3 or 4; ``K`` must be a multiple of 4, 8 or 2 respectively. Layout: see above
    (first element in the lowest bits). Raises ``ValueError`` for other bits, a ``K`` that does
    not divide, or codes out of range; ``TypeError`` for a dtype other than uint8.
    """
    per, nbytes = _check_pack(q, bits, "pack_bits")
    k = q.shape[-1]
    if k % per:
        raise ValueError(f"pack_bits: last dim {k} must be a multiple of {per} for {bits}-bit packing")
    if q.numel() and int(q.max()) >= 2**bits:  # not traced in practice: packing happens at quantize time
        raise ValueError(f"pack_bits: codes must be in [0, {2**bits - 1}], got max {int(q.max())}")
    units = q.reshape(*q.shape[:-1], k // per, per).to(torch.int32)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    word = (units << shifts).sum(-1, dtype=torch.int32)  # disjoint bit fields: sum == bitwise or
    if nbytes == 1:
        return word.to(torch.uint8)
    byte_shifts = torch.arange(nbytes, device=q.device, dtype=torch.int32) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 255).to(torch.uint8).reshape(*q.shape[:-1], k * bits // 8)


def unpack_bits(p: Tensor, bits: int, k: int | None = None) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``p [..., K * bits // 8]`` -> uint8 codes ``[..., K]``.

    ``k`` (optional) is checked against the unpacked length.
    """
    per, nbytes = _check_pack(p, bits, "unpack_bits")
    if p.shape[-1] % nbytes:
        raise ValueError(f"unpack_bits: last dim {p.shape[-1]} must be a multiple of {nbytes} for {bits}-bit codes")
    n_units = p.shape[-1] // nbytes
    if k is not None and k != n_units * per:
        raise ValueError(f"unpack_bits: k={k} does not match {p.shape[-1]} packed bytes of {bits}-bit codes")
    units = p.reshape(*p.shape[:-1], n_units, nbytes).to(torch.int32)
    byte_shifts = torch.arange(nbytes, device=p.device, dtype=torch.int32) * 8
    word = (units << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
    codes = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*p.shape[:-1], n_units * per)


def pack_int4(q: Tensor) -> Tensor:
    """uint8 codes ``q [..., K]`` in ``0..15`` -> uint8 ``[..., K // 2]``; ``q[..., 2i]`` in the low nibble."""
    return pack_bits(q, 4)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K // 2]`` -> uint8 codes ``[..., K]`` in ``0..15``."""
    return unpack_bits(p, 4)
