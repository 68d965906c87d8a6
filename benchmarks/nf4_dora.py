"""NF4 linear and (Q)DoRA layer: µs per call vs bf16, bitsandbytes, torchao and PEFT.

Two tables, every column in this one process (issue 5, item 6):

1. NF4 linear, ``y = x[M, 4096] @ W[14336, 4096].T`` bf16, M = 1, 16, 4096: bf16 ``F.linear``,
   quantframe NF4 (eager, compiled), bitsandbytes NF4 (``Linear4bit(quant_type="nf4")``), torchao
   NF4 (``to_nf4``, compiled), and the 4-bit floor. Rows, timer (``do_bench`` eager with L2 flushed;
   ``do_bench_cudagraph`` for M <= 16 with a 2x-L2 read between calls), floor (bits per weight at
   the copy bandwidth of a measured 1 GiB clone) and table come from ``linear_latency.py``. Here
   ``rel err`` is against each row's *own* dequantized weight, ``x.float() @ dequant(W).T`` (each
   library double-quantizes NF4's block scales its own way), bound 0.01; the error against the
   bf16 weight (NF4's quantization error, ~0.09) goes to ``--json`` as ``rel_err_fp32``.
2. DoRA layer 4096 -> 4096, rank 16, alpha 32 (s = 2), x [1, 512, 4096] and [8, 2048, 4096] bf16,
   base bf16 and NF4: the bare bf16 linear, quantframe ``DoRALinear`` (eager, compiled), PEFT's
   DoRA (``LoraConfig(use_dora=True)``; an NF4 base is bitsandbytes ``Linear4bit``, as in QDoRA),
   and an eager-PyTorch reference of the formula (``dora_reference``). ``fwd``: the training
   forward (x requires grad, autograd records); ``fwd+bwd``: forward, then the gradients of x, A,
   B and m (the base is frozen; dx is what a layer inside a network owes its predecessor). Every
   row starts from the same A, B, m (B != 0, m != ||W||, so each term shows) and is first checked
   against the reference in fp32 on its own dequantized base: the output within 0.01 and each
   gradient within 0.02 (relative norm error); with a bf16 base quantframe is also compared
   with PEFT. A row over a bound is marked ``FAIL`` but still timed. Medians of
   ``triton.testing.do_bench`` (L2 flushed before each call), no CUDA graphs (M >= 512).

    python benchmarks/nf4_dora.py               # needs a CUDA GPU
    python benchmarks/nf4_dora.py --json        # also writes results/nf4_dora_<gpu>.json
    python benchmarks/nf4_dora.py --cpu-smoke   # quantframe + reference rows on CPU, tiny, no timing
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark, also under `python -m` or pytest
from linear_latency import ROWS, Timer, _cell, _dense_linear, _error, bnb_nf4, copy_bandwidth
from linear_latency import print_table

from quantframe.tensor import QuantTensor

LINEAR_SHAPE = (14336, 4096)  # (N, K): an MLP up/gate projection
LINEAR_MS = (1, 16, 4096)
LINEAR_ROWS = (
    "bf16 F.linear",
    "quantframe nf4, eager",
    "quantframe nf4, compiled",
    "bitsandbytes NF4 (Linear4bit)",
    "torchao NF4, compiled",
)
LINEAR_BOUND = 0.01  # vs x @ dequant(W).T in fp32: one bf16 rounding of the output (2^-9) + sum order

FEATURES, RANK, ALPHA = 4096, 16, 32.0  # DoRA 4096 -> 4096, s = alpha / rank = 2
SCALING = ALPHA / RANK
DORA_INPUTS = ((1, 512), (8, 2048))  # x [B, T, K]
OUT_BOUND = 0.01  # output vs the fp32 reference: bf16 rounding (PEFT also rounds its base output to bf16)
GRAD_BOUND = 0.02  # gradients: bf16 dx, and bf16 roundings summed over B * T rows (dm, dA, dB)
GRAD_NAMES = ("x", "lora_A", "lora_B", "magnitude")
PEERS = ("torchao", "bitsandbytes", "peft")


def _rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _dense(weight: Tensor) -> Tensor:
    """fp32 [N, K]: the weight a row multiplies by, dequantized the way its own library does it."""
    if isinstance(weight, QuantTensor):  # quantframe NF4Tensor
        return weight.dequantize(torch.float32)
    if type(weight).__name__ == "Params4bit":  # bitsandbytes: NF4 codes + quant_state (nested absmax)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(weight).__module__.startswith("torchao."):  # torchao NF4Tensor
        return weight.get_original_weight().float()
    return weight.float()


# ---- table 1: NF4 linear --------------------------------------------------------------------
def run_linear_row(name: str, w: Tensor, xs: dict[int, Tensor], timer: Timer | None) -> list[dict]:
    row = ROWS[name]
    base = {"shape": list(w.shape), "run": name, "format": row.fmt}
    try:
        fn = row.build(w)
        module = getattr(fn, "_orig_mod", fn)  # torch.compile wraps the module
        deq = _dense(module.weight) if isinstance(module, nn.Module) else w.float()  # bf16 row: a closure
    except Exception as e:  # noqa: BLE001 - a missing peer or an API mismatch: the row says so, the table prints
        return [{**base, "m": m, "error": _error(e)} for m in xs]
    results = []
    for m, x in xs.items():
        r = {**base, "m": m}
        try:
            with torch.no_grad():
                y = fn(x)  # first call: compiles, autotunes
                if y.shape != (m, w.shape[0]) or y.dtype != torch.bfloat16:
                    raise RuntimeError(f"output is {y.dtype} {list(y.shape)}, expected bf16 {[m, w.shape[0]]}")
                r["rel_err"] = _rel_err(y, x.float() @ deq.T)
                r["rel_err_fp32"] = _rel_err(y, x.float() @ w.float().T)
                r["check_ok"] = math.isfinite(r["rel_err"]) and r["rel_err"] <= LINEAR_BOUND
                if timer is not None:
                    r.update(timer(fn, x))
        except Exception as e:  # noqa: BLE001 - printed in the table
            r["error"] = _error(e)
        results.append(r)
    return results


def run_linear_table(names, ms, n: int, k: int, device: str, timer: Timer | None) -> list[dict]:
    gen = torch.Generator(device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).bfloat16()  # outputs ~ N(0, 1)
    xs = {m: torch.randn(m, k, generator=gen, device=device).bfloat16() for m in ms}
    results = []
    for name in names:
        results += run_linear_row(name, w, xs, timer)
        _free(device)
    return results


def _free(device: str) -> None:
    gc.collect()  # the row's weight and compiled graphs go before the next row
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- table 2: DoRA layer --------------------------------------------------------------------
def dora_reference(x: Tensor, w: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """``(x W^T + s x A^T B^T) * m / ||W + s B A||_row``, fp32 math, one rounding to ``x.dtype``.

    x [..., K], w [N, K] (dense or a QuantTensor, dequantized every call), lora_A [r, K],
    lora_B [N, r], magnitude [N]. ``||.||_row`` is the L2 norm of each of the N output rows of the
    [N, K] matrix, *detached* (no gradient through it): quantframe.nn.dora.weight_norm's definition.
    PEFT's is the same: ``DoraLinearLayer.get_weight_norm`` takes ``torch.linalg.norm(W + s * B @ A,
    dim=1)`` (its "column-wise" comment is the paper's W^T view) in the input's dtype after PEFT
    casts the input to the adapters' (fp32 here), and ``forward`` detaches it (DoRA paper, 4.3).
    """
    wf = w.dequantize(torch.float32) if isinstance(w, QuantTensor) else w.float()
    a, b, m = lora_A.float(), lora_B.float(), magnitude.float()
    norm = torch.linalg.vector_norm(wf + scaling * (b @ a), dim=1).detach()  # [N]
    xf = x.float()
    y = (xf @ wf.T + scaling * ((xf @ a.T) @ b.T)) * (m / norm)
    return y.to(x.dtype)


@dataclass
class DoRAParams:
    """What every row starts from: the base and one set of adapter values."""

    w: Tensor  # [N, K] bf16, the base before any quantization
    lora_A: Tensor  # [r, K] fp32
    lora_B: Tensor  # [N, r] fp32
    magnitude: Tensor  # [N] fp32


def make_params(n: int, k: int, device: str) -> DoRAParams:
    gen = torch.Generator(device).manual_seed(1)
    w = (torch.randn(n, k, generator=gen, device=device) * k**-0.5).bfloat16()  # rows of norm ~1
    a = torch.randn(RANK, k, generator=gen, device=device) * k**-0.5
    b = torch.randn(n, RANK, generator=gen, device=device) * 0.1 * RANK**-0.5  # s B A rows: norm ~0.2
    norm = torch.linalg.vector_norm(w.float() + SCALING * (b @ a), dim=1)
    m = norm * (1 + 0.2 * (torch.rand(n, generator=gen, device=device) - 0.5))  # m != ||.||: scale != 1
    return DoRAParams(w, a, b, m)


@dataclass
class Impl:
    fn: Callable[[Tensor], Tensor]  # x [B, T, K] bf16 -> y [B, T, N] bf16
    params: list[Tensor]  # [lora_A, lora_B, magnitude], the trainable leaves; [] for the bare linear
    weight: Tensor | None  # the base as the row stores it (for the check's dequantized reference)


@dataclass(frozen=True)
class DoRARow:
    build: Callable[[DoRAParams, str], Impl]  # (params, base "bf16" | "nf4") -> Impl
    peer: str | None = None


def _load_(targets: list[Tensor], p: DoRAParams) -> None:
    with torch.no_grad():
        for t, v in zip(targets, (p.lora_A, p.lora_B, p.magnitude), strict=True):
            t.copy_(v)


def bare_linear(p: DoRAParams, base: str) -> Impl:
    return Impl(lambda x: F.linear(x, p.w), [], None)  # bf16 for either base: the layer without adapters


def quantframe_dora(compiled: bool, fused_forward: bool = False) -> Callable[[DoRAParams, str], Impl]:
    def build(p, base):
        import quantframe

        holder = nn.Module()
        holder.linear = _dense_linear(p.w)
        config = quantframe.dora(rank=RANK, alpha=ALPHA, base=quantframe.nf4_weight_only() if base == "nf4" else None)
        quantframe.apply_adapters_(holder, config)
        layer = holder.linear
        if not isinstance(layer, quantframe.DoRALinear):
            raise TypeError("apply_adapters_ left the linear an nn.Linear (the 'quantframe' log says why)")
        _load_([layer.lora_A, layer.lora_B, layer.magnitude], p)
        layer.fused_forward = fused_forward  # one Triton GEMM: x W.T, the LoRA add, the scale epilogue
        fn = torch.compile(layer, dynamic=False) if compiled else layer
        return Impl(fn, [layer.lora_A, layer.lora_B, layer.magnitude], layer.weight)

    return build


def peft_dora(p: DoRAParams, base: str) -> Impl:
    """get_peft_model(<module holding one linear>, LoraConfig(use_dora=True)); NF4: bnb Linear4bit."""
    import peft

    holder = nn.Module()
    if base == "nf4":
        holder.linear = bnb_nf4(p.w)  # Linear4bit(quant_type="nf4", compress_statistics=True), bf16 compute
        # transformers sets this on a model loaded in 4 bits; PEFT's dispatch_bnb_4bit reads it to pick
        # its bnb Linear4bit LoRA layer (without it a Linear4bit, an nn.Linear subclass, gets the dense one)
        holder.is_loaded_in_4bit = True
    else:
        holder.linear = _dense_linear(p.w)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["linear"], use_dora=True)
    model = peft.get_peft_model(holder, config)  # adapters upcast to fp32 (autocast_adapter_dtype=True)
    layer = model.base_model.model.linear  # called directly: the layer, not PeftModel's wrapper
    if base == "nf4" and type(layer).__module__ != "peft.tuners.lora.bnb":
        raise RuntimeError(f"PEFT wrapped the Linear4bit as {type(layer).__module__}.{type(layer).__name__}")
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    params.append(layer.lora_magnitude_vector["default"].weight)  # DoraLinearLayer.weight: m [N]
    _load_(params, p)
    return Impl(layer, params, layer.get_base_layer().weight)


def reference_dora(p: DoRAParams, base: str) -> Impl:
    from quantframe import NF4Tensor

    w = NF4Tensor.from_float(p.w) if base == "nf4" else p.w  # quantframe's NF4, dequantized every call
    params = [t.clone().requires_grad_() for t in (p.lora_A, p.lora_B, p.magnitude)]
    return Impl(lambda x: dora_reference(x, w, *params, SCALING), params, w)


DORA_ROWS: dict[str, DoRARow] = {  # run in this order: quantframe rows compare with PEFT's
    "bf16 F.linear (no adapters)": DoRARow(bare_linear),
    "PEFT DoRA": DoRARow(peft_dora, "peft"),
    "quantframe DoRALinear, eager": DoRARow(quantframe_dora(False), "quantframe"),
    "quantframe DoRALinear, compiled": DoRARow(quantframe_dora(True), "quantframe"),
    "quantframe DoRALinear, fused forward GEMM, compiled": DoRARow(quantframe_dora(True, True), "quantframe"),
    "reference (eager PyTorch, fp32 math)": DoRARow(reference_dora),
}


def _fwd_bwd(impl: Impl, x: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(impl.fn(x), [x, *impl.params], g)


def check_dora(impl: Impl, x: Tensor, g: Tensor, p: DoRAParams) -> tuple[dict, tuple[Tensor, ...]]:
    """Output and gradients of the row vs dora_reference in fp32 on the row's own dequantized base."""
    y = impl.fn(x)
    if y.shape != (*x.shape[:-1], p.w.shape[0]) or y.dtype != torch.bfloat16:
        raise RuntimeError(f"output is {y.dtype} {list(y.shape)}, expected bf16 {[*x.shape[:-1], p.w.shape[0]]}")
    grads = torch.autograd.grad(y, [x, *impl.params], g)
    xr = x.detach().float().requires_grad_()
    leaves = [t.detach().float().requires_grad_() for t in impl.params]  # the row's own values (and dtype)
    yr = dora_reference(xr, _dense(impl.weight), *leaves, SCALING)
    refs = torch.autograd.grad(yr, [xr, *leaves], g.float())
    r = {"out_err": _rel_err(y, yr), "grad_err": {n: _rel_err(a, b) for n, a, b in zip(GRAD_NAMES, grads, refs)}}
    worst = max(r["grad_err"].values())
    r["check_ok"] = all(map(math.isfinite, (r["out_err"], worst))) and r["out_err"] <= OUT_BOUND and worst <= GRAD_BOUND
    return r, (y.detach(), *grads)


def _vs(outs: tuple[Tensor, ...], peer: tuple[Tensor, ...]) -> float:
    """Worst relative error of output and gradients against another row's."""
    return max(_rel_err(a, b) for a, b in zip(outs, peer, strict=True))


def run_dora_table(base: str, p: DoRAParams, inputs, rows: dict[str, DoRARow], device: str, timed: bool) -> list[dict]:
    gen = torch.Generator(device).manual_seed(2)
    xs = {bt: torch.randn(*bt, p.w.shape[1], generator=gen, device=device).bfloat16().requires_grad_() for bt in inputs}
    gs = {bt: torch.randn(*bt, p.w.shape[0], generator=gen, device=device).bfloat16() for bt in inputs}
    peft_outs: dict[tuple, tuple[Tensor, ...]] = {}
    results = []
    for name, row in rows.items():
        common = {"base": base, "run": name}
        try:
            impl = row.build(p, base)
        except Exception as e:  # noqa: BLE001 - a missing peer or an API mismatch: the row says so
            results += [{**common, "bt": list(bt), "error": _error(e)} for bt in inputs]
            continue
        for bt, x in xs.items():
            r = {**common, "bt": list(bt)}
            try:
                if impl.params:  # the bare linear computes no DoRA: nothing to check
                    check, outs = check_dora(impl, x, gs[bt], p)
                    r.update(check)
                    if row.peer == "peft":
                        peft_outs[bt] = outs
                    elif row.peer == "quantframe" and base == "bf16" and bt in peft_outs:
                        r["vs_peft"] = _vs(outs, peft_outs[bt])  # same base; with NF4 the quantizers differ
                        r["check_ok"] = r["check_ok"] and r["vs_peft"] <= GRAD_BOUND
                else:
                    _fwd_bwd(impl, x, gs[bt])  # runs at all, and warms up
                if timed:
                    r.update(time_dora(impl, x, gs[bt]))
            except Exception as e:  # noqa: BLE001 - printed in the table
                r["error"] = _error(e)
            results.append(r)
        del impl
        _free(device)
    return results


def time_dora(impl: Impl, x: Tensor, g: Tensor) -> dict:
    from triton.testing import do_bench

    fwd = do_bench(lambda: impl.fn(x), warmup=25, rep=100, return_mode="median")
    both = do_bench(lambda: _fwd_bwd(impl, x, g), warmup=25, rep=100, return_mode="median")
    return {"fwd_us": fwd * 1e3, "fwd_bwd_us": both * 1e3}


def print_dora_table(base: str, n: int, k: int, results: list[dict]) -> None:
    print(f"\nDoRA {k}->{n}, rank {RANK}, alpha {ALPHA:g}, base {base} | x [B, T, {k}] bf16 | "
          f"errors vs the fp32 reference (out <= {OUT_BOUND}, grads <= {GRAD_BOUND})")  # fmt: skip
    print(f"{'B x T':>9s}  {'run':38s} {'out err':>8s} {'grad err':>8s} {'vs PEFT':>8s} {'check':>5s} "
          f"{'fwd µs':>9s} {'fwd+bwd µs':>10s}")  # fmt: skip
    for r in sorted(results, key=lambda r: r["bt"][0] * r["bt"][1]):  # stable: row order kept per input
        bt = f"{r['bt'][0]}x{r['bt'][1]}"
        if "error" in r:
            print(f"{bt:>9s}  {r['run']:38s} n/a  ({r['error']})")
            continue
        errs = "       -        -" if "out_err" not in r else f"{r['out_err']:8.4f} {max(r['grad_err'].values()):8.4f}"
        vs = f"{r['vs_peft']:8.4f}" if "vs_peft" in r else f"{'-':>8s}"
        ok = "-" if "check_ok" not in r else "ok" if r["check_ok"] else "FAIL"
        print(f"{bt:>9s}  {r['run']:38s} {errs} {vs} {ok:>5s} {_cell(r.get('fwd_us'))} "
              f"{_cell(r.get('fwd_bwd_us'), 10)}")  # fmt: skip
    if base == "nf4":
        print("  note: no quantframe-vs-PEFT column on NF4: bitsandbytes and quantframe quantize the block")
        print("        scales differently (8-bit dynamic map vs int8), so their bases differ slightly")


# ---- main -----------------------------------------------------------------------------------
def peer_versions() -> dict[str, str]:
    versions = {}
    for peer in PEERS:
        try:
            versions[peer] = __import__(peer).__version__
        except Exception as e:  # noqa: BLE001 - any import failure = not importable; its rows say n/a
            versions[peer] = f"not importable ({_error(e)})"
    return versions


def cpu_smoke() -> None:
    """--cpu-smoke: quantframe, bf16 and reference rows on CPU, tiny shapes, checks only, no timing."""
    torch.manual_seed(0)
    n, k = 256, 512  # NF4: K a multiple of 64, N * K a multiple of 64 * 256
    names = [name for name in LINEAR_ROWS if ROWS[name].peer in (None, "quantframe")]
    results = run_linear_table(names, [1, 16], n, k, "cpu", timer=None)
    print(f"NF4 linear: rel err vs x @ dequant(W).T (bound {LINEAR_BOUND})")
    print_table(n, k, results, bandwidth=None)
    rows = {name: row for name, row in DORA_ROWS.items() if row.peer in (None, "quantframe")}
    p = make_params(256, 256, "cpu")
    for base in ("bf16", "nf4"):
        dora = run_dora_table(base, p, ((1, 8), (2, 16)), rows, "cpu", timed=False)
        print_dora_table(base, 256, 256, dora)
        results += dora
    bad = sorted({r["run"] for r in results if "error" in r or not r.get("check_ok", True)})
    if bad:
        raise SystemExit(f"cpu smoke: failing rows: {bad}")
    print("\ncpu smoke: every row built, ran and passed its check (no timings on CPU)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/nf4_dora_<gpu>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--cpu-smoke", action="store_true", help="quantframe and reference rows on CPU, tiny, untimed")
    parser.add_argument("--part", choices=("all", "linear", "dora"), default="all", help="which table(s) to run")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        return cpu_smoke()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_dora.py needs a CUDA GPU: torch.cuda.is_available() is False (try --cpu-smoke)")

    import triton

    gpu = torch.cuda.get_device_name()
    versions = peer_versions()
    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    print(" | ".join(f"{peer} {v}" for peer, v in versions.items()))
    bandwidth = copy_bandwidth()
    timer = Timer(warm_l2=False, graph_max_m=16)
    n, k = LINEAR_SHAPE
    linear, dora = [], []
    part = "" if args.part == "all" else f"_{args.part}"
    out = Path(args.out) / f"nf4_dora{part}_{gpu.replace(' ', '_')}.json"

    def write(complete: bool) -> None:
        """The JSON after each table, so that a run cut short (a time limit) keeps what it measured."""
        if args.json:
            out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                    "quantframe": __import__("quantframe").__version__, **versions,
                    "date": str(datetime.date.today()), "python": platform.python_version(),
                    "copy_gbps": bandwidth / 1e9, "linear_bound": LINEAR_BOUND, "out_bound": OUT_BOUND,
                    "grad_bound": GRAD_BOUND, "rank": RANK, "alpha": ALPHA, "complete": complete}  # fmt: skip
            out.write_text(json.dumps({"meta": meta, "linear": linear, "dora": dora}, indent=1))

    if args.part in ("all", "linear"):
        linear = run_linear_table(LINEAR_ROWS, LINEAR_MS, n, k, "cuda", timer)
        print(f"\nNF4 linear: rel err vs x @ dequant(W).T, each row's own dequantization (bound {LINEAR_BOUND}); "
              "graph timings with L2 flushed")  # fmt: skip
        print_table(n, k, linear, bandwidth)
        write(False)
    p = make_params(FEATURES, FEATURES, "cuda")
    for base in ("bf16", "nf4") if args.part in ("all", "dora") else ():
        results = run_dora_table(base, p, DORA_INPUTS, DORA_ROWS, "cuda", timed=True)
        print_dora_table(base, FEATURES, FEATURES, results)
        dora += results
        write(False)
    write(True)
    if args.json:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
