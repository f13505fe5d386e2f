import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from adamerge.atomic import write_atomic
from adamerge.core.export import export_merged, load_coefficients, load_merged
from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool


def test_export_round_trip_reloads_with_plain_from_pretrained(tmp_path, base_model, expert_states, batch):
    merged = MergedModel(make_pool(base_model, expert_states), granularity="block", init=[0.2, 0.5, 0.7])
    export_merged(merged, tmp_path / "out")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
    with torch.no_grad():
        expected = merged(**batch).logits
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)
        # with a task's head put in place
        task_model = load_merged(tmp_path / "out", "task1", "transformers.AutoModelForSequenceClassification")
        torch.testing.assert_close(task_model(**batch).logits, merged(**batch, task="task1").logits, atol=1e-5, rtol=0)
    record = json.loads((tmp_path / "out" / "coefficients.json").read_text())
    assert record["experts"] == ["task0", "task1", "task2"] and record["granularity"] == "block"
    # the JSON reproduces the merge
    again = MergedModel(make_pool(base_model, expert_states), granularity="block")
    load_coefficients(again, tmp_path / "out" / "coefficients.json")
    torch.testing.assert_close(again.coefficients(), merged.coefficients())
    with pytest.raises(FileNotFoundError, match="no head for task 'nope'"):
        load_merged(tmp_path / "out", "nope")


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old")

    def crash(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_failed_export_keeps_previous_export(tmp_path, base_model, expert_states, monkeypatch):
    merged = MergedModel(make_pool(base_model, expert_states))
    export_merged(merged, tmp_path / "out")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    monkeypatch.setattr("adamerge.core.export.coefficients_record", lambda m: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        export_merged(merged, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
