"""Training step: ms/step and peak memory of INT8 training vs bf16, torchao and bitsandbytes.

The anchor model: 8 Llama MLP blocks (RMSNorm -> gate/up Linear 2048->5632 -> SiLU*up -> down
Linear 5632->2048, residual; 277M parameters), input [4, 2048, 2048] bf16, loss = mean square of the
output; one step = forward + backward + optimizer step. Mean ms/step of 10 steps after 3 warm-ups,
peak `torch.cuda.max_memory_allocated`. Every row runs in this one process, one after the other.
A second table times the model's matmuls alone (TFLOP/s). Quantized rows also report how many
INT8 Triton kernels one step launched (from the profiler), to show the INT8 path really runs.

    python benchmarks/train_step.py            # needs a CUDA GPU
    python benchmarks/train_step.py --json     # also writes benchmarks/results/train_step_<gpu>.json
"""

from __future__ import annotations

import argparse
import copy
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
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.gate = nn.Linear(DIM, HIDDEN, bias=False)
        self.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):  # x: [B, T, D]
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def anchor_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[MLPBlock() for _ in range(BLOCKS)]).cuda().bfloat16()


# ---- the rows: name -> setup(model) returning (step function, optimizer) ---------------------
def _step_fn(model: nn.Module, opt, compiled: bool) -> Callable[[torch.Tensor], float]:
    run = torch.compile(model) if compiled else model

    def step(x):
        loss = run(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bf16(compiled):
    def setup(m):
        return _step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), compiled)

    return setup


def quantframe_qt(compiled, optim="AdamW", mixed=False, qt_weights=True):
    def setup(m):
        import quantframe
        import quantframe.optim

        if mixed:
            quantframe.quantize_(m, quantframe.int8_mixed_precision_training(int8_weights=qt_weights))
        else:
            quantframe.quantize_(m, quantframe.int8_weight_only_quantized_training())
        return _step_fn(m, getattr(quantframe.optim, optim)(m.parameters(), lr=1e-4), compiled)

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
    "quantframe int8 QT + AdamW8bit, eager": quantframe_qt(False, "AdamW8bit"),
    "quantframe int8 QT + AdamW8bit, compiled": quantframe_qt(True, "AdamW8bit"),
    "quantframe int8 mixed precision, eager": quantframe_qt(False, mixed=True, qt_weights=False),
    "quantframe int8 mixed precision, compiled": quantframe_qt(True, mixed=True, qt_weights=False),
    "quantframe int8 MP + int8 weights + AdamW8bit, compiled": quantframe_qt(True, "AdamW8bit", mixed=True),
}


def int8_kernels_per_step(step, x) -> int:
    """How many kernels with 'int8' in their name one step launches (profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if "int8" in e.key.lower())


def run_row(name: str, setup, base: nn.Module, warmup: int, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"run": name}
    try:
        model = copy.deepcopy(base)
        step = setup(model)
        x = torch.randn(BATCH, SEQ, DIM, device="cuda", dtype=torch.bfloat16)
        for _ in range(warmup):
            loss = step(x)
        torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x)
        torch.cuda.synchronize()
        row["ms_per_step"] = (time.perf_counter() - t0) * 1e3 / steps
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["loss"] = float(loss)
        row["int8_kernels_per_step"] = int8_kernels_per_step(step, x) if "quantframe" in name else None
    except Exception as e:  # a missing peer or a failing row is reported in the table, not hidden
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    finally:
        model = step = None
        gc.collect()
        torch._dynamo.reset()
    return row


# ---- per-matmul micro-table ------------------------------------------------------------------
def matmul_rows() -> list[dict]:
    from triton.testing import do_bench

    from quantframe.kernels.int8_rowwise import quantize_rowwise_int8
    from quantframe.kernels.int8_weight_mm import int8_weight_mm, int8_weight_mm_reference

    m = BATCH * SEQ
    rows = []
    for k, n in ((DIM, HIDDEN), (HIDDEN, DIM)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, s = quantize_rowwise_int8(w)
        x8, w8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8), q
        torch.testing.assert_close(int8_weight_mm(x, q, s), int8_weight_mm_reference(x, q, s), atol=0.5, rtol=2e-2)
        cases = {
            "bf16 mm  x @ W.T": lambda: x @ w.T,
            "bf16 mm  g @ W": lambda: g @ w,
            "torch._int_mm  x8 @ W8.T": lambda: torch._int_mm(x8, w8.T),
            "quantframe int8_weight_mm fwd": lambda: int8_weight_mm(x, q, s),
            "quantframe int8_weight_mm grad-input": lambda: int8_weight_mm(g, q, s, transpose=True),
        }
        try:
            from quantframe.kernels.int8_mm import int8_scaled_mm

            sx = torch.rand(m, device="cuda") / 100
            cases["quantframe int8_scaled_mm x8 @ W8.T"] = lambda: int8_scaled_mm(x8, w8, sx, s)
        except ImportError:
            pass
        for label, fn in cases.items():
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append({"shape": f"[{m},{k}]x[{n},{k}]", "op": label, "ms": ms, "tflops": 2 * m * n * k / ms / 1e9})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/train_step_<gpu>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="comma list of substrings: run only matching rows")
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
    base = anchor_model()
    wanted = [w for w in args.only.split(",") if w]
    rows = [
        run_row(name, setup, base, args.warmup, args.steps)
        for name, setup in ROWS.items()
        if not wanted or any(w in name for w in wanted)
    ]
    ref = next((r["ms_per_step"] for r in rows if r["run"].startswith("bf16, torch AdamW fused, compiled") and "ms_per_step" in r), None)
    print(f"\n{'run':58s} {'ms/step':>8s} {'vs bf16c':>8s} {'peak GiB':>8s} {'int8 kern':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:58s} n/a  ({r['error']})")
            continue
        speed = f"{ref / r['ms_per_step']:.2f}x" if ref else "n/a"
        k = r["int8_kernels_per_step"]
        print(f"{r['run']:58s} {r['ms_per_step']:8.2f} {speed:>8s} {r['peak_gib']:8.2f} {'' if k is None else k:>9}")
    mm = matmul_rows()
    print(f"\n{'shape':24s} {'op':40s} {'ms':>7s} {'TFLOP/s':>8s}")
    for r in mm:
        print(f"{r['shape']:24s} {r['op']:40s} {r['ms']:7.3f} {r['tflops']:8.1f}")
    if args.json:
        out = Path(args.out) / f"train_step_{gpu.replace(' ', '_')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": str(datetime.date.today()),
                "python": platform.python_version()}  # fmt: skip
        out.write_text(json.dumps({"meta": meta, "train_step": rows, "matmul": mm}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
