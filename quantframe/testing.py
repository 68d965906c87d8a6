"""The contract every QuantTensor subclass must keep, as a reusable pytest class.

A scheme's test file subclasses :class:`QuantTensorContract`, says how to build its tensor and
how accurate it must be, and pytest runs every check below for it::

    class TestInt8QTContract(QuantTensorContract):
        sqnr_floor = 40.0
        def make(self, w):
            return Int8QTLinearWeight.from_float(w)
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from quantframe.tensor import QuantTensor

__all__ = ["QuantTensorContract", "assert_close_at_scale", "run_distributed", "sqnr"]


def sqnr(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).square().sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.square().sum() / noise))


def assert_close_at_scale(actual: Tensor, expected: Tensor, rel: float = 1e-2, min_sqnr: float = 40.0) -> None:
    """Every element within ``rel * max|expected|`` and the whole within ``min_sqnr`` dB of ``expected``.

    For 16-bit matmul outputs at real sizes (K in the thousands): their error is set by the size of
    the products (W rounded to 16 bits, the output's own rounding, one activation code flipped by a
    differently rounded division), so an elementwise ``rtol`` fails on outputs that cancel near 0.
    A wrong tile or a wrong scale still fails both bounds.
    """
    bound = rel * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)
    got = sqnr(expected, actual)
    assert got >= min_sqnr, f"SQNR {got:.1f} dB < {min_sqnr} dB"


def assert_matches_reference(got: Iterable[Tensor], ref: Iterable[Tensor], dtype: torch.dtype) -> None:
    """Outputs (and gradients) of a kernel path against its fp32 reference: to 1e-4 for fp32 inputs
    (the reference's math), :func:`assert_close_at_scale` for 16-bit ones (W, the product and the
    gradients rounded to the input's dtype)."""
    for g, r in zip(got, ref, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        else:
            assert_close_at_scale(g.float(), r.float(), rel=1e-2, min_sqnr=40)


def _assert_same(a: QuantTensor, b: QuantTensor) -> None:
    assert type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
    for (name, ta), (_, tb) in zip(a._inner_tensors(), b._inner_tensors()):
        assert torch.equal(ta, tb), name


class QuantTensorContract:
    """Checks shared by every quantized weight. Subclasses set ``sqnr_floor`` and ``make``."""

    sqnr_floor: float = 30.0
    shape: tuple[int, int] = (32, 64)

    def make(self, w: Tensor) -> QuantTensor:
        raise NotImplementedError

    def weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(self.shape, dtype=dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_round_trip_above_sqnr_floor(self, dtype):
        w = self.weight(dtype)
        q = self.make(w)
        assert q.shape == w.shape and q.dtype == dtype
        assert sqnr(w.float(), q.dequantize().float()) >= self.sqnr_floor

    def test_flatten_unflatten_round_trip(self):
        q = self.make(self.weight())
        names, attrs = q.__tensor_flatten__()
        inner = {n: getattr(q, n) for n in names}
        _assert_same(type(q).__tensor_unflatten__(inner, attrs, q.shape, q.stride()), q)

    def test_deepcopy_is_independent(self):
        q = self.make(self.weight())
        c = copy.deepcopy(q)
        _assert_same(c, q)
        for (_, tq), (_, tc) in zip(q._inner_tensors(), c._inner_tensors()):
            assert tq.data_ptr() != tc.data_ptr()

    def test_state_dict_loads_with_weights_only(self):
        lin = torch.nn.Linear(self.shape[1], self.shape[0])
        lin.weight = torch.nn.Parameter(self.make(lin.weight.detach()), requires_grad=False)
        buf = io.BytesIO()
        torch.save(lin.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        _assert_same(loaded["weight"], lin.weight.detach())
        fresh = torch.nn.Linear(self.shape[1], self.shape[0])
        fresh.weight = torch.nn.Parameter(self.make(fresh.weight.detach()), requires_grad=False)
        fresh.load_state_dict(loaded)
        torch.testing.assert_close(fresh.weight.dequantize(), lin.weight.dequantize())

    def test_to_dtype_changes_outer_dtype_only(self):
        q = self.make(self.weight())
        b = q.to(torch.bfloat16)
        assert type(b) is type(q) and b.dtype == torch.bfloat16
        for (_, tq), (_, tb) in zip(q._inner_tensors(), b._inner_tensors()):
            assert tb.dtype == tq.dtype
        torch.testing.assert_close(b.dequantize(torch.float32), q.dequantize(torch.float32))
        assert type(q.to("cpu")) is type(q)

    def test_detach_and_clone_keep_the_class(self):
        q = self.make(self.weight())
        _assert_same(q.detach(), q)
        _assert_same(q.clone(), q)

    def test_row_slice_matches_dequantized_slice(self):
        q = self.make(self.weight())
        torch.testing.assert_close(q[2:10].dequantize(), q.dequantize()[2:10])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_linear_matches_dequantized(self, dtype):
        q = self.make(self.weight(dtype))
        x = torch.randn(3, 5, self.shape[1], dtype=dtype)
        ref = F.linear(x.float(), q.dequantize(torch.float32)).to(dtype)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(F.linear(x, q), ref, atol=tol, rtol=tol)

    def test_compile_fullgraph_matches_eager(self):
        torch._dynamo.reset()
        q = self.make(self.weight())
        x = torch.randn(4, self.shape[1])
        compiled = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
        torch.testing.assert_close(compiled(x, q), F.linear(x, q))

    def test_unsupported_op_raises_naming_class_and_op(self):
        q = self.make(self.weight())
        with pytest.raises(NotImplementedError, match=rf"{type(q).__name__} does not support aten\.cos\.default; supported: "):
            torch.cos(q)


# ---- Triton's interpreter ----------------------------------------------------------------------
class LaunchSpy:
    """Stands in for a Triton kernel in a module (``monkeypatch.setattr``): records each launch's grid
    in ``calls`` and launches the real kernel, so a test can tell which kernel a dispatch chose."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def patch_interpreter_loop_bounds() -> Callable[[], None] | None:
    """numpy >= 2.4 refuses ``int()`` of a 1-element array, which the Triton 3.6 interpreter does for
    a runtime loop bound (``range(0, K, BLOCK_K)``): triton-lang/triton#9171. Applies the upstream
    fix (``reshape(())`` first) and returns the undo; None where numpy does not need it. Remove once
    the pinned triton ships the fix."""
    import numpy as np
    import triton.runtime.interpreter as interpreter

    if np.lib.NumpyVersion(np.__version__) < "2.4.0":
        return None
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patched

    def undo() -> None:
        interpreter._patch_lang_tensor = original

    return undo


# ---- FSDP2 on CPU: several gloo processes on this machine ------------------------------------
def _distributed_worker(rank: int, scenarios: dict, store: str, out: str, world: int) -> None:
    import torch.distributed as dist

    # Rendezvous through a file, not a TCP port: a port picked free here can be taken before the
    # store binds it (another test's process, a socket in TIME_WAIT). A hung collective becomes an
    # error after 60 s instead of gloo's default 30 min.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        for name, scenario in scenarios.items():
            torch.save(scenario(rank, out), os.path.join(out, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Every result is on disk. Leave without running C++ static destructors: on torch 2.13 a
    # worker's teardown now and then aborts ("terminate called without an active exception",
    # SIGABRT), which mp.spawn would report as a failed run. An exception above still propagates.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    scenarios: dict[str, Callable[[int, str], object]], out_dir: str | Path, world: int = 2
) -> dict[str, list]:
    """Run each ``scenario(rank, out_dir)`` in ``world`` gloo processes (one spawn for all of them).

    Scenarios must be module-level functions (they are pickled by reference) returning what
    ``torch.load(weights_only=True)`` can read back. Returns ``{name: [result of rank 0, ...]}``;
    an exception on any rank is re-raised here by ``mp.spawn``, so a test cannot pass by accident.
    """
    import torch.multiprocessing as mp

    store = Path(out_dir) / f"rendezvous-{os.getpid()}-{time.time_ns()}"  # a new file for each spawn
    mp.spawn(_distributed_worker, args=(scenarios, str(store), str(out_dir), world), nprocs=world)
    return {
        name: [torch.load(Path(out_dir) / f"{name}-rank{r}.pt", weights_only=True) for r in range(world)]
        for name in scenarios
    }


# ---- the small model of the FSDP2 tests ---------------------------------------------------------
FSDP_MLP_LINEARS = (0, 2, 4)  # the Linears' indices in fsdp_mlp's nn.Sequential


def fsdp_mlp(config, out_features: int = 8, shard: bool = False, seed: int = 0, **fsdp_kwargs):
    """``Linear(16, 32) ReLU Linear(32, 16) ReLU Linear(16, out)`` seeded with ``seed``, quantized with
    ``config``; with ``shard`` each Linear and then the whole model is ``fully_shard``-ed."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from quantframe.api import quantize_

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, out_features))
    quantize_(model, config)
    if shard:
        for i in FSDP_MLP_LINEARS:
            fully_shard(model[i], **fsdp_kwargs)
        fully_shard(model, **fsdp_kwargs)
    return model


def fsdp_batch_halves(world: int, out_features: int = 8) -> list[tuple[Tensor, Tensor]]:
    """The fixed batch x [16, 16] -> y [16, out] of the FSDP2 tests, as ``world`` ranks' shares."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randn(16, out_features, generator=g)
    return list(zip(x.chunk(world), y.chunk(world)))


def rank_share(*tensors: Tensor) -> tuple[Tensor, ...]:
    """This rank's equal share of each tensor along dim 0; the whole tensors outside torch.distributed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tensors
    return tuple(t.chunk(dist.get_world_size())[dist.get_rank()] for t in tensors)


def train_mse(model, opt, x: Tensor, y: Tensor, steps: int) -> list[float]:
    """``steps`` MSE steps on ``(x, y)``; under torch.distributed each logged loss is the mean over the
    ranks' equal shares, i.e. the full-batch loss of the one-process run."""
    import torch.distributed as dist

    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses
