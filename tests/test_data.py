import datasets
import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.data import MergeDataModule, StepBatches
from adamerge.engine.datasets import DataError
from adamerge.evaluation.classification import accuracy


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
    batches = StepBatches(dm.calib, 4, 5, seed=0)
    assert set(batches[2]) == {"a", "b"}
    assert set(batches[2]["a"]) == {"input_ids", "attention_mask", "_index"}  # no labels
    resumed = StepBatches(dm.calib, 4, 5, seed=0, start=2)
    assert len(resumed) == 3
    torch.testing.assert_close(resumed[0]["a"]["input_ids"], batches[2]["a"]["input_ids"])


def test_bad_data_is_named():
    with pytest.raises(DataError, match="task 'a': dataset has no split 'validation'"):
        MergeDataModule({"a": toy_task()}, calib_split="validation").setup()
    with pytest.raises(DataError, match="calibration split 'calib' is empty"):
        MergeDataModule({"a": toy_task(n_calib=0)}).setup()
    with pytest.raises(DataError, match="no label column 'label'.*data.label_column"):
        MergeDataModule({"a": toy_task(labels=False)}).setup()
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
