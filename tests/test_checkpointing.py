"""Activation checkpointing under functional_call: recomputed blocks see the merged tensors, gradients unchanged."""

import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from tests.conftest import coefficient_grads, perturbed, tiny_bert_config


def test_checkpointed_blocks_recompute_with_the_merged_tensors(base_model, expert_states, batch):
    pool = make_pool(base_model, expert_states)
    plain = MergedModel(pool, granularity="layer", init=0.4)
    checkpointed = MergedModel(pool, granularity="layer", init=0.4, activation_checkpointing=True)
    assert checkpointed.checkpointed == ["bert.encoder.layer.0", "bert.encoder.layer.1"]

    calls = []
    block = checkpointed.model.get_submodule("bert.encoder.layer.1.intermediate")  # a module inside a block
    block.register_forward_hook(lambda module, args, out: calls.append(module.dense.weight.data_ptr()))
    grads = coefficient_grads(checkpointed, batch)
    # each task's forward ran the block twice, the second time in the backward, both times on the merged tensors
    assert len(calls) == 2 * len(checkpointed.experts)
    merged_weight = checkpointed.training_leaves(checkpointed.coefficients().detach())
    assert set(calls) == {merged_weight["bert.encoder.layer.1.intermediate.dense.weight"].data_ptr()}
    torch.testing.assert_close(grads, coefficient_grads(plain, batch), atol=1e-6, rtol=1e-5)
    # the wrappers are gone after the forward, and evaluation (no grad) never checkpoints
    assert "forward" not in checkpointed.model.get_submodule("bert.encoder.layer.0").__dict__
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(**batch, task="task0").logits, plain(**batch, task="task0").logits)


def test_no_block_found_is_a_clear_error(base_model, expert_states):
    with pytest.raises(ValueError, match="method.block_pattern"):
        MergedModel(make_pool(base_model, expert_states), activation_checkpointing=True, block_pattern=r"^(nothing)\.")


def saved_activation_bytes(merged, batch) -> int:
    """Bytes autograd keeps for the backward during one forward (activations; the merged weights excluded)."""
    leaves = merged.training_leaves(merged.coefficients().detach())
    weights = {t.data_ptr() for t in leaves.values()}
    seen = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        merged(**batch, task="task0", params=leaves).logits.sum().backward()
    return sum(seen.values())


def test_checkpointing_keeps_fewer_activations():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=4)).eval()
    experts = {f"task{k}": perturbed(base, seed=k + 1) for k in range(2)}
    pool = make_pool(base, experts)
    batch = {"input_ids": torch.randint(1, 40, (8, 16)), "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    plain = saved_activation_bytes(MergedModel(pool), batch)
    checkpointed = saved_activation_bytes(MergedModel(pool, activation_checkpointing=True), batch)
    print(f"saved activations: {plain} bytes plain, {checkpointed} checkpointed")
    assert checkpointed < 0.5 * plain
