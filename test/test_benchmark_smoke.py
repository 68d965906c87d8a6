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
