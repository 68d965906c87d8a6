"""Step time against batch of `fsdp2.py --json` results: one line per run, ms/step relative to the bf16 row
of the same file, for every global batch found (``fsdp2_<gpu>_x<world>.json`` is the anchor's batch,
``..._b<N>.json`` the others). Reads the JSON only (no GPU needed).

    python benchmarks/plot_fsdp2.py benchmarks/results --gpu NVIDIA_H200 --world 2 --out docs/img/fsdp2_batch_H200.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RUNS = ("quantframe int8 QT + AdamW", "quantframe int8 MP + int8 weights + AdamW", "torchao int8 QT + _AdamW")


def speedups(folder: Path, gpu: str, world: int) -> tuple[dict[str, list[tuple[int, float]]], dict[int, float]]:
    """``({run: [(batch, bf16 ms / run ms)]}, {batch: bf16 ms})`` over the files of one GPU and world size,
    reshard_after_forward=True only; ValueError if there is none with a bf16 row."""
    pattern = re.compile(rf"fsdp2_{re.escape(gpu)}_x{world}(_b\d+)?\.json")
    ratios: dict[str, list[tuple[int, float]]] = {}
    bf16_ms: dict[int, float] = {}
    for path in sorted(folder.iterdir()):
        if not pattern.fullmatch(path.name):
            continue
        data = json.loads(path.read_text())
        rows = {r["run"]: r for r in data["rows"] if "ms_per_step" in r}
        base = rows.get("bf16, torch AdamW")
        if base is None:
            continue
        batch = data["meta"]["batch"]
        bf16_ms[batch] = base["ms_per_step"]
        for run in RUNS:
            if run in rows:
                ratios.setdefault(run, []).append((batch, base["ms_per_step"] / rows[run]["ms_per_step"]))
    if not bf16_ms:
        raise ValueError(f"{folder}: no fsdp2_{gpu}_x{world}[_b<N>].json with a bf16 row")
    return {run: sorted(points) for run, points in ratios.items()}, bf16_ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gpu", default="NVIDIA_H200")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, bf16_ms = speedups(args.folder, args.gpu, args.world)
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, points in ratios.items():
        batches, values = zip(*points)
        ax.plot(batches, values, marker="o", label=run)
    ax.axhline(1.0, color="black", linewidth=1, label="bf16 (torch AdamW)")
    ax.set_xscale("log", base=2)
    batches = sorted(bf16_ms)
    ax.set_xticks(batches, [f"{b}\n{bf16_ms[b]:.0f} ms" for b in batches])
    ax.set_xlabel("global batch (sequences of 2048 tokens) and bf16 ms/step")
    ax.set_ylabel("speed vs bf16 (bf16 ms / ms)")
    ax.set_title(f"FSDP2, {args.world} x {args.gpu.replace('_', ' ')}: 277M anchor model, compiled blocks", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
