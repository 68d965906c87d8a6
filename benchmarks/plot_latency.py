"""Bar chart of a `linear_latency.py --json` result: CUDA-graph µs per run at each small M, with the
bandwidth floor of each format drawn as a tick. Reads the JSON only (no GPU needed).

    python benchmarks/plot_latency.py benchmarks/results/linear_latency_NVIDIA_H200_decode.json \
        --out docs/img/decode_latency_H200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows with a graph time) of one result file; ValueError if it holds none."""
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("graph_us") is not None]
    if not rows:
        raise ValueError(f"{path}: no rows with a CUDA-graph time (graph_us)")
    return data["meta"], rows


def floor_us(meta: dict, fmt: str, shape: list[int]) -> float | None:
    """Weight bytes over the measured copy bandwidth, µs; None for a format the meta does not describe."""
    bits = meta.get("formats", {}).get(fmt, {}).get("bits")
    if bits is None or not meta.get("copy_gbps"):
        return None
    n, k = shape
    return n * k * bits / 8 / (meta["copy_gbps"] * 1e3)


def plot(meta: dict, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({r["m"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))  # first-seen order, as the table prints them
    fig, axes = plt.subplots(1, len(ms), figsize=(6.5 * len(ms), 0.42 * len(runs) + 1.6), squeeze=False)
    for ax, m in zip(axes[0], ms):
        by_run = {r["run"]: r for r in rows if r["m"] == m}
        names = [name for name in runs if name in by_run]
        times = [by_run[name]["graph_us"] for name in names]
        colors = ["#4C72B0" if name.startswith("quantframe") else "#999999" for name in names]
        y = range(len(names))
        ax.barh(y, times, color=colors)
        for i, name in enumerate(names):
            r = by_run[name]
            floor = floor_us(meta, r["format"], r["shape"])
            if floor is not None:
                ax.plot([floor, floor], [i - 0.4, i + 0.4], color="black", linewidth=1.5)
            ax.text(times[i], i, f" {times[i]:.1f}", va="center", fontsize=8)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("µs under CUDA graphs, L2 flushed; tick: bandwidth floor")
        n, k = rows[0]["shape"]
        ax.set_title(f"x[{m}, {k}] @ W[{n}, {k}].T")
    fig.suptitle(f"{meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, {meta.get('date', '')}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a linear_latency_<gpu>.json")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    meta, rows = load(args.result)
    plot(meta, rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
