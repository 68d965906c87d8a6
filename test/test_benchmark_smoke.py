"""The GPU benchmarks' CPU smoke modes: every quantframe row builds, runs and passes its accuracy
check at a tiny size (no timings), so a benchmark does not first break on the GPU machine.

Each runs in its own process, as on the GPU machine (``TRITON_INTERPRET`` and the compile caches
stay out of this test process).
"""

import importlib
import json
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


def _benchmark(name):
    """A script of benchmarks/ as a module (the benchmarks folder is not a package)."""
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(_BENCHMARKS))


def _plot_latency():
    return _benchmark("plot_latency")


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


def test_plot_latency_takes_one_shape_of_a_merged_result(tmp_path):
    plot_latency = _plot_latency()
    path = _BENCHMARKS / "results" / "linear_latency_NVIDIA_H200.json"
    _, first = plot_latency.load(path)
    _, small = plot_latency.load(path, (4096, 4096))
    assert {tuple(r["shape"]) for r in first} == {(14336, 4096)}
    assert {tuple(r["shape"]) for r in small} == {(4096, 4096)}
    with pytest.raises(ValueError, match=r"at W \(1, 2\)"):
        plot_latency.load(path, (1, 2))


def _result(date, rows):
    return {"meta": {"date": date, "complete": True}, "rows": [
        {"shape": list(shape), "run": run, "m": m, "graph_us": us} for shape, run, m, us in rows]}


def test_merge_keeps_the_rows_a_run_does_not_redo_and_names_each_rows_run():
    ll = _benchmark("linear_latency")
    first = _result("day 1", [((8, 4), "bf16", 1, 10.0), ((8, 4), "int8", 1, 6.0), ((4, 4), "bf16", 1, 5.0)])
    second = _result("day 2", [((8, 4), "int8", 1, 5.0), ((8, 4), "int8", 16, 7.0)])
    merged = ll.merge_results(first, second)
    got = {(tuple(r["shape"]), r["run"], r["m"]): (r["graph_us"], r["run_index"]) for r in merged["rows"]}
    assert got == {
        ((8, 4), "bf16", 1): (10.0, 0), ((4, 4), "bf16", 1): (5.0, 0),  # kept, from the first run
        ((8, 4), "int8", 1): (5.0, 1), ((8, 4), "int8", 16): (7.0, 1),  # redone or new
    }  # fmt: skip
    assert [run["date"] for run in merged["meta"]["runs"]] == ["day 1", "day 2"] and merged["meta"]["complete"]
    # a third run appends to the list; an incomplete run makes the file incomplete
    third = ll.merge_results(merged, {**_result("day 3", []), "meta": {"date": "day 3", "complete": False}})
    assert [run["date"] for run in third["meta"]["runs"]] == ["day 1", "day 2", "day 3"]
    assert not third["meta"]["complete"] and len(third["rows"]) == 4
    json.dumps(third)  # still a JSON document


def test_plot_latency_clips_only_runs_far_past_bf16():
    x_limit = _plot_latency().x_limit
    assert x_limit([10.0, 500.0], bf16_us=20.0) == 60.0  # the 500 bar ends at the edge, value printed
    assert x_limit([10.0, 30.0], bf16_us=20.0) == 30.0
    assert x_limit([10.0, 30.0], bf16_us=None) == 30.0


def test_plot_fsdp2_draws_the_committed_batches(tmp_path):
    plot_fsdp2 = _benchmark("plot_fsdp2")
    ratios, bf16_ms = plot_fsdp2.speedups(_BENCHMARKS / "results", "NVIDIA_H200", 2)
    assert sorted(bf16_ms) == [4, 8, 16, 32]  # the anchor's file and the _b<N> files, not _noreshard
    qt = dict(ratios["quantframe int8 QT + AdamW"])
    assert set(qt) == {4, 8, 16, 32} and all(0 < v < 2 for v in qt.values())
    out = tmp_path / "fsdp2.png"
    plot_fsdp2.main([str(_BENCHMARKS / "results"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no fsdp2_NVIDIA_H200_x3"):
        plot_fsdp2.speedups(_BENCHMARKS / "results", "NVIDIA_H200", 3)
