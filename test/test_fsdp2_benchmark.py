"""benchmarks/fsdp2.py under torchrun on CPU (gloo, 2 ranks, tiny model) and count_fsdp_comms' errors.

The smoke run is the script a GPU run uses, end to end: every quantframe row trains sharded, its
first losses match rank 0's unsharded run, and the all-gather bytes it reports are the shards'.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from quantframe.distributed import count_fsdp_comms

_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "fsdp2.py"
WORLD = 2


def _torchrun(script: Path, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``script --cpu-smoke --json --out out *args`` on WORLD gloo ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(script), "--cpu-smoke", "--json", "--out", str(out), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _run_smoke(out: Path, *args: str) -> None:
    done = _torchrun(_SCRIPT, out, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2")
    _run_smoke(out, "--batch", "6")
    # a batch other than the anchor's 4 goes to its own file (the anchor's results stay the anchor's)
    return json.loads((out / f"fsdp2_cpu_x{WORLD}_b6.json").read_text())


def _rows(smoke) -> dict[str, dict]:
    return {r["run"]: r for r in smoke["rows"]}


def test_every_quantframe_row_trains_sharded_and_matches_the_unsharded_run(smoke):
    rows = _rows(smoke)
    assert smoke["meta"]["world"] == WORLD and smoke["meta"]["batch"] == 6
    for name, r in rows.items():
        if name.startswith("torchao"):  # a peer: runs where torchao is installed, else says why
            assert "error" in r or "ms_per_step" in r
            continue
        assert "error" not in r, (name, r.get("error"))
        # the first 3 losses of the sharded run (mean over ranks) are the unsharded run's, and the
        # loss moved far more than they differ (bf16 weights; INT8 rows add stochastic rounding)
        assert r["loss_rel_diff"] < 2e-3, name
        assert r["loss_moved"] > 5 * r["loss_rel_diff"], name
        assert r["all_gather_calls"] > 0 and r["all_gather_bytes"] > 0


def test_rows_report_host_time_per_phase(smoke):
    for r in _rows(smoke).values():
        if "error" in r:
            continue
        host = r["host_ms"]  # the largest rank's, per step
        assert set(host) == {"fwd", "bwd", "opt", "rest"}, r["run"]
        assert all(v >= 0 for v in host.values()) and host["fwd"] > 0 and host["bwd"] > 0, r["run"]


def test_no_reshard_drops_the_backward_all_gathers(smoke, tmp_path):
    _run_smoke(tmp_path, "--batch", "6", "--no-reshard", "--only", "bf16, torch|quantframe int8 QT")
    kept = json.loads((tmp_path / f"fsdp2_cpu_x{WORLD}_b6_noreshard.json").read_text())
    assert kept["meta"]["reshard_after_forward"] is False and smoke["meta"]["reshard_after_forward"] is True
    resharded = _rows(smoke)
    for name, r in _rows(kept).items():
        assert "error" not in r, (name, r.get("error"))
        # blocks stay unsharded from forward to backward: each is all-gathered once a step, not twice
        assert 2 * r["all_gather_calls"] == resharded[name]["all_gather_calls"] > 0, name
        assert r["loss_rel_diff"] < 2e-3 and r["loss_moved"] > 5 * r["loss_rel_diff"], name


def test_int8_weights_halve_the_all_gather_bytes(smoke):
    rows = _rows(smoke)
    bf16 = rows["bf16, torch AdamW"]["all_gather_bytes"]
    for name in ("quantframe int8 QT + AdamW", "quantframe int8 MP + int8 weights + AdamW"):
        ratio = rows[name]["all_gather_bytes"] / bf16
        assert 0.5 < ratio <= 0.52, (name, ratio)  # int8 + fp32 row scales (dim 256: +2/256), bf16 norms
    # bf16 master weights (INT8 matmuls only) gather what bf16 gathers
    assert rows["quantframe int8 mixed precision + AdamW"]["all_gather_bytes"] == bf16
    # a frozen NF4 base moves ~4.25 bits a weight (codes + quantized block scales) instead of 16
    lora = rows["bf16 base + LoRA r16, torch AdamW"]["all_gather_bytes"]
    assert rows["NF4 base + LoRA r16 (QLoRA), torch AdamW"]["all_gather_bytes"] / lora < 0.35


def test_count_fsdp_comms_needs_a_sharded_model():
    with pytest.raises(ValueError, match="no module of the model is fully_shard-ed"):
        count_fsdp_comms(nn.Linear(4, 4))



def test_tables_print_one_rank_runs_without_an_all_gather_ratio(capsys):
    # one rank: FSDP2 runs no collective, every row reports 0 all-gather bytes
    sys.path.insert(0, str(_SCRIPT.parent))
    try:
        import fsdp2
    finally:
        sys.path.remove(str(_SCRIPT.parent))
    row = dict(table="training", ms_per_step=2.0, peak_gib=0.0, all_gather_bytes=0, reduce_scatter_bytes=0)
    fsdp2.print_tables([{**row, "run": "bf16, torch AdamW"}, {**row, "run": "quantframe int8 QT + AdamW"}], 1)
    lines = capsys.readouterr().out.splitlines()
    assert "training (1 rank)" in lines
    assert lines[-1].split()[-6:-4] == ["0.0", "n/a"]  # AG MiB, AG/bf16


_ONE_RANK_FAILS = """
import sys, torch.distributed as dist
sys.path.insert(0, {bench!r})
import fsdp2

def fail_on_rank_1(model):
    if dist.get_rank() == 1:  # e.g. a compile error on one rank only
        raise RuntimeError("rank 1 only")

fsdp2.ROWS = {{"bf16, torch AdamW": fsdp2.ROWS["bf16, torch AdamW"],
               "fails on rank 1": fsdp2.Row("training", fail_on_rank_1, fsdp2.torch_adamw),
               "never reached": fsdp2.ROWS["bf16, torch AdamW"]}}
fsdp2.main(sys.argv[1:])
"""


def test_a_row_failing_on_one_rank_stops_the_run_and_keeps_the_rows_measured(tmp_path):
    # rank 1 skips the row, rank 0 waits in the row's first collective: without the watchdog barrier
    # the run would hang until the process group's 5-minute timeout
    script = tmp_path / "one_rank_fails.py"
    script.write_text(_ONE_RANK_FAILS.format(bench=str(_SCRIPT.parent)))
    done = _torchrun(script, tmp_path, "--check-steps", "0", "--row-sync-timeout", "5", timeout=120)
    assert done.returncode != 0
    assert "did not all finish row 'fails on rank 1'" in done.stdout + done.stderr
    result = json.loads((tmp_path / f"fsdp2_cpu_x{WORLD}.json").read_text())
    assert result["meta"]["complete"] is False
    assert [r["run"] for r in result["rows"]] == ["bf16, torch AdamW"] and "ms_per_step" in result["rows"][0]
