"""Causal-LM experts through the CLI's pipeline (experiment=tiny_lm): held-out response loss for every row."""

import math

import pytest

from adamerge.evaluation.protocol import Metric
from adamerge.evaluation.results import normalized, summarize
from adamerge.pipeline import run
from tests.test_config import make_cfg

TASKS = ("seq0", "seq1")


@pytest.mark.parametrize("method", ["adamerging", "expert_merging", "task_arithmetic", "ties"])
def test_tiny_lm_runs_end_to_end(method, tmp_path):
    overrides = [f"method={method}", f"paths.output_dir={tmp_path}", "experiment=tiny_lm", "~logger"]
    learned = method in ("adamerging", "expert_merging")
    overrides += ["method.steps=15"] if learned else []
    result = run(make_cfg(*overrides))
    rows = {row["method"]: row for row in result["table"]}
    assert list(rows)[:3] == ["base + heads (floor)", "expert (own task)", "task arithmetic (lam=0.3)"]
    assert method in rows
    floor, expert = rows["base + heads (floor)"], rows["expert (own task)"]
    for task in TASKS:
        # per-task held-out loss: the experts are specialists, the base is not
        assert 0 < expert[task] < 0.05 < floor[task], (task, expert[task], floor[task])
        assert rows[method][task] < floor[task]  # every merge keeps part of the experts' gain
        assert rows[method][f"{task} perplexity"] == pytest.approx(math.exp(rows[method][task]))
    assert floor["avg_normalized"] == 0.0 and expert["avg_normalized"] == 1.0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("Task columns: loss (lower is better)") and f"| {method} |" in text
    assert (tmp_path / "merged" / "model" / "config.json").exists()
    assert result["calibration_loss"] is not None and math.isfinite(result["calibration_loss"])
    if learned:
        assert (tmp_path / "coefficients.png").exists() and result["coefficients"]["granularity"] == "layer"


def test_normalized_score_follows_the_metric_direction():
    acc, loss = Metric("accuracy", True), Metric("loss", False)
    assert normalized(0.8, expert=1.0, floor=0.5, metric=acc) == pytest.approx(0.8)
    assert normalized(0.4, expert=0.2, floor=1.0, metric=loss) == pytest.approx(0.75)  # 3/4 of the gap kept
    assert math.isnan(normalized(0.4, expert=0.5, floor=0.5, metric=loss))  # no gap to keep
    rows = {
        "base + heads (floor)": {"a": {"loss": 1.0}},
        "expert (own task)": {"a": {"loss": 0.2}},
        "m": {"a": {"loss": 0.6}},
    }
    table = summarize(rows, [loss])
    assert [row["avg_normalized"] for row in table] == pytest.approx([0.0, 1.0, 0.5])
