"""FSDP2: quantized training sharded over GPUs: ms/step, peak GiB per GPU, bytes all-gathered per step.

The anchor model of benchmarks/train_step.py (8 Llama MLP blocks, 277M parameters, bf16), each
block compiled and ``fully_shard``-ed, then the root; the global batch [4, 2048, 2048] is split over
the ranks, so every world size does the same work per step. Rows: bf16 (torch AdamW), quantframe
INT8 weight-only QT, INT8 mixed precision (bf16 and INT8 weights) and torchao's INT8 QT as the peer;
a second table fine-tunes adapters on a frozen base (bf16 + LoRA, NF4 + LoRA, NF4 + DoRA).

Per row: ms/step (mean of --steps after --warmup; the slowest rank), peak
``torch.cuda.max_memory_allocated`` (the largest rank), and the bytes each rank hands to FSDP2's
all-gathers and reduce-scatters in one step, counted on the real collectives
(``quantframe.distributed.count_fsdp_comms``). Before timing, rank 0 trains an unsharded copy of the
same model on the whole batch for --check-steps steps; the sharded run's first losses (mean over
ranks = the whole batch's loss) must match it (``loss rel diff``; ``loss moved`` shows how far the
loss went in those steps, so a match is not a loss that did not move).

    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --json   # writes benchmarks/results/fsdp2_<gpu>_x2.json
    python benchmarks/fsdp2.py                                # one process = one GPU
    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --cpu-smoke   # gloo, tiny model, eager, checks only
    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --only "int8 QT" --check-steps 0 --profile --trace-dir $OUT
    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --json --batch 32   # 8x the anchor's work: fsdp2_<gpu>_x2_b32.json
    torchrun --nproc-per-node 2 benchmarks/fsdp2.py --json --no-reshard  # blocks not resharded: ..._noreshard.json

Each row also reports the host time per step in forward / backward / optimizer and the rest (the loss
all-reduce, and the wait for the GPU after the last step), the largest rank's (``host_ms``, the clock
without synchronizing): when the phases add up to the step time, the host sets the pace, not the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

# isort: split
# sibling script (`python benchmarks/fsdp2.py` puts benchmarks/ on sys.path)
from train_step import BATCH, BLOCKS, DIM, HIDDEN, SEQ, anchor_model

LR = 1e-3  # speed does not depend on it; large enough that the checked losses move
SMOKE = dict(dim=256, hidden=512, blocks=2, seq=8)  # --cpu-smoke sizes; NF4 needs N*K divisible by 64*256


# ---- the rows -------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def torch_adamw(model: nn.Module) -> torch.optim.Optimizer:
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(_trainable(model), lr=LR, fused=fused, foreach=None if fused else True)


def quantframe_adamw(model: nn.Module) -> torch.optim.Optimizer:
    from quantframe.optim import AdamW

    return AdamW(model.parameters(), lr=LR, state_dtype=None)  # moments in the params' dtype, as torch's


def torchao_adamw(model: nn.Module) -> torch.optim.Optimizer:
    from torchao.optim import _AdamW

    return _AdamW(model.parameters(), lr=LR)


def quantize(config_name: str, **kwargs) -> Callable[[nn.Module], None]:
    def prepare(model):
        import quantframe

        quantframe.quantize_(model, getattr(quantframe, config_name)(**kwargs))

    return prepare


def torchao_qt(model: nn.Module) -> None:
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training
    from torchao.quantization import quantize_

    quantize_(model, int8_weight_only_quantized_training())


def adapters(kind: str, nf4: bool) -> Callable[[nn.Module], None]:
    def prepare(model):
        import quantframe

        base = quantframe.nf4_weight_only() if nf4 else None
        quantframe.apply_adapters_(model, getattr(quantframe, kind)(rank=16, base=base))
        model.to(torch.bfloat16)  # bf16 adapters: FSDP2 shards a block's parameters in one dtype

    return prepare


@dataclass(frozen=True)
class Row:
    table: str  # "training" or "adapters"
    prepare: Callable[[nn.Module], None] | None  # before fully_shard: quantize_ / apply_adapters_
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]  # after fully_shard (DTensor params)
    peer: str | None = None  # package the row needs (a missing one is reported, not hidden)


ROWS: dict[str, Row] = {
    "bf16, torch AdamW": Row("training", None, torch_adamw),
    "quantframe int8 QT + AdamW": Row("training", quantize("int8_weight_only_quantized_training"), quantframe_adamw),
    "quantframe int8 mixed precision + AdamW": Row(
        "training", quantize("int8_mixed_precision_training", int8_weights=False), quantframe_adamw),
    "quantframe int8 MP + int8 weights + AdamW": Row(
        "training", quantize("int8_mixed_precision_training", int8_weights=True), quantframe_adamw),
    "torchao int8 QT + _AdamW": Row("training", torchao_qt, torchao_adamw, peer="torchao"),
    "bf16 base + LoRA r16, torch AdamW": Row("adapters", adapters("lora", nf4=False), torch_adamw),
    "NF4 base + LoRA r16 (QLoRA), torch AdamW": Row("adapters", adapters("lora", nf4=True), torch_adamw),
    "NF4 base + DoRA r16 (QDoRA), torch AdamW": Row("adapters", adapters("dora", nf4=True), torch_adamw),
}  # fmt: skip


# ---- one row --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    device: torch.device
    sizes: dict  # anchor_model's dim / hidden / blocks, and seq
    compiled: bool
    steps: int
    warmup: int
    check_steps: int
    profile: bool = False
    trace_dir: str | None = None  # with profile: rank 0 writes each row's step as a gzipped Chrome trace
    batch: int = BATCH  # global batch (sequences), split over the ranks
    reshard: bool = True  # fully_shard(reshard_after_forward=...) of each block


def build(row: Row, setup: Setup, shard: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The anchor model (seed 0, the same on every rank), prepared, blocks compiled, then sharded."""
    sizes = {k: v for k, v in setup.sizes.items() if k != "seq"}
    model = anchor_model(setup.device, **sizes)
    if row.prepare is not None:
        row.prepare(model)
    for i, block in enumerate(model):
        if setup.compiled:  # per block, FSDP2's hooks stay eager around it (as torchtitan does)
            model[i] = torch.compile(block)
        if shard:
            fully_shard(model[i], reshard_after_forward=setup.reshard)
    if shard:
        fully_shard(model)
    return model, row.optimizer(model)


def global_batch(setup: Setup) -> torch.Tensor:
    g = torch.Generator(device=setup.device).manual_seed(1)
    shape = (setup.batch, setup.sizes["seq"], setup.sizes["dim"])
    return torch.randn(shape, generator=g, device=setup.device, dtype=torch.bfloat16)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, marks: list[float] | None = None
) -> torch.Tensor:
    """Forward, backward, optimizer step; returns the loss of the whole batch (mean over the ranks).
    ``marks``: appends the host clock after each phase (no sync: when the host sets the pace, the
    gaps are where its time goes)."""
    loss = model(x).float().square().mean()
    if marks is not None:
        marks.append(time.perf_counter())
    loss.backward()
    if marks is not None:
        marks.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    if marks is not None:
        marks.append(time.perf_counter())
    loss = loss.detach()
    if isinstance(model, FSDPModule):  # sharded: each rank saw its share of the batch
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_process_losses(row: Row, setup: Setup) -> list[float]:
    """Rank 0's reference: the unsharded model on the whole batch, the first check_steps losses."""
    model, opt = build(row, setup, shard=False)
    x = global_batch(setup)
    losses = [train_step(model, opt, x).item() for _ in range(setup.check_steps)]
    del model, opt
    return losses


def run_row(name: str, row: Row, setup: Setup) -> dict:
    from quantframe.distributed import count_fsdp_comms

    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"run": name, "table": row.table}
    model = opt = None
    try:
        if row.peer:
            __import__(row.peer)
        reference = single_process_losses(row, setup) if rank == 0 and setup.check_steps else None
        # compile the sharded blocks afresh on every rank: reusing the reference's code (the whole batch), rank 0
        # would recompile them with a dynamic batch dimension, which the other ranks do not (and torch 2.11
        # fails to compile a Triton kernel that writes into a view with a dynamic dimension: pytorch#181735)
        _free(setup)
        dist.barrier()
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.device)
        model, opt = build(row, setup, shard=True)
        counts = count_fsdp_comms(model)
        x = global_batch(setup).chunk(world)[rank]
        losses = [train_step(model, opt, x).item() for _ in range(max(setup.check_steps, setup.warmup))]
        _sync(setup.device)
        dist.barrier()
        t0 = time.perf_counter()
        marks = []
        for _ in range(setup.steps):
            marks.append(time.perf_counter())
            loss = train_step(model, opt, x, marks)
        _sync(setup.device)
        marks.append(time.perf_counter())
        ms = torch.tensor((marks[-1] - t0) * 1e3 / setup.steps, device=setup.device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the step takes as long as the slowest rank
        # host time per step in forward / backward / optimizer, and the rest (the loss all-reduce and, after
        # the last step, the wait for the GPU): what the host waits on shows in the rest; the largest rank's
        gaps = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        host = torch.tensor([sum(gaps[i::4]) / setup.steps for i in range(4)], device=setup.device)
        dist.all_reduce(host, op=dist.ReduceOp.MAX)
        result["host_ms"] = dict(zip(("fwd", "bwd", "opt", "rest"), host.tolist()))
        counts.reset()
        if setup.profile and rank == 0:
            trace = None if setup.trace_dir is None else Path(setup.trace_dir) / f"trace_{_slug(name)}.json.gz"
            result["top"] = _profiled(lambda: train_step(model, opt, x), setup.device, trace)
        else:
            train_step(model, opt, x)
        _sync(setup.device)
        cuda = setup.device.type == "cuda"
        peak = torch.tensor(torch.cuda.max_memory_allocated(setup.device) / 2**30 if cuda else 0.0, device=setup.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
        result.update(ms_per_step=ms.item(), peak_gib=peak.item(), loss=loss.item(),
                      all_gather_bytes=counts.all_gather_bytes, all_gather_calls=counts.all_gather_calls,
                      reduce_scatter_bytes=counts.reduce_scatter_bytes,
                      all_gather_dtypes=sorted(str(d) for d in counts.all_gather_dtypes))  # fmt: skip
        if reference is not None:
            checked = losses[: setup.check_steps]
            result.update(check_losses=checked, reference_losses=reference,
                          loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(checked, reference)),
                          loss_moved=abs(reference[-1] - reference[0]) / abs(reference[0]))  # fmt: skip
    except Exception as e:  # a missing peer or a failing row is reported in the table, not hidden
        if not isinstance(e, ImportError):
            traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
    finally:
        model = opt = None
        _free(setup)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60]


def _profiled(step: Callable[[], object], device: torch.device, trace: Path | None = None, n: int = 10) -> dict:
    """One step under the profiler: the n ops with the most host (self CPU) time, the n kernels with
    the most GPU time, and the step's summed kernel time; ``trace``: also the whole timeline, a
    gzipped Chrome trace (chrome://tracing, Perfetto), to see what the host waits on."""
    import gzip
    import shutil
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as raw:
            prof.export_chrome_trace(raw.name)
            with open(raw.name, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    events = prof.key_averages()
    cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    gpu = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    return {"cpu_ms": [(e.key[:60], e.count, e.self_cpu_time_total / 1e3) for e in cpu],
            "gpu_ms": [(e.key[:60], e.count, e.self_device_time_total / 1e3) for e in gpu[:n]],
            "gpu_total_ms": sum(e.self_device_time_total for e in gpu) / 1e3}  # fmt: skip


def _free(setup: Setup) -> None:
    gc.collect()
    torch._dynamo.reset()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- table ----------------------------------------------------------------------------------------
def print_tables(rows: list[dict], world: int) -> None:
    for table in ("training", "adapters"):
        sub = [r for r in rows if r["table"] == table]
        if not sub:
            continue
        base = next((r for r in sub if "error" not in r and r["run"].startswith("bf16")), None)
        print(f"\n{table} ({world} rank{'s' if world > 1 else ''})")
        print(f"{'run':42s} {'ms/step':>8s} {'vs bf16':>7s} {'peak GiB':>8s} {'AG MiB':>8s} {'AG/bf16':>7s} "
              f"{'RS MiB':>8s} {'loss rel diff':>13s} {'loss moved':>10s} "
              f"{'host fwd/bwd/opt/rest ms':>24s}")  # fmt: skip
        for r in sub:
            if "error" in r:
                print(f"{r['run']:42s} n/a  ({r['error']})")
                continue
            speed = f"{base['ms_per_step'] / r['ms_per_step']:.2f}x" if base else "n/a"
            # one rank: FSDP2 runs no collective (0 bytes), so no ratio
            ag_base = base["all_gather_bytes"] if base else 0
            ag = f"{r['all_gather_bytes'] / ag_base:.3f}" if ag_base else "n/a"
            diff = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else "-"
            moved = f"{r['loss_moved']:.1e}" if "loss_moved" in r else "-"
            host = "/".join(f"{v:.1f}" for v in r["host_ms"].values()) if "host_ms" in r else "-"
            print(f"{r['run']:42s} {r['ms_per_step']:8.2f} {speed:>7s} {r['peak_gib']:8.2f} "
                  f"{r['all_gather_bytes'] / 2**20:8.1f} {ag:>7s} {r['reduce_scatter_bytes'] / 2**20:8.1f} "
                  f"{diff:>13s} {moved:>10s} {host:>24s}")  # fmt: skip


def _write_json(out: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    """The result file, rewritten after every row (``complete`` False until the last: a run cut short
    keeps the rows it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": dict(meta, complete=complete), "rows": rows}, indent=1))


def _row_sync(watchdog: dist.ProcessGroup, name: str, timeout_s: float) -> None:
    """Wait for every rank to finish row ``name``; exit at once if one does not come within ``timeout_s``.
    A row that fails on some ranks only (a compile error on one) leaves the others blocked in a collective
    until NCCL's timeout; exiting lets torchrun stop them."""
    try:
        dist.monitored_barrier(group=watchdog, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        print(f"rank {dist.get_rank()}: the ranks did not all finish row {name!r} within {timeout_s:.0f} s "
              f"(a rank failed where the others did not, or hangs); stopping the run. {str(e).splitlines()[0]}",
              flush=True)  # fmt: skip
        os._exit(1)


def _init_process_group(backend: str) -> None:
    if "WORLD_SIZE" not in os.environ:  # plain `python benchmarks/fsdp2.py`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/fsdp2_<gpu>_x<world>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=3, help="steps compared with the unsharded run (0: none)")
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only the rows matching one")
    parser.add_argument("--profile", action="store_true", help="print rank 0's top host ops and GPU kernels of a step")
    parser.add_argument("--trace-dir", default=None, help="with --profile: each row's step as a gzipped Chrome trace")
    parser.add_argument("--no-compile", action="store_true", help="eager blocks")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help="global batch in sequences, split over the ranks (the anchor: %(default)s); more "
                             "makes the step GPU-bound rather than host-bound")  # fmt: skip
    parser.add_argument("--no-reshard", action="store_true",
                        help="fully_shard(reshard_after_forward=False): blocks stay unsharded from forward to backward "
                             "(no all-gather in the backward; more memory); writes ..._noreshard.json")  # fmt: skip
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, tiny model, eager, 2 steps")
    parser.add_argument("--row-sync-timeout", type=float, default=180.0,
                        help="seconds the ranks wait for each other after a row; a rank that does not come (it "
                             "failed where the others did not, or hangs) stops the run instead of a 5-minute "
                             "collective timeout")  # fmt: skip
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, sizes, compiled = torch.device("cpu"), SMOKE, False
        args.steps, args.warmup = 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("fsdp2.py needs CUDA GPUs (or --cpu-smoke)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        sizes, compiled = dict(dim=DIM, hidden=HIDDEN, blocks=BLOCKS, seq=SEQ), not args.no_compile
    _init_process_group("gloo" if device.type == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch < 1 or args.batch % world:
        raise SystemExit(f"--batch {args.batch}: the global batch must be a positive multiple of the {world} ranks")
    setup = Setup(device, sizes, compiled, args.steps, args.warmup, args.check_steps, args.profile, args.trace_dir,
                  args.batch, reshard=not args.no_reshard)  # fmt: skip
    try:
        import triton

        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if rank == 0:
            print(f"{gpu} x{world} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}"
                  f" | sizes {sizes} batch {setup.batch} | {'compiled' if compiled else 'eager'} blocks"
                  f" | reshard_after_forward={setup.reshard}")  # fmt: skip
        wanted = [w for w in args.only.split("|") if w]
        # a CPU group with its own timeout: the rows' collectives run on the default group (NCCL on GPUs)
        watchdog = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.row_sync_timeout))
        meta = {"gpu": gpu, "world": world, "torch": torch.__version__, "triton": triton.__version__,
                "date": str(datetime.date.today()), "python": platform.python_version(), "sizes": sizes,
                "batch": setup.batch, "compiled": compiled, "lr": LR,
                "reshard_after_forward": setup.reshard}  # fmt: skip
        batch = "" if setup.batch == BATCH else f"_b{setup.batch}"  # the anchor's file stays the anchor's
        batch += "" if setup.reshard else "_noreshard"
        out = Path(args.out) / f"fsdp2_{gpu.replace(' ', '_')}_x{world}{batch}.json"
        rows = []
        for name, row in ROWS.items():
            if not wanted or any(w in name for w in wanted):
                rows.append(run_row(name, row, setup))
                if rank == 0:  # progress, and the figures of a run cut short
                    print(json.dumps({k: v for k, v in rows[-1].items() if "losses" not in k}), flush=True)
                    if args.json:
                        _write_json(out, meta, rows, complete=False)
                _row_sync(watchdog, name, args.row_sync_timeout)
        if rank == 0:
            print_tables(rows, world)
            for r in rows:
                if "top" in r:
                    print(f"\n{r['run']}: one step on rank 0, GPU kernels {r['top']['gpu_total_ms']:.2f} ms")
                    for what in ("cpu_ms", "gpu_ms"):
                        for name, count, ms in r["top"][what]:
                            print(f"  {what[:3]} {ms:8.2f} ms {count:5d}x  {name}")
            if args.json:
                _write_json(out, meta, rows, complete=True)
                print(f"wrote {out}")
        return rows
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
