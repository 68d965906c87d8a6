"""Training step: ms/step and peak memory of INT8 training vs bf16, torchao and bitsandbytes.

The anchor model: 8 Llama MLP blocks (RMSNorm -> gate/up Linear 2048->5632 -> SiLU*up -> down
Linear 5632->2048, residual; 277M parameters), input [4, 2048, 2048] bf16, loss = mean square of the
output; one step = forward + backward + optimizer step. Mean ms/step of 10 steps after 3 warm-ups,
peak `torch.cuda.max_memory_allocated`. Every row runs in this one process, one after the other.
A second table times the model's matmuls alone (TFLOP/s). Quantized rows also report how many
quantframe Triton kernels one step launched (profiler: INT8 GEMMs, (de)quantization, the fused
optimizer step), to show the quantized path really runs. The micro-tables time each call under a
CUDA graph (the GPU's time, launch overhead removed) with the eager time beside it.

    python benchmarks/train_step.py            # needs a CUDA GPU
    python benchmarks/train_step.py --json     # also writes benchmarks/results/train_step_<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DIM, HIDDEN, BLOCKS, BATCH, SEQ = 2048, 5632, 8, 4, 2048


class MLPBlock(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = HIDDEN):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):  # x: [B, T, D]
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def anchor_model(device="cuda", dim: int = DIM, hidden: int = HIDDEN, blocks: int = BLOCKS) -> nn.Module:
    """The anchor model (smaller with other sizes), seed 0, bf16."""
    torch.manual_seed(0)
    return nn.Sequential(*[MLPBlock(dim, hidden) for _ in range(blocks)]).to(device, torch.bfloat16)


# ---- the rows: name -> setup(model) returning (step function, optimizer) ---------------------
def _step_fn(model: nn.Module, opt, compiled: bool) -> Callable[[torch.Tensor], float]:
    run = torch.compile(model) if compiled else model

    def step(x, marks: list | None = None):
        loss = run(x).float().square().mean()
        if marks is not None:  # host clock after each phase (no sync: where the host is, not the GPU)
            marks.append(time.perf_counter())
        loss.backward()
        if marks is not None:
            marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if marks is not None:
            marks.append(time.perf_counter())
        return loss

    return step


def bf16(compiled):
    def setup(m):
        return _step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), compiled)

    return setup


def quantframe_qt(compiled, optim="AdamW", mixed=False, qt_weights=True, state_dtype=None):
    """state_dtype=None: moments in each parameter's dtype (bf16 here), as torch's and torchao's AdamW."""

    def setup(m):
        import quantframe
        import quantframe.optim

        if mixed:
            quantframe.quantize_(m, quantframe.int8_mixed_precision_training(int8_weights=qt_weights))
        else:
            quantframe.quantize_(m, quantframe.int8_weight_only_quantized_training())
        opt = getattr(quantframe.optim, optim)(m.parameters(), lr=1e-4, state_dtype=state_dtype)
        return _step_fn(m, opt, compiled)

    return setup


def torchao_qt(m):
    from torchao.optim import _AdamW
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training
    from torchao.quantization import quantize_

    quantize_(m, int8_weight_only_quantized_training())
    return _step_fn(m, _AdamW(m.parameters(), lr=1e-4), compiled=True)


def torchao_mixed(m):
    from torchao.prototype.quantized_training import int8_mixed_precision_training
    from torchao.quantization import quantize_

    quantize_(m, int8_mixed_precision_training())
    return _step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), compiled=True)


def bnb_adamw8bit(m):
    import bitsandbytes as bnb

    return _step_fn(m, bnb.optim.AdamW8bit(m.parameters(), lr=1e-4), compiled=True)


ROWS: dict[str, Callable] = {
    "bf16, torch AdamW fused, eager": bf16(False),
    "bf16, torch AdamW fused, compiled": bf16(True),
    "torchao int8 QT + _AdamW, compiled": torchao_qt,
    "torchao int8 mixed precision, compiled": torchao_mixed,
    "bf16 + bitsandbytes AdamW8bit, compiled": bnb_adamw8bit,
    "quantframe int8 QT + AdamW, eager": quantframe_qt(False),
    "quantframe int8 QT + AdamW, compiled": quantframe_qt(True),
    "quantframe int8 QT + AdamW fp32 states, compiled": quantframe_qt(True, state_dtype=torch.float32),
    "quantframe int8 QT + AdamW8bit, eager": quantframe_qt(False, "AdamW8bit"),
    "quantframe int8 QT + AdamW8bit, compiled": quantframe_qt(True, "AdamW8bit"),
    "quantframe int8 mixed precision, eager": quantframe_qt(False, mixed=True, qt_weights=False),
    "quantframe int8 mixed precision, compiled": quantframe_qt(True, mixed=True, qt_weights=False),
    "quantframe int8 MP + int8 weights + AdamW8bit, compiled": quantframe_qt(True, "AdamW8bit", mixed=True),
}


# quantframe's Triton kernels (INT8 GEMMs, (de)quantization, the fused optimizer step)
QF_KERNELS = ("int8", "quantize", "colwise", "adamw_step")


def quantframe_kernels_per_step(step, x) -> int:
    """How many quantframe Triton kernels one step launches (profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if any(k in e.key.lower() for k in QF_KERNELS))


def top_kernels(step, x, n: int = 8) -> list[tuple[str, float]]:
    """The n kernels with the most CUDA time in one step: (name, ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 1e3
    return [("(all kernels)", total)] + [(e.key[:70], e.device_time_total / 1e3) for e in events[:n]]


def run_row(name: str, setup, warmup: int, steps: int, profile: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"run": name}
    try:
        model = anchor_model()  # built per row: a model kept alive across rows would sit in every peak
        step = setup(model)
        x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16)
        for _ in range(warmup):
            loss = step(x)
        torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
        t0 = time.perf_counter()
        marks = [t0]
        for _ in range(steps):
            step(x, marks)
        torch.cuda.synchronize()
        row["ms_per_step"] = (time.perf_counter() - t0) * 1e3 / steps
        # Host time per phase, mean over the timed steps. A phase that blocks (the launch queue
        # full, a sync) shows up long; a host far ahead of the GPU means a GPU-bound step.
        gaps = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        row["host_ms"] = {phase: sum(gaps[i::3]) / steps for i, phase in enumerate(("fwd", "bwd", "opt"))}
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["loss"] = float(loss)
        row["quantframe_kernels_per_step"] = quantframe_kernels_per_step(step, x) if "quantframe" in name else None
        if profile:
            row["top_kernels"] = top_kernels(step, x)
    except Exception as e:  # a missing peer or a failing row is reported in the table, not hidden
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    finally:
        model = step = None
        gc.collect()
        torch._dynamo.reset()
    return row


# ---- micro-tables -------------------------------------------------------------------------------
def timings(fn) -> tuple[float | None, float]:
    """(ms under a CUDA graph, ms eager), medians; None for the graph if the call cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    eager = do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        graph = do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # noqa: BLE001 - reported as a missing graph time, the eager one stands
        graph = None
    return graph, eager


def matmul_rows() -> list[dict]:

    from quantframe.kernels.int8_mm import int8_scaled_mm
    from quantframe.kernels.int8_rowwise import quantize_rowwise_int8
    from quantframe.kernels.int8_weight_mm import (
        int8_weight_mm_dense,
        int8_weight_mm_reference,
        int8_weight_mm_triton,
    )

    rows = []
    for m in (BATCH * SEQ, 2048, 256):  # the model's token count, then the small-M crossover
        for k, n in ((DIM, HIDDEN), (HIDDEN, DIM)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            q, s = quantize_rowwise_int8(w)
            x8, w8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8), q
            sx = torch.rand(m, device="cuda") / 100
            ref = int8_weight_mm_reference(x, q, s)
            for fn in (int8_weight_mm_triton, int8_weight_mm_dense):
                # outputs ~N(0, 45): 1.0 is a few bf16 ulps there (the dense path rounds W to bf16)
                torch.testing.assert_close(fn(x, q, s), ref, atol=1.0, rtol=2e-2)
            cases = {
                "bf16 mm  x @ W.T": lambda: x @ w.T,
                "bf16 mm  g @ W": lambda: g @ w,
                "torch._int_mm  x8 @ W8.T": lambda: torch._int_mm(x8, w8.T),
                "quantframe int8_scaled_mm x8 @ W8.T": lambda: int8_scaled_mm(x8, w8, sx, s),
                "quantframe int8 weight fused fwd": lambda: int8_weight_mm_triton(x, q, s),
                "quantframe int8 weight fused grad-input": lambda: int8_weight_mm_triton(g, q, s, transpose=True),
                "quantframe int8 weight dense fwd": lambda: int8_weight_mm_dense(x, q, s),
                "quantframe int8 weight dense grad-input": lambda: int8_weight_mm_dense(g, q, s, transpose=True),
            }
            if m != BATCH * SEQ:  # the crossover sweep: the weight-only paths and their bf16 baseline
                cases = {name: fn for name, fn in cases.items() if "weight" in name or name.startswith("bf16 mm  x")}
            for label, fn in cases.items():
                graph, eager = timings(fn)
                ms = graph or eager
                rows.append({"shape": f"[{m},{k}]x[{n},{k}]", "op": label, "ms": ms, "ms_eager": eager,
                             "tflops": 2 * m * n * k / ms / 1e9})  # fmt: skip
    return rows


# ---- optimizer-step micro-table -----------------------------------------------------------------
def optimizer_rows() -> list[dict]:
    """One AdamW step of one weight: torch's fused kernel on bf16 vs quantframe's fused INT8 step.

    ``floor ms``: the bytes the step must move (read + write) at this GPU's measured copy bandwidth.
    """
    from triton.testing import do_bench

    from quantframe.kernels.adamw_step import adamw_step
    from quantframe.kernels.int8_rowwise import quantize_rowwise_int8
    from quantframe.optim.state8bit import OptimState8bit

    big = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    copy_ms = do_bench(lambda: big.clone(), warmup=5, rep=50, return_mode="median")
    copy_bps = 2 * big.numel() * 4 / (copy_ms / 1e3)
    big = None  # free the 1 GiB before the rows below
    hyper = dict(lr=1e-6, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=0.5, bias_correction2=0.5)
    rows = [{"shape": "-", "op": "copy bandwidth (1 GiB clone)", "ms": copy_ms, "ms_eager": copy_ms,
             "gbps": copy_bps / 1e9, "floor_ms": copy_ms}]  # fmt: skip
    for n, k in ((HIDDEN, DIM), (DIM, HIDDEN)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        g = torch.randn_like(w) * 1e-3
        q, s = quantize_rowwise_int8(w)
        steps = [torch.tensor(1.0, device="cuda")]
        bf16_states = [torch.zeros_like(w), torch.rand_like(w) * 1e-6]
        fp32_states = [t.float() for t in bf16_states]
        s8 = [OptimState8bit.from_float(fp32_states[0], signed=True), OptimState8bit.from_float(fp32_states[1], signed=False)]
        parts8 = dict(exp_avg_scale=s8[0].scale, exp_avg_sq_scale=s8[1].scale, exp_avg_qmap=s8[0].qmap,
                      exp_avg_sq_qmap=s8[1].qmap)  # fmt: skip
        cases = {  # label: (function, bytes per element moved)
            "torch fused AdamW, bf16 weight + bf16 states": (lambda: torch._fused_adamw_(
                [w], [g], *[[t] for t in bf16_states], [], steps, lr=1e-6, beta1=0.9, beta2=0.999,
                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False), 14),  # fmt: skip
            "quantframe int8 weight + bf16 states": (lambda: adamw_step(q, s, g, *bf16_states, **hyper), 12),
            "quantframe int8 weight + fp32 states": (lambda: adamw_step(q, s, g, *fp32_states, **hyper), 20),
            "quantframe int8 weight + 8-bit states": (
                lambda: adamw_step(q, s, g, s8[0].codes.view(n, k), s8[1].codes.view(n, k), **parts8, **hyper), 8),
        }  # fmt: skip
        for label, (fn, nbytes) in cases.items():
            graph, eager = timings(fn)
            ms = graph or eager
            moved = nbytes * n * k
            rows.append({"shape": f"[{n},{k}]", "op": label, "ms": ms, "ms_eager": eager,
                         "gbps": moved / (ms / 1e3) / 1e9, "floor_ms": moved / copy_bps * 1e3})  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/train_step_<gpu>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only the rows matching one")
    parser.add_argument("--profile", action="store_true", help="also print each row's top CUDA kernels")
    parser.add_argument("--no-micro", action="store_true", help="skip the matmul and optimizer micro-tables")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("train_step.py needs a CUDA GPU")

    import triton

    gpu = torch.cuda.get_device_name()
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    for peer in ("torchao", "bitsandbytes"):
        try:
            print(f"{peer} {__import__(peer).__version__}")
        except ImportError:
            print(f"{peer}: not importable (its rows say so)")
    wanted = [w for w in args.only.split("|") if w]
    out = Path(args.out) / f"train_step_{gpu.replace(' ', '_')}.json"
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": str(datetime.date.today()),
            "python": platform.python_version()}  # fmt: skip

    def write(rows: list[dict], mm: list, opt: list, complete: bool) -> None:
        """The JSON after every row, so that a run cut short (a time limit) keeps what it measured."""
        if args.json:
            out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"meta": {**meta, "complete": complete}, "train_step": rows, "matmul": mm, "optimizer": opt}
            out.write_text(json.dumps(doc, indent=1))

    rows = []
    for name, setup in ROWS.items():
        if not wanted or any(w in name for w in wanted):
            rows.append(run_row(name, setup, args.warmup, args.steps, args.profile))
            write(rows, [], [], False)
    bf16c = "bf16, torch AdamW fused, compiled"
    ref = next((r["ms_per_step"] for r in rows if r["run"].startswith(bf16c) and "ms_per_step" in r), None)
    head = f"{'ms/step':>8s} {'x bf16c':>8s} {'peak GiB':>8s} {'qf kern':>9s} {'host ms fwd/bwd/opt':>20s}"
    print(f"\n{'run':58s} {head}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:58s} n/a  ({r['error']})")
            continue
        ratio = f"{r['ms_per_step'] / ref:.2f}x" if ref else "n/a"  # step time over bf16 compiled's
        k = r["quantframe_kernels_per_step"]
        host = "/".join(f"{v:.1f}" for v in r["host_ms"].values())
        print(f"{r['run']:58s} {r['ms_per_step']:8.2f} {ratio:>8s} {r['peak_gib']:8.2f} {'' if k is None else k:>9} "
              f"{host:>20s}")  # fmt: skip
    for r in rows:
        if r.get("top_kernels"):
            print(f"\n{r['run']}: top CUDA kernels of one step (ms)")
            for kname, ms in r["top_kernels"]:
                print(f"  {ms:8.3f}  {kname}")
    mm = opt = []
    if not args.no_micro:
        mm = matmul_rows()
        print(f"\n{'shape':24s} {'op':44s} {'ms graph':>8s} {'ms eager':>8s} {'TFLOP/s':>8s}")
        for r in mm:
            print(f"{r['shape']:24s} {r['op']:44s} {r['ms']:8.3f} {r['ms_eager']:8.3f} {r['tflops']:8.1f}")
        opt = optimizer_rows()
        print(f"\n{'weight':12s} {'optimizer step':44s} {'ms graph':>8s} {'ms eager':>8s} {'GB/s':>7s} {'floor ms':>8s}")
        for r in opt:
            print(f"{r['shape']:12s} {r['op']:44s} {r['ms']:8.3f} {r['ms_eager']:8.3f} {r['gbps']:7.0f} "
                  f"{r['floor_ms']:8.3f}")  # fmt: skip
    write(rows, mm, opt, True)
    if args.json:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
