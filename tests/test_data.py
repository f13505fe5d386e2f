import itertools

import datasets
import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.data import MergeDataModule, StepBatches
from adamerge.engine.datasets import DataError
from adamerge.evaluation.classification import Classification, accuracy


def toy_task(n_calib=6, n_test=4, labels=True):
    def rows(n):
        return {
            "input_ids": [[1, 2, 3, i % 5 + 4] for i in range(n)],
            "attention_mask": [[1, 1, 1, 1]] * n,
            **({"label": [i % 3 for i in range(n)]} if labels else {}),
        }

    return datasets.DatasetDict(
        {"calib": datasets.Dataset.from_dict(rows(n_calib)), "test": datasets.Dataset.from_dict(rows(n_test))}
    )


def test_training_batches_have_no_labels_and_depend_only_on_the_step():
    dm = MergeDataModule({"a": toy_task(), "b": toy_task()}, batch_size=4, num_steps=5)
    dm.setup()
    batches = StepBatches(dm.calib, 4, seed=0)
    assert set(batches.batch(2)) == {"a", "b"}
    assert set(batches.batch(2)["a"]) == {"input_ids", "attention_mask", "_index"}  # no labels
    resumed = next(iter(StepBatches(dm.calib, 4, seed=0, start=2)))
    torch.testing.assert_close(resumed["a"]["input_ids"], batches.batch(2)["a"]["input_ids"])
    dm.start_step = 2  # without a trainer (a resumed trainer sets it from its global step)
    torch.testing.assert_close(next(iter(dm.train_dataloader()))["b"]["_index"], batches.batch(2)["b"]["_index"])


def test_the_seed_picks_calibration_rows_but_never_the_test_rows():
    """Runs of several seeds are compared on one test set: a capped test split is the same rows for every seed."""

    def distinct(n):  # rows told apart by their ids
        return {"input_ids": [[i, i + 1] for i in range(n)], "attention_mask": [[1, 1]] * n, "label": [0] * n}

    task = datasets.DatasetDict({s: datasets.Dataset.from_dict(distinct(40)) for s in ("calib", "test")})
    rows = {}
    for seed in (0, 1):
        dm = MergeDataModule({"a": task}, max_calib=5, max_eval=5, seed=seed)
        dm.setup()
        rows[seed] = dm.calib["a"]["input_ids"], dm.eval["a"]["input_ids"]
    assert rows[0][0] != rows[1][0]  # calibration rows: by seed
    assert rows[0][1] == rows[1][1]  # test rows: the same


def test_stream_is_endless_and_every_pass_is_a_new_permutation():
    """No epoch ever ends (a resumed epoch that ended early made Lightning replay the stream from its start)."""
    dm = MergeDataModule({"a": toy_task(n_calib=6)}, batch_size=3)
    dm.setup()
    stream = StepBatches(dm.calib, 3, seed=0)
    rows = torch.cat([b["a"]["_index"] for b in itertools.islice(iter(stream), 40)])  # 20 passes over 6 rows
    passes = rows.view(20, 6)
    assert all(sorted(p.tolist()) == list(range(6)) for p in passes)
    assert len({tuple(p.tolist()) for p in passes}) > 1
    assert len(list(StepBatches(dm.calib, 3, num_steps=5, seed=0, start=2))) == 3


def test_ranks_take_contiguous_shares_of_every_step():
    dm = MergeDataModule({"a": toy_task(n_calib=10), "b": toy_task(n_calib=7)}, batch_size=4)
    dm.setup()
    whole = StepBatches(dm.calib, 4, seed=3)
    shares = [StepBatches(dm.calib, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 1, 5):
        for task in ("a", "b"):
            for key in ("_index", "input_ids"):
                joined = torch.cat([s.batch(step)[task][key] for s in shares])
                torch.testing.assert_close(joined, whole.batch(step)[task][key])
    with pytest.raises(DataError, match=r"data.batch_size=6 does not split evenly over 4 processes"):
        StepBatches(dm.calib, 6, world_size=4)


def test_dataloader_workers_keep_the_step_order():
    dm = MergeDataModule({"a": toy_task(n_calib=10)}, batch_size=2, num_workers=2)
    dm.setup()
    dm.start_step = 3
    got = [b["a"]["_index"] for b in itertools.islice(iter(dm.train_dataloader()), 6)]
    want = [StepBatches(dm.calib, 2).batch(step)["a"]["_index"] for step in range(3, 9)]
    torch.testing.assert_close(got, want)


def test_bad_data_is_named():
    with pytest.raises(DataError, match="task 'a': dataset has no split 'validation'"):
        MergeDataModule({"a": toy_task()}, calib_split="validation").setup()
    with pytest.raises(DataError, match="calibration split 'calib' is empty"):
        MergeDataModule({"a": toy_task(n_calib=0)}).setup()
    unlabeled = MergeDataModule({"a": toy_task(labels=False)})
    unlabeled.setup()  # a causal-LM evaluation split has no labels: what it must hold is the evaluator's check
    with pytest.raises(DataError, match="no label column 'label'.*data.label_column"):
        Classification().check(unlabeled)
    raw = datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"sentence": ["hi"], "label": [0]}) for s in ("calib", "test")}
    )
    with pytest.raises(DataError, match="no text column 'text'.*data.text_column"):
        MergeDataModule({"a": raw}, tokenizer=object()).setup()
    with pytest.raises(DataError, match="no tasks"):
        MergeDataModule({})


def test_head_with_too_few_classes_is_refused(base_model, expert_states, batch):
    merged = MergedModel(make_pool(base_model, expert_states))
    loader = [batch | {"labels": torch.tensor([0, 1, 2, 7])}]  # the tiny heads have 3 classes
    with pytest.raises(ValueError, match="labels reach 7 but its head has 3 classes"):
        accuracy(merged, merged.merged_tensors(), loader, "task0")
