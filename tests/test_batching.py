"""One forward over the concatenated task batches equals one forward per task, heads and all."""

import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.concat import concatenable, forward_concatenated
from tests.conftest import perturbed, tiny_bert_config


def task_batches(sizes, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"task{k}": {
            "input_ids": torch.randint(1, 40, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "_index": torch.arange(n),  # metadata: never reaches the model
        }
        for k, n in enumerate(sizes)
    }


def test_concatenable_needs_equal_keys_and_trailing_shapes():
    assert concatenable(task_batches([2, 3, 4]))
    ragged = task_batches([2, 3])
    ragged["task1"] = task_batches([3], length=5)["task0"]
    assert not concatenable(ragged)
    missing = task_batches([2, 3])
    del missing["task1"]["attention_mask"]
    assert not concatenable(missing)
    assert not concatenable(task_batches([2]))  # one task: nothing to join


@pytest.mark.parametrize("hidden", [False, True])
def test_concatenated_forward_equals_per_task_forwards(hidden):
    """Heads of different widths (2, 3 and 5 classes), unequal batch sizes, hidden states split back per task."""
    torch.manual_seed(0)
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification(tiny_bert_config()).eval()
    experts = {}
    for k, labels in enumerate([2, 3, 5]):
        torch.manual_seed(10 + k)
        experts[f"task{k}"] = perturbed(BertForSequenceClassification(tiny_bert_config(num_labels=labels)), k + 1)
    merged = MergedModel(make_pool(base, experts), granularity="layer", init=0.4)
    batches = task_batches([2, 3, 4])
    kwargs = {"output_hidden_states": True} if hidden else {}
    params = merged.merged_tensors()
    joined = forward_concatenated(merged, batches, params, **kwargs)
    for task, inputs in batches.items():
        alone = merged(inputs["input_ids"], attention_mask=inputs["attention_mask"], task=task, params=params, **kwargs)
        assert joined[task].logits.shape == alone.logits.shape
        torch.testing.assert_close(joined[task].logits, alone.logits, atol=1e-6, rtol=1e-5)
        if hidden:
            for mine, theirs in zip(joined[task].hidden_states, alone.hidden_states, strict=True):
                torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    # the base's own head is back afterwards: no hook is left behind
    assert not merged.model.classifier._forward_hooks


def test_unjoinable_batches_give_none(base_model, expert_states):
    merged = MergedModel(make_pool(base_model, expert_states), granularity="task")
    ragged = task_batches([2, 3, 1])
    ragged["task2"] = task_batches([2], length=5)["task0"]
    assert forward_concatenated(merged, ragged, merged.merged_tensors()) is None


def train_auto(merged, batches, steps):
    from functools import partial

    import lightning as L

    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective

    module = MergeModule(merged, entropy_objective, partial(torch.optim.SGD, lr=0.1), backward="auto")
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader([batches] * steps, batch_size=None))
    return module


def test_auto_times_both_modes_then_keeps_one(base_model, expert_states):
    merged = MergedModel(make_pool(base_model, expert_states), granularity="layer")
    module = train_auto(merged, task_batches([4, 4, 4]), steps=8)
    assert [len(t) for t in module.step_times.values()] == [3, 3]
    assert all(t > 0 for times in module.step_times.values() for t in times)
    assert module.choose_mode(task_batches([4, 4, 4])) in ("split", "concat")
    assert merged.coefficients.raw.grad is not None


def test_auto_falls_back_to_split_when_concat_runs_out_of_memory(base_model, expert_states, monkeypatch):
    from adamerge.engine.module import MergeModule

    def out_of_memory(self, batch, params):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(MergeModule, "concat_losses", out_of_memory)
    merged = MergedModel(make_pool(base_model, expert_states), granularity="layer")
    module = train_auto(merged, task_batches([4, 4, 4]), steps=4)
    assert module.step_times["concat"] == [float("inf")] * 3
    assert module.choose_mode(task_batches([4, 4, 4])) == "split"
    assert (merged.coefficients() != 0.3).any()  # every step still trained
