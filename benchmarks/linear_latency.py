"""One quantized linear at decode and prefill: µs per call vs bf16, torchao, bitsandbytes, gemlite.

``y = x[M, K] @ W[N, K].T`` in bf16 for W [14336, 4096] (an MLP up/gate projection) and
[4096, 4096] (an attention projection), M = 1 and 16 (decode) and 4096 (prefill); one table
per shape. Rows: bf16 ``F.linear``; torchao 0.17 (int8 weight-only, W8A8, NF4, int4 g128 on the
tinygemm kernel; all under ``torch.compile``); bitsandbytes (LLM.int8 ``Linear8bitLt(threshold=6)``,
NF4 ``Linear4bit``); gemlite (int8 and int4 g128 weight-only, W8A8; Triton, called as is); every
quantframe format (int8 weight-only, int4 g128, W8A8, LLM.int8, NF4), eager and compiled, and
its fused Triton kernels called directly (int8, int4, NF4: the fused GEMM the dispatcher skips from
17 rows on, to show that crossover).

Each row is first checked against an fp32 reference ``x.float() @ W.float().T``: the relative
error of the output norm must stay under its format's bound (``FORMATS``); a row over it is
marked ``FAIL`` but still timed. Then, every column in this one process:

* ``eager µs``: ``triton.testing.do_bench`` median (L2 flushed before each call; launch and
  Python dispatch overhead included, which is what small-M eager calls mostly are);
* ``graph µs`` (M <= 16): ``triton.testing.do_bench_cudagraph`` median with no launch overhead.
  do_bench_cudagraph replays the call back to back, so a weight that fits in L2 (50 MB on H100:
  every 8- and 4-bit 4096x4096 weight) would be read from L2, not HBM. So each captured call is
  preceded by a read of a 2x-L2 buffer, and the time of that read alone is subtracted
  (``--warm-l2`` drops the flush). A call that cannot be captured (a host sync, a host-to-device
  copy) gets ``n/a`` and a note under the table;
* ``floor µs``: the format's weight bytes (nominal bits per weight, ``FORMATS``) at this GPU's
  measured copy bandwidth (a 1 GiB clone: read + write). Activation bytes are not counted.

Compiled rows use ``torch.compile(dynamic=False)`` (one static graph per M, as a decode loop
would) with torch's default inductor settings for every row: torchao configs get
``set_inductor_config=False`` so their global tweaks do not leak into later rows;
``--tuned-inductor`` applies torchao's recommended settings to every compiled row instead.

    python benchmarks/linear_latency.py                    # needs a CUDA GPU
    python benchmarks/linear_latency.py --json             # also writes results/linear_latency_<gpu>.json
    python benchmarks/linear_latency.py --only "bf16|quantframe int4" --m 1,16 --shapes 4096x4096
    python benchmarks/linear_latency.py --json --merge --shapes 4096x4096   # add a shape to the existing file
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SHAPES = ((14336, 4096), (4096, 4096))  # (N, K): W [N, K], nn.Linear layout
MS = (1, 16, 4096)
GRAPH_MAX_M = 16  # CUDA-graph timings only where launch overhead matters: decode

# format: (nominal bits per weight incl. scales, bound on the output's relative error vs fp32).
# Bounds for x ~ N(0, 1), W ~ N(0, 1/K): int8 rows ~1% (+1% for int8 activations), 4-bit ~9-10%;
# a wrong layout or transpose gives ~140%.
FORMATS = {
    "bf16": (16.0, 0.01),
    "int8": (8.0, 0.03),  # one scale per row: + 32 / K bits, not counted
    "w8a8": (8.0, 0.05),
    "llm.int8": (8.0, 0.05),
    "int4 g128": (4.25, 0.15),  # + bf16 scale and zero per 128 (quantframe keeps fp32 + int32: 4.5)
    "nf4": (4.127, 0.15),  # + int8 absmax per 64, fp32 per 64*256 (double quantization)
}


@dataclass(frozen=True)
class Row:
    fmt: str  # key of FORMATS
    build: Callable[[Tensor], Callable[[Tensor], Tensor]]  # W [N, K] bf16 -> (x [M, K] -> y [M, N])
    peer: str | None = None  # the package a row needs; its version goes in the header and --json


# ---- the rows: one small builder per peer API (one place to fix a mismatch) --------------------
def _dense_linear(w: Tensor) -> nn.Linear:
    with torch.device("meta"):  # no init of a throwaway weight
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    return lin


def _check_quantized(weight: Tensor, who: str) -> None:
    # quantize_ skips a module it cannot take (and says so in a log line): a dense row must not pass as quantized
    if type(weight) in (torch.Tensor, nn.Parameter):
        raise RuntimeError(f"{who} left the weight dense ({weight.dtype})")


def _compile(module: nn.Module) -> Callable[[Tensor], Tensor]:
    return torch.compile(module, dynamic=False)


def bf16_linear(w: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, w)


def quantframe_linear(factory: str, compiled: bool, **kwargs) -> Callable:
    def build(w):
        import quantframe

        lin = _dense_linear(w)
        quantframe.quantize_(lin, getattr(quantframe, factory)(**kwargs))
        _check_quantized(lin.weight, f"quantframe.quantize_({factory})")
        return _compile(lin) if compiled else lin

    return build


def torchao_linear(config: str, **kwargs) -> Callable:
    """torchao.quantization.quantize_(linear, <config>(...)), then torch.compile (how torchao is used)."""

    def build(w):
        import torchao.quantization as tq

        lin = _dense_linear(w)
        tq.quantize_(lin, getattr(tq, config)(set_inductor_config=False, **kwargs))
        _check_quantized(lin.weight, f"torchao quantize_({config})")
        return _compile(lin)

    return build


def torchao_nf4(w: Tensor) -> Callable[[Tensor], Tensor]:
    from torchao.dtypes.nf4tensor import to_nf4  # block 64, scaler block 256: QLoRA's (and ours)

    lin = _dense_linear(w)
    lin.weight = nn.Parameter(to_nf4(w), requires_grad=False)  # torchtune's FrozenNF4Linear does this
    return _compile(lin)


def bnb_llm_int8(w: Tensor) -> Callable[[Tensor], Tensor]:
    import bitsandbytes as bnb

    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    lin.weight.data = w.detach().cpu()
    return lin.to(w.device)  # Int8Params quantizes on the move to the GPU (int8 rows + absmax)


def bnb_nf4(w: Tensor) -> Callable[[Tensor], Tensor]:
    import bitsandbytes as bnb

    # compress_statistics=True (the default): double-quantized absmax, as QLoRA and quantframe's NF4
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight.data = w.detach().cpu()  # bf16: Params4bit quantizes the bf16 weight on the move
    return lin.to(w.device)


def _int4_asymmetric(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 codes [N, K] in 0..15, scale and zero [N, K // g] in w.dtype: w ~ (code - zero) * scale."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = (-lo / scale).round()  # integer zero point: 0.0 is on the grid
    codes = (g / scale + zero).round().clamp(0, 15).to(torch.uint8).reshape(w.shape)
    return codes, scale.squeeze(-1).to(w.dtype), zero.squeeze(-1).to(w.dtype)


def gemlite_linear(kind: str) -> Callable:
    """gemlite.helper processors; the GemLiteLinearTriton they return is called as is (a custom op)."""

    def build(w):
        import gemlite  # noqa: F401 - loads the per-GPU autotune cache (configs/h100.json)
        from gemlite import helper

        dev = str(w.device)
        if kind == "int8":
            return helper.A16W8_INT8(device=dev, dtype=torch.bfloat16).from_weights(w)
        if kind == "w8a8":
            return helper.A8W8_int8_dynamic(device=dev, dtype=torch.bfloat16).from_weights(w)
        codes, scale, zero = _int4_asymmetric(w, 128)  # HQQ layout: W = (W_q - zeros) * scales
        return helper.A16W4_HQQ_INT(device=dev, dtype=torch.bfloat16).from_weights(codes, scale, zero)

    return build


def quantframe_fused(fmt: str) -> Callable:
    """quantframe's fused Triton kernels called directly (GEMV up to 16 rows, the fused GEMM above),
    past the dispatcher, which takes dequantize + cuBLAS from 17 rows on: the crossover its
    ``DENSE_MIN_ROWS`` is set by (run with ``--m 17,64,256,1024,4096``)."""

    def build(w):
        import quantframe

        factory, kwargs = _QF_FORMATS[fmt]
        lin = _dense_linear(w)
        quantframe.quantize_(lin, getattr(quantframe, factory)(**kwargs))
        q = lin.weight
        _check_quantized(q, f"quantframe.quantize_({factory})")
        if fmt == "nf4":
            from quantframe.kernels.nf4_mm import nf4_mm_triton
            from quantframe.nf4 import _level_table

            scales, levels = q.block_scales(), _level_table(q.device)  # once, as the layer's call does
            return lambda x: nf4_mm_triton(x, q.codes, scales, levels, q.block_size)
        from quantframe.kernels.affine_mm import affine_mm_triton

        return lambda x: affine_mm_triton(x, q.qdata, q.scale, q.zero_point, q.bits, q.group_size)

    return build


_QF_FORMATS = {  # format: (factory, kwargs)
    "int8": ("int8_weight_only", {}),
    "int4 g128": ("int4_weight_only", {"group_size": 128}),
    "w8a8": ("int8_dynamic_activation_int8_weight", {}),
    "llm.int8": ("llm_int8", {"threshold": 6.0}),
    "nf4": ("nf4_weight_only", {}),
}
_QF_ROWS = {
    f"quantframe {fmt}, {mode}": Row(fmt, quantframe_linear(factory, mode == "compiled", **kwargs), "quantframe")
    for fmt, (factory, kwargs) in _QF_FORMATS.items()
    for mode in ("eager", "compiled")
}
ROWS: dict[str, Row] = {
    "bf16 F.linear": Row("bf16", bf16_linear),
    "torchao int8 weight-only, compiled": Row("int8", torchao_linear("Int8WeightOnlyConfig"), "torchao"),
    "torchao int4 g128 tinygemm, compiled": Row(
        "int4 g128",
        torchao_linear("Int4WeightOnlyConfig", group_size=128, int4_packing_format="tile_packed_to_4d"),
        "torchao",
    ),
    "torchao W8A8, compiled": Row("w8a8", torchao_linear("Int8DynamicActivationInt8WeightConfig"), "torchao"),
    "torchao NF4, compiled": Row("nf4", torchao_nf4, "torchao"),
    "bitsandbytes LLM.int8 (threshold 6)": Row("llm.int8", bnb_llm_int8, "bitsandbytes"),
    "bitsandbytes NF4 (Linear4bit)": Row("nf4", bnb_nf4, "bitsandbytes"),
    "gemlite int8 weight-only (A16W8)": Row("int8", gemlite_linear("int8"), "gemlite"),
    "gemlite int4 g128 (A16W4 HQQ layout)": Row("int4 g128", gemlite_linear("int4"), "gemlite"),
    "gemlite W8A8 (A8W8 int8 dynamic)": Row("w8a8", gemlite_linear("w8a8"), "gemlite"),
    **_QF_ROWS,
    **{f"quantframe {fmt}, fused Triton kernels": Row(fmt, quantframe_fused(fmt), "quantframe")
       for fmt in ("int8", "int4 g128", "nf4")},
}  # fmt: skip
PEERS = ("torchao", "bitsandbytes", "gemlite")


# ---- check and time one row -----------------------------------------------------------------------
def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:110]}"


def check(y: Tensor, ref: Tensor, fmt: str) -> tuple[float, bool]:
    """(relative error of the output norm vs the fp32 reference, within the format's bound)."""
    if y.shape != ref.shape or y.dtype != torch.bfloat16:
        raise RuntimeError(f"output is {y.dtype} {list(y.shape)}, expected bf16 {list(ref.shape)}")
    err = ((y.float() - ref).norm() / ref.norm()).item()
    return err, math.isfinite(err) and err <= FORMATS[fmt][1]


class Timer:
    """eager (do_bench) and CUDA-graph (do_bench_cudagraph, L2 read between calls) medians, in µs."""

    def __init__(self, warm_l2: bool, graph_max_m: int):
        from triton.testing import do_bench, do_bench_cudagraph

        self.do_bench, self.do_bench_cudagraph = do_bench, do_bench_cudagraph
        self.graph_max_m = graph_max_m
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        # a read (not a write) evicts the weight with clean lines: no write-back competes with the call
        buf = None if warm_l2 else torch.ones(2 * l2 // 4, device="cuda")
        self.flush = (lambda: None) if buf is None else (lambda: buf.sum())
        self.flush_ms = 0.0 if buf is None else do_bench_cudagraph(self.flush, rep=100, return_mode="median")

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> dict:
        out = {"eager_us": self.do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median") * 1e3}
        if x.shape[0] > self.graph_max_m:
            return out
        try:
            ms = self.do_bench_cudagraph(lambda: (self.flush(), fn(x)), rep=100, return_mode="median")
            out["graph_us"] = (ms - self.flush_ms) * 1e3
        except Exception as e:  # noqa: BLE001 - reported as a note; the eager time stands
            out["graph_note"] = f"capture failed: {_error(e)}"
            torch.cuda.synchronize()
        return out


def run_row(name: str, row: Row, w: Tensor, xs: dict[int, Tensor], refs: dict[int, Tensor], timer) -> list[dict]:
    base = {"shape": list(w.shape), "run": name, "format": row.fmt}
    try:
        fn = row.build(w)
    except Exception as e:  # noqa: BLE001 - a missing peer or an API mismatch: the row says so, the table prints
        return [{**base, "m": m, "error": _error(e)} for m in xs]
    results = []
    for m, x in xs.items():
        r = {**base, "m": m}
        try:
            with torch.no_grad():
                r["rel_err"], r["check_ok"] = check(fn(x), refs[m], row.fmt)  # first call: compiles, autotunes
                if timer is not None:
                    r.update(timer(fn, x))
        except Exception as e:  # noqa: BLE001 - printed in the table
            r["error"] = _error(e)
        results.append(r)
    return results


def run_shape(n: int, k: int, ms: list[int], rows: dict[str, Row], device: str, timer, on_row=None) -> list[dict]:
    """Every row at W [n, k]; ``on_row(results so far)`` after each row (--json writes as it goes)."""
    gen = torch.Generator(device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).bfloat16()  # outputs ~ N(0, 1)
    xs = {m: torch.randn(m, k, generator=gen, device=device).bfloat16() for m in ms}
    refs = {m: x.float() @ w.float().T for m, x in xs.items()}
    results = []
    for name, row in rows.items():
        results += run_row(name, row, w, xs, refs, timer)
        if on_row is not None:
            on_row(results)
        gc.collect()  # the row's quantized weight and compiled graphs go before the next row
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


# ---- bandwidth floor, table, main -----------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device clone (read + write)."""
    from triton.testing import do_bench

    big = torch.empty(2**28, device="cuda", dtype=torch.float32)
    ms = do_bench(lambda: big.clone(), warmup=5, rep=50, return_mode="median")
    return 2 * big.numel() * 4 / (ms / 1e3)


def _cell(v: float | None, width: int = 9) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.1f}"


def nominal_weight_bytes(fmt: str, n: int, k: int) -> float:
    """An [n, k] weight's bytes at its format's nominal bits per weight (``FORMATS``)."""
    return n * k * FORMATS[fmt][0] / 8


def print_table(n: int, k: int, results: list[dict], bandwidth: float | None, weight_bytes=nominal_weight_bytes,
                width: int = 44) -> None:  # fmt: skip
    """One shape's rows; ``weight_bytes(format, n, k)`` gives each row's bandwidth floor."""
    print(f"\nx[M, {k}] @ W[{n}, {k}].T, bf16" + (f" | copy {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""))
    print(f"{'M':>5s}  {'run':{width}s} {'rel err':>8s} {'check':>5s} {'eager µs':>9s} {'graph µs':>9s} "
          f"{'floor µs':>9s} {'vs bf16':>8s}")  # fmt: skip
    notes = []
    for r in sorted(results, key=lambda r: r["m"]):  # stable: row order kept within each M
        if "error" in r:
            print(f"{r['m']:5d}  {r['run']:{width}s} n/a  ({r['error']})")
            continue
        floor = weight_bytes(r["format"], n, k) / bandwidth * 1e6 if bandwidth else None
        graph = "n/a" if "graph_note" in r else _cell(r.get("graph_us"))
        if "graph_note" in r:
            notes.append(f"M={r['m']} {r['run']}: graph {r['graph_note']}")
        print(f"{r['m']:5d}  {r['run']:{width}s} {r['rel_err']:8.4f} {'ok' if r['check_ok'] else 'FAIL':>5s} "
              f"{_cell(r.get('eager_us'))} {graph:>9s} {_cell(floor)} {_speedup(r, results):>8s}")  # fmt: skip
    for note in notes:
        print(f"  note: {note}")


def _speedup(r: dict, results: list[dict]) -> str:
    """bf16 time / this row's time at the same M: graph vs graph where both have one, else eager."""
    ref = next((b for b in results if b["run"] == "bf16 F.linear" and b["m"] == r["m"] and "error" not in b), None)
    if ref is None or "eager_us" not in r:
        return ""
    key = "graph_us" if "graph_us" in r and "graph_us" in ref else "eager_us"
    return f"{ref[key] / r[key]:.2f}x"


def peer_versions() -> dict[str, str]:
    versions = {}
    for peer in PEERS:
        try:
            versions[peer] = __import__(peer).__version__
        except Exception as e:  # noqa: BLE001 - gemlite probes the GPU at import; any failure = not importable
            versions[peer] = f"not importable ({_error(e)})"
    return versions


def merge_results(earlier: dict, new: dict) -> dict:
    """``--merge``: one result file from several runs (one shape a call where a call's time is short).
    ``new``'s rows replace ``earlier``'s of the same (shape, run, M), the other rows are kept; every
    row names the run that measured it (``run_index`` into ``meta["runs"]``, each run's own meta)."""
    runs = earlier["meta"].get("runs") or [{k: v for k, v in earlier["meta"].items() if k != "runs"}]
    old_rows = [{"run_index": 0, **r} for r in earlier["rows"]] if "runs" not in earlier["meta"] else earlier["rows"]
    index = len(runs)
    new_rows = [{**r, "run_index": index} for r in new["rows"]]
    redone = {(tuple(r["shape"]), r["run"], r["m"]) for r in new_rows}
    kept = [r for r in old_rows if (tuple(r["shape"]), r["run"], r["m"]) not in redone]
    meta = {k: v for k, v in new["meta"].items() if k != "runs"}
    # the file is complete when every run that went into it was
    complete = all(run.get("complete", True) for run in runs) and meta.get("complete", True)
    return {"meta": {**meta, "complete": complete, "runs": [*runs, meta]}, "rows": kept + new_rows}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]  # "NxK"


def cpu_smoke(rows: dict[str, Row]) -> None:
    """--cpu-smoke: the quantframe rows (and bf16) built and called on CPU, tiny shape, no timing
    (the fused-kernel rows need ``TRITON_INTERPRET=1``, set by ``main`` before any kernel import)."""
    rows = {name: row for name, row in rows.items() if row.peer in (None, "quantframe")}
    n, k = 256, 512  # K a multiple of 128 (int4 groups); N * K a multiple of 64 * 256 (NF4 scaler blocks)
    results = run_shape(n, k, [1, 16], rows, "cpu", timer=None)
    print_table(n, k, results, bandwidth=None)
    bad = [r["run"] for r in results if "error" in r or not r["check_ok"]]
    if bad:
        raise SystemExit(f"cpu smoke: {len(bad)} failing rows: {sorted(set(bad))}")
    print("cpu smoke: every row built, ran and passed its check (no timings on CPU)")


def set_tuned_inductor() -> None:
    """torchao's recommended_inductor_config_setter (0.17), applied to every compiled row alike."""
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.coordinate_descent_check_all_directions = True
    torch._inductor.config.force_fuse_int_mm_with_mul = True
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.triton.unique_kernel_names = True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/linear_latency_<gpu>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only the rows matching one")
    parser.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="W shapes NxK, comma-separated"
    )
    parser.add_argument("--m", default=",".join(map(str, MS)), help="token counts M, comma-separated")
    parser.add_argument("--graph-max-m", type=int, default=GRAPH_MAX_M, help="CUDA-graph timings for M up to this")
    parser.add_argument("--warm-l2", action="store_true", help="graph timings without the L2 flush between calls")
    parser.add_argument(
        "--tuned-inductor", action="store_true", help="torchao's inductor settings for all compiled rows"
    )
    parser.add_argument(
        "--merge", action="store_true", help="with --json: keep the existing file's rows that this run does not redo"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split("|") if w]
    rows = {name: row for name, row in ROWS.items() if not wanted or any(w in name for w in wanted)}
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors for the fused-kernel rows
        from quantframe.testing import patch_interpreter_loop_bounds

        patch_interpreter_loop_bounds()
        return cpu_smoke(rows)
    if not torch.cuda.is_available():
        raise SystemExit("linear_latency.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine")

    import triton

    if args.tuned_inductor:
        set_tuned_inductor()
    gpu = torch.cuda.get_device_name()
    versions = peer_versions()
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    print(" | ".join(f"{peer} {v}" for peer, v in versions.items()))
    bandwidth = copy_bandwidth()
    timer = Timer(args.warm_l2, args.graph_max_m)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s | graph timings: L2 {'warm' if args.warm_l2 else 'flushed'} | "
          f"inductor: {'torchao-tuned' if args.tuned_inductor else 'defaults'}")  # fmt: skip
    out = Path(args.out) / f"linear_latency_{gpu.replace(' ', '_')}.json"
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "quantframe": __import__("quantframe").__version__, **versions,
            "date": str(datetime.date.today()), "python": platform.python_version(),
            "copy_gbps": bandwidth / 1e9, "l2_flush": not args.warm_l2, "tuned_inductor": args.tuned_inductor,
            "formats": {f: {"bits": b, "bound": t} for f, (b, t) in FORMATS.items()}}  # fmt: skip

    earlier = json.loads(out.read_text()) if args.json and args.merge and out.exists() else None

    def write(rows_so_far: list[dict], complete: bool) -> None:
        """The JSON after every row, so that a run cut short (a time limit) keeps what it measured."""
        if args.json:
            out.parent.mkdir(parents=True, exist_ok=True)
            result = {"meta": {**meta, "complete": complete}, "rows": rows_so_far}
            if earlier is not None:
                result = merge_results(earlier, result)
            out.write_text(json.dumps(result, indent=1))

    all_rows = []
    for n, k in _shapes(args.shapes):
        results = run_shape(n, k, _ints(args.m), rows, "cuda", timer, on_row=lambda r: write(all_rows + r, False))
        print_table(n, k, results, bandwidth)
        all_rows += results
    write(all_rows, True)
    if args.json:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
