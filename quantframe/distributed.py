"""What FSDP2 moves: count the bytes of a sharded model's all-gathers and reduce-scatters.

A quantized weight is all-gathered as its packed integers plus scales (``fsdp_pre_all_gather``), so
INT8 weights should move about half the bytes of bf16 ones. ``count_fsdp_comms`` measures it on the
real collectives: it wraps each FSDP module's communication objects (``set_custom_all_gather`` /
``set_custom_reduce_scatter``), adds up the bytes each rank hands to them, and calls the default
implementation, so the run itself is unchanged::

    fully_shard(block) for each block; fully_shard(model)
    counts = count_fsdp_comms(model)
    train_step(model)
    counts.all_gather_bytes, counts.reduce_scatter_bytes   # this rank's inputs, bytes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CommCounts", "count_fsdp_comms"]


@dataclass
class CommCounts:
    """Bytes and calls of the collectives since the last ``reset()`` (this rank's inputs).

    An all-gather's input is this rank's shard, so every rank receives ``world × all_gather_bytes``;
    a reduce-scatter's input is the full unsharded gradient.
    """

    all_gather_bytes: int = 0
    all_gather_calls: int = 0
    reduce_scatter_bytes: int = 0
    reduce_scatter_calls: int = 0
    all_gather_dtypes: set = field(default_factory=set)

    def reset(self) -> None:
        self.all_gather_bytes = self.all_gather_calls = self.reduce_scatter_bytes = self.reduce_scatter_calls = 0
        self.all_gather_dtypes = set()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``input_tensor`` of a Comm call ``(output_tensor, input_tensor, group, ...)``."""
    return kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]


def count_fsdp_comms(model: nn.Module) -> CommCounts:
    """Count the all-gather and reduce-scatter bytes of every ``fully_shard``-ed module in ``model``.

    Call after ``fully_shard``; the counting stays installed (it costs a few additions per call).
    Raises ``ValueError`` if no module of ``model`` is sharded, ``RuntimeError`` if this torch has
    no FSDP2 communication hooks (``set_custom_all_gather`` came with torch 2.9).
    """
    from torch.distributed.fsdp import FSDPModule

    try:  # the Comm interfaces and torch's default implementations (private module, stable since 2.9)
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError as e:  # pragma: no cover - depends on the torch version
        need = "count_fsdp_comms needs torch >= 2.9 (FSDP2 custom comms)"
        raise RuntimeError(f"{need}; this is torch {torch.__version__}") from e

    counts = CommCounts()

    class CountingAllGather(AllGather):
        def __init__(self):
            self.inner = DefaultAllGather()

        def allocate(self, size, *, dtype, device):
            return self.inner.allocate(size, dtype=dtype, device=device)

        def __call__(self, *args, **kwargs):
            t = _input_tensor(args, kwargs)
            counts.all_gather_bytes += _nbytes(t)
            counts.all_gather_calls += 1
            counts.all_gather_dtypes.add(t.dtype)
            return self.inner(*args, **kwargs)

    class CountingReduceScatter(ReduceScatter):
        def __init__(self):
            self.inner = DefaultReduceScatter()

        def allocate(self, size, *, dtype, device):
            return self.inner.allocate(size, dtype=dtype, device=device)

        def __call__(self, *args, **kwargs):
            counts.reduce_scatter_bytes += _nbytes(_input_tensor(args, kwargs))
            counts.reduce_scatter_calls += 1
            return self.inner(*args, **kwargs)

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        raise ValueError("count_fsdp_comms: no module of the model is fully_shard-ed; call it after fully_shard")
    for m in sharded:
        m.set_custom_all_gather(CountingAllGather())
        m.set_custom_reduce_scatter(CountingReduceScatter())
    return counts
