"""Ternary (BitNet b1.58): 2-bit matmul latency and one training step, vs bf16 and torchao.

Two tables, every row in this one process, one after the other:

1. ``y = x[M, 4096] @ W[14336, 4096].T`` (an MLP up/gate projection), M = 1 and 16 (decode) and
   4096 (prefill). Rows: bf16 ``F.linear``; quantframe :class:`~quantframe.TernaryWeight` (packed
   2-bit codes, INT8 per-token activations; eager and ``torch.compile(dynamic=False)``); torchao
   0.17's ``BitNetPacked2bitLinearWeight`` (its FSDP2 all-gather container, which also has an
   ``F.linear``: unpack to int8, INT8 tensor-core matmul; eager and compiled). Each row is first
   checked against its own fp32 reference: bf16 against ``x.float() @ W.float().T``, the ternary
   rows against ``quantframe.kernels.ternary_mm.ternary_mm_reference`` (the exact BitNet product);
   the relative error of the output norm must stay under the row's bound (``FORMATS``), else the
   row is marked ``FAIL`` and still timed. Timings come from ``linear_latency.Timer``: eager
   ``do_bench`` medians, and for M <= 16 ``do_bench_cudagraph`` medians with L2 flushed between
   calls. ``floor µs``: the row's weight bytes (bf16: 2 a weight; ternary: ``N * ceil(K / 4)``
   packed bytes + the fp32 scale) at the measured copy bandwidth of a 1 GiB clone.
2. One training step (forward + backward + optimizer) of ``train_step.py``'s anchor model (8 Llama
   MLP blocks, 277M parameters, input [4, 2048, 2048] bf16), with ``train_step.run_row``: mean
   ms/step of 10 steps after 3 warm-ups and peak ``max_memory_allocated``. Rows: bf16 with torch's
   fused AdamW (compiled); quantframe ``bitnet_training()`` + ``quantframe.optim.AdamW(state_dtype=None)``
   (moments in the weight's dtype, bf16, as torch's), eager and compiled; torchao's
   ``bitnet_training()`` + torch's fused AdamW (compiled), the optimizer torchao's own test uses.

A peer that is not importable gets ``n/a (skipped: ...)`` rows, never dropped.

    python benchmarks/ternary.py                 # needs a CUDA GPU
    python benchmarks/ternary.py --json          # also writes benchmarks/results/ternary_<gpu>.json
    python benchmarks/ternary.py --part latency --only "bf16|quantframe" --m 1,16
    python benchmarks/ternary.py --cpu-smoke     # quantframe rows on CPU, tiny sizes, no timings
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# isort: split
# sibling scripts (`python benchmarks/ternary.py` puts benchmarks/ on sys.path)
from linear_latency import Timer, copy_bandwidth, print_table
from train_step import _step_fn, bf16, run_row

N, K = 14336, 4096  # W [N, K], nn.Linear layout
MS = (1, 16, 4096)
GRAPH_MAX_M = 16

# format: (bits per weight, bound on the output's relative error vs the row's own fp32 reference).
# bf16 and quantframe differ from their reference by the bf16 rounding of the output (~0.3%);
# torchao rounds the activation scale to bf16 first, so a few codes and every scale differ (<1%).
FORMATS = {"bf16": (16.0, 0.01), "ternary": (2.0, 0.01), "ternary, bf16 scales": (2.0, 0.03)}


# ---- 1. latency rows: W [N, K] bf16 -> (x [M, K] -> y [M, N]) --------------------------------------
@dataclass(frozen=True)
class Row:
    fmt: str  # key of FORMATS
    build: Callable[[Tensor], Callable[[Tensor], Tensor]]
    peer: str | None = None  # package the row needs


def _frozen_linear(weight: Tensor, k: int, n: int) -> nn.Linear:
    with torch.device("meta"):  # no init of a throwaway weight
        lin = nn.Linear(k, n, bias=False)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _compile(module: nn.Module, compiled: bool) -> Callable[[Tensor], Tensor]:
    return torch.compile(module, dynamic=False) if compiled else module


def bf16_linear(w: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, w)


def quantframe_ternary(compiled: bool) -> Callable:
    def build(w):
        from quantframe import TernaryWeight

        return _compile(_frozen_linear(TernaryWeight.from_float(w), w.shape[1], w.shape[0]), compiled)

    return build


def torchao_packed(compiled: bool) -> Callable:
    """torchao's 2-bit BitNet weight, as its FSDP2 all-gather builds it (fsdp_post_all_gather)."""

    def build(w):
        from torchao.prototype.quantized_training.bitnet import (
            BitNetPacked2bitLinearWeight,
            _pack_i2_in_i8,  # private, but the only way torchao packs (fsdp_pre_all_gather uses it)
            get_bitnet_scale,
            quantize_bitnet_weight,
        )

        scale = get_bitnet_scale(w)  # fp32 absmean, as quantframe's
        packed = _pack_i2_in_i8(quantize_bitnet_weight(w, scale))
        weight = BitNetPacked2bitLinearWeight(packed, scale.to(w.dtype))  # scale dtype = output dtype
        return _compile(_frozen_linear(weight, w.shape[1], w.shape[0]), compiled)

    return build


LATENCY_ROWS: dict[str, Row] = {
    "bf16 F.linear": Row("bf16", bf16_linear),
    "quantframe TernaryWeight, eager": Row("ternary", quantframe_ternary(False), "quantframe"),
    "quantframe TernaryWeight, compiled": Row("ternary", quantframe_ternary(True), "quantframe"),
    "torchao BitNetPacked2bitLinearWeight, eager": Row("ternary, bf16 scales", torchao_packed(False), "torchao"),
    "torchao BitNetPacked2bitLinearWeight, compiled": Row("ternary, bf16 scales", torchao_packed(True), "torchao"),
}


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if not lines:  # a bare assert in a peer: name where it fired
        tb = traceback.extract_tb(e.__traceback__)
        lines = [f"at {Path(tb[-1].filename).name}:{tb[-1].lineno} {tb[-1].line}" if tb else ""]
    return f"{type(e).__name__}: {lines[0][:110]}"


def peer_note(peer: str | None) -> str | None:
    """None if ``peer`` imports, else why the row is skipped."""
    if peer is None or peer == "quantframe":
        return None
    try:
        __import__(peer)
    except Exception as e:  # noqa: BLE001 - any import failure means the peer's rows are skipped
        return f"skipped: {peer} not importable ({_error(e)})"
    return None


def weight_bytes(fmt: str, n: int, k: int) -> int:
    # ternary: TernaryWeight.packed [N, ceil(K / 4)] uint8 + one fp32 scale
    return n * k * 2 if fmt == "bf16" else n * -(-k // 4) + 4


def latency_rows(n: int, k: int, ms: list[int], rows: dict[str, Row], device: str, timer) -> list[dict]:
    from quantframe.kernels.ternary_mm import ternary_mm_reference

    from quantframe import TernaryWeight

    gen = torch.Generator(device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).bfloat16()  # outputs ~ N(0, 1)
    xs = {m: torch.randn(m, k, generator=gen, device=device).bfloat16() for m in ms}
    tw = TernaryWeight.from_float(w)
    refs = {  # fmt "bf16": the dense product; else the exact BitNet product of the same codes and scale
        m: {"bf16": x.float() @ w.float().T, "ternary": ternary_mm_reference(x.float(), tw.packed, tw.scale)}
        for m, x in xs.items()
    }
    results = []
    for name, row in rows.items():
        base = {"shape": [n, k], "run": name, "format": row.fmt}
        note = peer_note(row.peer)
        try:
            fn = None if note else row.build(w)
        except Exception as e:  # noqa: BLE001 - an API mismatch: the row says so, the table prints
            note = _error(e)
        for m, x in xs.items():
            r = {**base, "m": m}
            if note:
                results.append({**r, "error": note})
                continue
            try:
                with torch.no_grad():
                    y = fn(x)  # first call: compiles, autotunes
                    ref = refs[m]["bf16" if row.fmt == "bf16" else "ternary"]
                    if y.shape != ref.shape or y.dtype != torch.bfloat16:
                        raise RuntimeError(f"output is {y.dtype} {list(y.shape)}, expected bf16 {list(ref.shape)}")
                    r["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                    r["check_ok"] = math.isfinite(r["rel_err"]) and r["rel_err"] <= FORMATS[row.fmt][1]
                    if timer is not None:
                        r.update(timer(fn, x))
            except Exception as e:  # noqa: BLE001 - printed in the table
                r["error"] = _error(e)
            results.append(r)
        fn = None
        gc.collect()  # the row's weight and compiled graphs go before the next row
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def print_latency(n: int, k: int, results: list[dict], bandwidth: float | None) -> None:
    if bandwidth:
        print(f"\nbandwidth floor: bf16 {weight_bytes('bf16', n, k) / bandwidth * 1e6:.1f} µs, "
              f"2-bit packed {weight_bytes('ternary', n, k) / bandwidth * 1e6:.1f} µs")  # fmt: skip
    print_table(n, k, results, bandwidth, weight_bytes=weight_bytes, width=48)


# ---- 2. training-step rows: setup(model) -> step function, as train_step.ROWS ----------------------
def quantframe_bitnet(compiled: bool) -> Callable:
    def setup(m):
        import quantframe
        import quantframe.optim

        quantframe.quantize_(m, quantframe.bitnet_training())
        _check_bitnet(m, quantframe.BitNetTrainingLinearWeight)
        opt = quantframe.optim.AdamW(m.parameters(), lr=1e-4, state_dtype=None)  # bf16 moments, as torch's
        return _step_fn(m, opt, compiled)

    return setup


def torchao_bitnet(m):
    from torchao.prototype.quantized_training import BitNetTrainingLinearWeight, bitnet_training
    from torchao.quantization import quantize_

    quantize_(m, bitnet_training())
    _check_bitnet(m, BitNetTrainingLinearWeight)
    # torchao's own bitnet test trains with torch.optim.AdamW: its weight unwraps every aten op
    return _step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), compiled=True)


def _check_bitnet(model: nn.Module, cls: type) -> None:
    # quantize_ skips what it cannot take: a dense model must not pass as a BitNet one
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    dense = [i for i, mod in enumerate(linears) if not isinstance(mod.weight, cls)]
    if not linears or dense:
        raise RuntimeError(f"{len(dense)} of {len(linears)} nn.Linear weights are not {cls.__name__}")


TRAIN_ROWS: dict[str, tuple[Callable, str | None]] = {  # name: (setup, peer)
    "bf16, torch AdamW fused, compiled": (bf16(True), None),
    "quantframe BitNet + AdamW, eager": (quantframe_bitnet(False), "quantframe"),
    "quantframe BitNet + AdamW, compiled": (quantframe_bitnet(True), "quantframe"),
    "torchao BitNet + torch AdamW fused, compiled": (torchao_bitnet, "torchao"),
}


def train_rows(rows: dict[str, tuple[Callable, str | None]], warmup: int, steps: int, profile: bool) -> list[dict]:
    out = []
    for name, (setup, peer) in rows.items():
        note = peer_note(peer)
        out.append({"run": name, "error": note} if note else run_row(name, setup, warmup, steps, profile))
    return out


def print_train(rows: list[dict]) -> None:
    ref = next((r["ms_per_step"] for r in rows if r["run"].startswith("bf16") and "ms_per_step" in r), None)
    print(
        f"\n{'one training step of the anchor model':48s} {'ms/step':>8s} {'vs bf16c':>8s} {'peak GiB':>8s} {'loss':>7s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['run']:48s} n/a  ({r['error']})")
            continue
        speed = f"{ref / r['ms_per_step']:.2f}x" if ref else "n/a"
        print(f"{r['run']:48s} {r['ms_per_step']:8.2f} {speed:>8s} {r['peak_gib']:8.2f} {r['loss']:7.4f}")
    for r in rows:
        if r.get("top_kernels"):
            print(f"\n{r['run']}: top CUDA kernels of one step (ms)")
            for kname, ms in r["top_kernels"]:
                print(f"  {ms:8.3f}  {kname}")


# ---- --cpu-smoke ---------------------------------------------------------------------------------
def _tiny_model(dim: int = 64, hidden: int = 160, blocks: int = 2) -> nn.Module:
    """train_step's MLP blocks at CPU size (RMSNorm, gate/up, SiLU * up, down; no residual)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [
            nn.RMSNorm(dim),
            nn.Linear(dim, 2 * hidden, bias=False),
            nn.SiLU(),
            nn.Linear(2 * hidden, dim, bias=False),
        ]
    return nn.Sequential(*layers).bfloat16()


def cpu_smoke(only: list[str]) -> None:
    """Latency rows (bf16 and quantframe) checked on CPU at [256, 512], then 3 training steps of a
    tiny model per training row: API mistakes surface here, no timing claims."""
    wanted = lambda name: not only or any(w in name for w in only)
    rows = {name: row for name, row in LATENCY_ROWS.items() if row.peer in (None, "quantframe") and wanted(name)}
    results = latency_rows(256, 512, [1, 16, 33], rows, "cpu", timer=None)
    print_latency(256, 512, results, bandwidth=None)
    bad = [r["run"] for r in results if "error" in r or not r["check_ok"]]
    for name, (setup, peer) in TRAIN_ROWS.items():
        if peer not in (None, "quantframe") or not wanted(name):
            continue
        try:
            model = _tiny_model()
            step = setup(model)
            x = torch.randn(4, 8, 64, dtype=torch.bfloat16)
            losses = [float(step(x).detach()) for _ in range(3)]
            ok = all(math.isfinite(v) for v in losses) and losses[-1] != losses[0]
            print(f"train  {name:48s} losses {' '.join(f'{v:.5f}' for v in losses)}  {'ok' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001 - counted as a failing row below
            ok = False
            print(f"train  {name:48s} n/a  ({_error(e)})")
        if not ok:
            bad.append(name)
        torch._dynamo.reset()
    if bad:
        raise SystemExit(f"cpu smoke: {len(bad)} failing rows: {sorted(set(bad))}")
    print("cpu smoke: every quantframe row built, ran and passed its check (no timings on CPU)")


# ---- main ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/ternary_<gpu>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--part", choices=("all", "latency", "train"), default="all")
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only the rows matching one")
    parser.add_argument("--m", default=",".join(map(str, MS)), help="token counts M, comma-separated")
    parser.add_argument("--warm-l2", action="store_true", help="graph timings without the L2 flush between calls")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print each training row's top CUDA kernels")
    parser.add_argument("--cpu-smoke", action="store_true", help="quantframe rows on CPU at tiny sizes, no timings")
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split("|") if w]
    if args.cpu_smoke:
        return cpu_smoke(wanted)
    if not torch.cuda.is_available():
        raise SystemExit(
            "ternary.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            "(--cpu-smoke checks the quantframe rows on CPU without timings)"
        )

    import triton

    gpu = torch.cuda.get_device_name()
    versions = {p: (peer_note(p) or __import__(p).__version__) for p in ("quantframe", "torchao")}
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    print(" | ".join(f"{p} {v}" for p, v in versions.items()))
    latency, bandwidth, train = [], None, []
    out = Path(args.out) / f"ternary_{gpu.replace(' ', '_')}.json"

    def write(complete: bool) -> None:
        """The JSON after each part, so that a run cut short (a time limit) keeps what it measured."""
        if args.json:
            out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, **versions,
                    "date": str(datetime.date.today()), "python": platform.python_version(),
                    "copy_gbps": bandwidth / 1e9 if bandwidth else None, "l2_flush": not args.warm_l2,
                    "formats": {f: {"bits": b, "bound": t} for f, (b, t) in FORMATS.items()},
                    "complete": complete}  # fmt: skip
            out.write_text(json.dumps({"meta": meta, "latency": latency, "train_step": train}, indent=1))

    if args.part in ("all", "latency"):
        bandwidth = copy_bandwidth()
        timer = Timer(args.warm_l2, GRAPH_MAX_M)
        rows = {name: row for name, row in LATENCY_ROWS.items() if not wanted or any(w in name for w in wanted)}
        latency = latency_rows(N, K, [int(v) for v in args.m.split(",") if v], rows, "cuda", timer)
        print_latency(N, K, latency, bandwidth)
        write(False)
    if args.part in ("all", "train"):
        rows = {name: row for name, row in TRAIN_ROWS.items() if not wanted or any(w in name for w in wanted)}
        train = train_rows(rows, args.warmup, args.steps, args.profile)
        print_train(train)
    write(True)
    if args.json:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
