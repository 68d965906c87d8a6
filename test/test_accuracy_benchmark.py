"""benchmarks/accuracy.py: a tiny run yields one finite row per format, on estimate_loss's windows."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "accuracy.py"
_spec = importlib.util.spec_from_file_location("bench_accuracy", _PATH)
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)

# dim 64 / ffn 128: every Linear has in_features 64 or 128, so int4 g128 skips some and takes some.
TINY = ["--steps", "3", "--dim", "64", "--n-heads", "2", "--n-layers", "1", "--ffn-hidden", "128",
        "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2", "--data-bytes", str(2**18),
        "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    result = accuracy.main([*TINY, "--json", "--out", str(out)])
    return result, json.loads((out / "accuracy_cpu.json").read_text())


def test_every_format_has_a_finite_row(rows):
    result, _ = rows
    assert [r["format"] for r in result] == list(accuracy.FORMATS)
    for r in result:
        for key in ("val_loss", "train_loss", "val_vs_bf16_pct", "train_vs_bf16_pct", "weight_mib"):
            assert math.isfinite(r[key]), (r["format"], key, r[key])
        assert 0 < r["val_loss"] < 6 and len(r["val_batches"]) == 2
    base = result[0]
    assert base["format"] == "bf16" and base["val_vs_bf16_pct"] == 0.0


def test_quantized_and_skipped_layers_add_up_to_the_filter(rows):
    result, _ = rows
    for r in result:
        if r["config"] is None:
            assert r["quantized"] == 0 and not r["skipped"]
        else:
            assert r["quantized"] + len(r["skipped"]) == r["selected"] == 6, r["format"]
    by_name = {r["format"]: r for r in result}
    assert by_name["int8 weight-only"]["quantized"] == 6
    assert by_name["int4 weight-only g128"]["quantized"] == 1  # only ffn.w2 has in_features 128


def test_val_batches_are_estimate_loss_windows(rows):
    result, _ = rows
    for r in result:
        assert sum(r["val_batches"]) / len(r["val_batches"]) == pytest.approx(r["val_loss"], rel=1e-6)


def test_json_has_meta_and_the_same_rows(rows):
    result, saved = rows
    assert {"torch", "date", "config", "device"} <= set(saved["meta"])
    assert saved["meta"]["config"]["dim"] == 64 and saved["meta"]["config"]["eval_batches"] == 2
    assert [r["format"] for r in saved["rows"]] == [r["format"] for r in result]
