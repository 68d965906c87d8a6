"""Bar chart of a `linear_latency.py --json` result: CUDA-graph µs per run at each small M, with the
bandwidth floor of each format drawn as a tick. Reads the JSON only (no GPU needed).

    python benchmarks/plot_latency.py benchmarks/results/linear_latency_NVIDIA_H200.json \
        --shape 14336x4096 --out docs/img/decode_latency_H200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path, shape: tuple[int, int] | None = None) -> tuple[dict, list[dict]]:
    """(meta, rows with a graph time) of one result file, of one W shape ``(N, K)`` (default: the
    file's first); ValueError if it holds none."""
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("graph_us") is not None]
    if rows and shape is None:
        shape = tuple(rows[0]["shape"])
    rows = [r for r in rows if tuple(r["shape"]) == tuple(shape)]
    if not rows:
        raise ValueError(f"{path}: no rows with a CUDA-graph time (graph_us)" + (f" at W {shape}" if shape else ""))
    return data["meta"], rows


def floor_us(meta: dict, fmt: str, shape: list[int]) -> float | None:
    """Weight bytes over the measured copy bandwidth, µs; None for a format the meta does not describe."""
    bits = meta.get("formats", {}).get(fmt, {}).get("bits")
    if bits is None or not meta.get("copy_gbps"):
        return None
    n, k = shape
    return n * k * bits / 8 / (meta["copy_gbps"] * 1e3)


def x_limit(times: list[float], bf16_us: float | None) -> float:
    """The axis end: every bar, unless some run far past bf16 would squash the rest (then 3x bf16;
    those bars end at the edge with their value)."""
    longest = max(times)
    return min(longest, 3 * bf16_us) if bf16_us else longest


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
        limit = x_limit(times, by_run.get("bf16 F.linear", {}).get("graph_us"))
        ax.barh(y, [min(t, limit) for t in times], color=colors)
        for i, name in enumerate(names):
            r = by_run[name]
            floor = floor_us(meta, r["format"], r["shape"])
            if floor is not None:
                ax.plot([floor, floor], [i - 0.4, i + 0.4], color="black", linewidth=1.5)
            clipped = times[i] > limit  # a bar past the axis: its value at the edge, marked
            ax.text(min(times[i], limit), i, f" {times[i]:.1f}" + (" ▸" if clipped else ""), va="center", fontsize=8)
        ax.set_xlim(0, limit * 1.18)
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
    parser.add_argument("--shape", default=None, help="W shape NxK (default: the file's first)")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.lower().split("x")) if args.shape else None
    meta, rows = load(args.result, shape)
    plot(meta, rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
