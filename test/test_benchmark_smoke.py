"""The GPU benchmarks' CPU smoke modes: every quantframe row builds, runs and passes its accuracy
check at a tiny size (no timings), so a benchmark does not first break on the GPU machine.

Each runs in its own process, as on the GPU machine (``TRITON_INTERPRET`` and the compile caches
stay out of this test process).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["linear_latency.py", "nf4_dora.py", "ternary.py"])
def test_cpu_smoke_passes_every_row(script):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the script decides (linear_latency's fused-kernel rows set it)
    done = subprocess.run([sys.executable, script, "--cpu-smoke"], cwd=_BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("cpu smoke: every") and "passed its check" in last, last


def _plot_latency():
    """benchmarks/plot_latency.py as a module (the benchmarks folder is not a package)."""
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        import plot_latency
    finally:
        sys.path.remove(str(_BENCHMARKS))
    return plot_latency


def test_plot_latency_draws_the_committed_decode_result(tmp_path):
    plot_latency = _plot_latency()
    meta, rows = plot_latency.load(_BENCHMARKS / "results" / "linear_latency_NVIDIA_H200_decode.json")
    # the int8 floor: 14336 * 4096 bytes at the run's copy bandwidth
    assert plot_latency.floor_us(meta, "int8", [14336, 4096]) == pytest.approx(14336 * 4096 / (meta["copy_gbps"] * 1e3))
    assert plot_latency.floor_us(meta, "no such format", [14336, 4096]) is None
    out = tmp_path / "decode.png"
    plot_latency.plot(meta, rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_latency_rejects_a_result_without_graph_times(tmp_path):
    plot_latency = _plot_latency()
    path = tmp_path / "eager_only.json"
    path.write_text('{"meta": {}, "rows": [{"run": "bf16 F.linear", "m": 4096, "eager_us": 700.0}]}')
    with pytest.raises(ValueError, match="no rows with a CUDA-graph time"):
        plot_latency.load(path)
