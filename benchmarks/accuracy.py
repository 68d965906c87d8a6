"""Accuracy: how much eval loss does each inference format cost the byte-level LM of quantframe.train?

Trains the dense fp32 ``ByteLM`` once (quantframe.train's setup, lr schedule, clip and AdamW, on
the stdlib-source bytes; dim 128, ffn_hidden 384, so every Linear's in_features is a multiple of
128 and int4 g128 can take each one), then evaluates deep copies of it on the same fixed windows:

* ``bf16``: the dense model cast to bf16, the baseline every ``vs bf16`` column is against;
* ``fp32``: the trained model as is;
* every quantframe inference format, ``quantize_(bf16 copy, config, filter_fn=quantize_filter)``:
  the Linears of the blocks and the lm_head (11 with the defaults); the embedding stays dense.

``ternary`` (BitNet b1.58 absmean weights with INT8 per-token activations) accepts any float
Linear, but is meant for a model trained with ``bitnet_training()``: on this plain model its row
shows what post-training ternarization costs, not what BitNet reaches.

Losses: mean next-byte cross-entropy (nats) over ``--eval-batches`` batches per split, the windows
``estimate_loss`` draws (fixed seed), so every row sees the same bytes; logits are cast to fp32
before the cross-entropy (a bf16 loss would round away 0.1% differences). ``± se``: standard error of
the per-batch change vs bf16 (paired over the same windows), in percent of the bf16 loss.
``weight MiB``: every parameter (packed bytes for quantized ones, the bf16 embedding and norms
included). ``quantized``: Linears swapped / selected by the filter (skips are listed below the table).

    python benchmarks/accuracy.py                 # CPU: ~1 min training + evaluation
    python benchmarks/accuracy.py --json          # also writes benchmarks/results/accuracy_<device>.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import quantframe
from quantframe.train import TrainConfig, estimate_loss, get_lr, lm_loss, quantize_filter, setup, weight_bytes

# Row name -> config factory (None: no quantize_); "bf16" is the baseline, "fp32" the uncast model.
FORMATS: dict[str, Callable[[], quantframe.QuantConfig] | None] = {
    "bf16": None,
    "fp32": None,
    "int8 weight-only": quantframe.int8_weight_only,
    "int4 weight-only g128": lambda: quantframe.int4_weight_only(group_size=128),
    "int4 weight-only g32": lambda: quantframe.int4_weight_only(group_size=32),
    "int3 weight-only g32": lambda: quantframe.intx_weight_only(3),
    "int2 weight-only g32": lambda: quantframe.intx_weight_only(2),
    "int8 dyn act + int8 weight": quantframe.int8_dynamic_activation_int8_weight,
    "llm_int8 (threshold 6)": lambda: quantframe.llm_int8(6.0),
    "nf4": quantframe.nf4_weight_only,
    "ternary (not QAT-trained)": quantframe.ternary_weight_only,
}

# Defaults of quantframe.train except the FFN width: 384 = 3 * 128, so all in_features divide by 128.
DEFAULT = TrainConfig(quantize="none", ffn_hidden=384, eval_batches=32, device="cpu")


def train_dense(cfg: TrainConfig) -> tuple[nn.Module, object, torch.device]:
    """quantframe.train's loop without its bookkeeping (``train()`` does not return the model)."""
    device, data, model, opt = setup(cfg)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg)
        loss = lm_loss(model, *(t.to(device) for t in data.get_batch("train")))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return model.eval(), data, device


@torch.no_grad()
def val_batch_losses(model: nn.Module, data, cfg: TrainConfig, device: torch.device) -> Tensor:
    """Loss of each val batch [eval_batches] on estimate_loss's windows (same generator seed)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    xs = [data.get_batch("val", gen) for _ in range(cfg.eval_batches)]
    return torch.stack([lm_loss(model, x.to(device), y.to(device)) for x, y in xs])


def evaluate(name: str, make, fp32: nn.Module, data, cfg: TrainConfig, device: torch.device) -> dict:
    model = copy.deepcopy(fp32) if name == "fp32" else copy.deepcopy(fp32).to(torch.bfloat16)
    row = {"format": name, "config": None, "quantized": 0, "skipped": {}}
    selected = sum(quantize_filter(m, fqn) for fqn, m in model.named_modules())
    if make is not None:
        config = make()
        row["config"] = repr(config)
        quantframe.quantize_(model, config, filter_fn=quantize_filter)
        row["skipped"] = dict(getattr(model, "_quantframe_skipped", {}))  # what quantframe.summary lists
        row["quantized"] = sum(isinstance(p, quantframe.QuantTensor) for p in model.parameters())
    row["selected"] = selected
    row["weight_mib"] = weight_bytes(model.parameters()) / 2**20
    t0 = time.perf_counter()
    est = estimate_loss(model, data, cfg, device)
    row["train_loss"], row["val_loss"] = est["train"], est["val"]
    row["val_batches"] = val_batch_losses(model, data, cfg, device).tolist()
    row["eval_s"] = time.perf_counter() - t0
    return row


def add_deltas(rows: list[dict]) -> None:
    """Change vs bf16 (%) of val and train loss, and the paired standard error of the val change."""
    base = next(r for r in rows if r["format"] == "bf16")
    b = torch.tensor(base["val_batches"])
    for r in rows:
        r["val_vs_bf16_pct"] = 100 * (r["val_loss"] / base["val_loss"] - 1)
        r["train_vs_bf16_pct"] = 100 * (r["train_loss"] / base["train_loss"] - 1)
        d = torch.tensor(r["val_batches"]) - b
        se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        r["val_vs_bf16_se_pct"] = 100 * se / base["val_loss"]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'format':28s} {'val loss':>8s} {'vs bf16':>8s} {'± se':>6s} {'train loss':>10s} {'vs bf16':>8s} "
          f"{'weight MiB':>10s} {'quantized':>9s}")  # fmt: skip
    for r in rows:
        q = f"{r['quantized']}/{r['selected']}" if r["config"] else "-"
        print(f"{r['format']:28s} {r['val_loss']:8.4f} {r['val_vs_bf16_pct']:+7.3f}% {r['val_vs_bf16_se_pct']:5.3f}% "
              f"{r['train_loss']:10.4f} {r['train_vs_bf16_pct']:+7.3f}% {r['weight_mib']:10.3f} {q:>9s}")  # fmt: skip
    for r in rows:
        for fqn, why in r["skipped"].items():
            print(f"  {r['format']}: skipped {fqn}: {why}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write <out>/accuracy_<device>.json")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for --json")
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only matching rows (bf16 always)")
    ints = {"steps": "optimizer steps", "dim": "residual width", "n_layers": "blocks", "n_heads": "heads",
            "ffn_hidden": "SwiGLU width", "seq_len": "context bytes", "batch_size": "sequences per step",
            "eval_batches": "batches per loss estimate", "data_bytes": "bytes of stdlib text",
            "warmup_steps": "lr warmup steps", "threads": "CPU threads (0: torch's default)", "seed": "seed"}  # fmt: skip
    for name, help_ in ints.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(DEFAULT, name), help=help_)
    parser.add_argument("--device", default=DEFAULT.device, help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    cfg = replace(DEFAULT, device=args.device, **{name: getattr(args, name) for name in ints})

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        model, data, device = train_dense(cfg)
        train_s = time.perf_counter() - t0
        wanted = [w for w in args.only.split("|") if w]
        rows = [evaluate(name, make, model, data, cfg, device) for name, make in FORMATS.items()
                if name == "bf16" or not wanted or any(w in name for w in wanted)]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    add_deltas(rows)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"{where} | torch {torch.__version__} | quantframe {quantframe.__version__} | {datetime.date.today()}")
    print(f"dense fp32 ByteLM: dim {cfg.dim}, {cfg.n_layers} layers, ffn {cfg.ffn_hidden}, {cfg.steps} steps "
          f"in {train_s:.0f} s; eval {cfg.eval_batches} x {cfg.batch_size} x {cfg.seq_len} bytes per split")  # fmt: skip
    print_table(rows)
    if args.json:
        tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
        out = Path(args.out) / f"accuracy_{tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": where, "torch": torch.__version__, "quantframe": quantframe.__version__,
                "python": platform.python_version(), "date": str(datetime.date.today()), "train_s": train_s,
                "config": asdict(cfg)}  # fmt: skip
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
