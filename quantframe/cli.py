"""The ``quantframe`` console script.

    quantframe train                               # one run, the default scheme (int8-qt)
    quantframe train --compare none,int8-qt        # each scheme in a fresh process, one plot
    quantframe train --quantize none --save d.pt   # then adapters over its NF4 weights:
    quantframe train --quantize nf4-dora --init-from d.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from quantframe.train import CONVERSIONS, SCHEMES, ByteLM, TrainConfig, TrainResult, load_dense_state_, train

__all__ = ["main"]

_MiB = 2**20


def _scheme(name: str) -> str:
    if name not in SCHEMES:
        raise argparse.ArgumentTypeError(f"unknown scheme {name!r}; valid schemes: {', '.join(SCHEMES)}")
    return name


def _scheme_list(text: str) -> list[str]:
    names = [_scheme(n.strip()) for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of schemes from: {', '.join(SCHEMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"scheme listed twice in {text!r}")
    return names


# flag -> (TrainConfig field, type, metavar, help); defaults come from TrainConfig so they never drift.
_FLAGS = {
    "--steps": ("steps", int, "N", "optimizer steps"),
    "--batch-size": ("batch_size", int, "B", "sequences per step"),
    "--lr": ("lr", float, "LR", "peak learning rate (linear warmup, then cosine decay to lr/10)"),
    "--seed": ("seed", int, "N", "seed for init, batches and stochastic rounding"),
    "--optim": ("optim", str, "NAME", "adamw (fp32 moments) or adamw8bit (8-bit moments)"),
    "--device": ("device", str, "DEV", "cpu, cuda, cuda:N, or auto (cuda if available)"),
    "--threads": ("threads", int, "N", "CPU threads (0: torch's default; 1 can be faster on a busy machine)"),
    "--dim": ("dim", int, "D", "model width"),
    "--layers": ("n_layers", int, "N", "transformer blocks"),
    "--heads": ("n_heads", int, "H", "attention heads"),
    "--seq-len": ("seq_len", int, "T", "context length in bytes"),
    "--eval-interval": ("eval_interval", int, "N", "estimate train/val loss every N steps (0: only at the end)"),
    "--eval-batches": ("eval_batches", int, "N", "batches per loss estimate"),
}

# A larger model where a GPU trains it: the CPU defaults take about a minute on 2 cores, these
# about a minute on an H100 (800 steps of a 4-layer, 384-wide model on 256-byte windows).
_GPU_DEFAULTS = {"dim": 384, "n_layers": 4, "n_heads": 6, "seq_len": 256, "steps": 800}

_EXAMPLES = """examples:
  quantframe train                              one int8-qt run, then its summary and a loss plot
  quantframe train --compare none,int8-qt       dense vs INT8 weights, each in a fresh process
  quantframe train --quantize none --steps 100 --dim 128 --layers 2
  quantframe train --quantize bitnet            ternary QAT; reports the loss before and after packing
  quantframe train --quantize none --save runs/dense.pt
  quantframe train --quantize nf4-dora --init-from runs/dense.pt
                                                QDoRA: NF4 base of the dense weights, adapters train
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantframe",
        description="quantframe: low-precision weights as PyTorch tensor subclasses.",
        epilog="Run 'quantframe COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a small byte-level Llama on the stdlib's source, dense or quantized",
        description=(
            "Train a small byte-level Llama (RoPE, SwiGLU) on the Python standard library's own .py\n"
            "files with quantframe.optim.AdamW; report loss, tokens/s, peak memory and weight bytes.\n"
            "With --compare, each scheme runs in its own fresh process (so the peak RSS is its own)\n"
            "and the loss curves are overlaid in one PNG."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quantize", type=_scheme, default=defaults.quantize, metavar="SCHEME",
                       help=f"weight scheme, one of: {', '.join(SCHEMES)} (default: {defaults.quantize})")  # fmt: skip
    which.add_argument("--compare", type=_scheme_list, metavar="S1,S2,...",
                       help="comma list of schemes to train one after another and compare")  # fmt: skip
    for flag, (name, kind, metavar, text) in _FLAGS.items():
        default = getattr(defaults, name)
        if name in _GPU_DEFAULTS:  # resolved once the device is known (_train_command)
            help_text = f"{text} (default: {default}; {_GPU_DEFAULTS[name]} on a GPU)"
            default = None
        else:
            help_text = f"{text} (default: {default})"
        p.add_argument(flag, type=kind, default=default, dest=name, metavar=metavar, help=help_text)
    p.add_argument("--init-from", dest="init_from", metavar="PATH",
                   help="start from this dense state_dict (saved by a --quantize none run with --save); "
                        "required by nf4-dora and nf4-lora, whose NF4 base is these weights quantized")  # fmt: skip
    p.add_argument("--save", dest="save", metavar="PATH",
                   help="save the trained model's state_dict to PATH (one scheme only)")  # fmt: skip
    p.add_argument("--out", default=defaults.out_dir, dest="out_dir", metavar="DIR",
                   help=f"directory for the loss plot (default: {defaults.out_dir}/)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="do not write the loss plot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_train_command, subparser=p)
    return parser


def _run_in_fresh_process(cfg: TrainConfig, progress: bool) -> TrainResult:
    # spawn, not fork: a fresh interpreter, so ru_maxrss counts this run alone and no torch
    # thread pool state is inherited from the parent.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train, cfg, progress).result()


def _table(results: list[TrainResult]) -> str:
    mem = results[0].peak_memory_kind
    # the converted column only where a scheme converts (bitnet -> ternary); "-" for the others
    converts = any(r.converted_val_loss is not None for r in results)
    rows = [("scheme", "train loss", "val loss", *(["val converted"] if converts else []), "tokens/s",
             f"{mem} (MiB)", "weights (MiB)")]  # fmt: skip
    for r in results:
        converted = ["-" if r.converted_val_loss is None else f"{r.converted_val_loss:.4f}"] if converts else []
        rows.append((
            r.scheme, f"{r.final_train_loss:.4f}", f"{r.final_val_loss:.4f}", *converted, f"{r.tokens_per_s:,.0f}",
            f"{r.peak_memory_bytes / _MiB:,.1f}", f"{r.weight_bytes / _MiB:.3f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # scheme names left-aligned, numbers right-aligned
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + _notes(results))


def _notes(results: list[TrainResult]) -> list[str]:
    """One line per fine-tune (loss at its start) and per conversion (loss and bytes before/after)."""
    lines = []
    for r in results:
        if r.eval_losses[0][0] == 0:  # started from --init-from: the step-0 estimate
            start, end = r.eval_losses[0][2], r.final_val_loss
            lines.append(f"{r.scheme}: val loss {start:.4f} at the start (init-from) -> {end:.4f} after training")
        if r.converted_val_loss is not None:
            name = CONVERSIONS[r.scheme].__name__
            lines.append(
                f"{r.scheme}: {name}: val loss {r.final_val_loss:.4f} -> {r.converted_val_loss:.4f} "
                f"({r.converted_val_loss - r.final_val_loss:+.2e}), train loss {r.final_train_loss:.4f} -> "
                f"{r.converted_train_loss:.4f}, weights {r.weight_bytes / _MiB:.3f} -> "
                f"{r.converted_weight_bytes / _MiB:.3f} MiB"
            )
    return [""] + lines if lines else []


def _plot(results: list[TrainResult], cfg: TrainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, no GUI backend warnings
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax.plot(range(1, len(r.losses) + 1), r.losses, color=color, alpha=0.8, lw=1, label=f"{r.scheme} train")
        steps, _, val = zip(*r.eval_losses)
        ax.plot(steps, val, "o--", color=color, ms=5, label=f"{r.scheme} val")
    size = f"dim {cfg.dim}, {cfg.n_layers} layers, seq {cfg.seq_len}, batch {cfg.batch_size}"
    ax.set_title(f"Byte-level LM on stdlib source ({size})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _train_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    for name, value in _GPU_DEFAULTS.items():
        overrides.setdefault(name, value if on_gpu else getattr(TrainConfig, name))
    schemes = args.compare or [args.quantize]
    if args.save is not None and len(schemes) > 1:
        parser.error(f"--save takes one scheme; --compare lists {len(schemes)} (they would overwrite {args.save})")
    try:
        configs = [TrainConfig(**{**overrides, "quantize": s}) for s in schemes]
        if args.init_from is not None:  # a wrong checkpoint fails here, before any run starts
            load_dense_state_(ByteLM(configs[0]), args.init_from)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))  # exit 2 with usage, like any bad flag
    progress = not args.no_progress
    if args.compare:
        results = [_run_in_fresh_process(cfg, progress) for cfg in configs]
    else:
        results = [train(configs[0], progress)]  # this process is fresh: its peak RSS is the run's
        print(results[0].summary)
        print()
    print(_table(results))
    if not args.no_plot:
        path = Path(args.out_dir) / f"loss_{'_'.join(schemes)}.png"
        _plot(results, configs[0], path)
        print(f"loss plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``quantframe`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    return args.run(args.subparser, args)


if __name__ == "__main__":
    sys.exit(main())
