"""Tiny models built from configs; no network."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

NUM_LABELS = 3

# The suite runs tiny models: thread hand-offs cost more than they save (measured 117 s -> 3 s on the DOGE tests).
torch.set_num_threads(1)


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=NUM_LABELS,
    )
    return BertConfig(**(kwargs | overrides))


def coefficient_grads(merged, batch) -> torch.Tensor:
    """d(sum over tasks of mean logsumexp) / d raw coefficients, through the trainer's two-stage backward."""
    from adamerge.core.merged_base import two_stage_backward

    def run(params):
        for task in merged.experts:
            yield merged(**batch, task=task, params=params).logits.logsumexp(-1).mean()

    merged.coefficients.raw.grad = None
    two_stage_backward(merged, run)
    return merged.coefficients.raw.grad.clone()


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """An 'expert': every floating tensor moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t.clone()
        for n, t in model.state_dict().items()
    }


@pytest.fixture
def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def expert_states(base_model) -> dict[str, dict[str, torch.Tensor]]:
    return {f"task{k}": perturbed(base_model, seed=k + 1) for k in range(3)}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    # Token 0 is BERT's padding_idx, whose embedding row gets no gradient by design: keep it out of the batch so
    # that finite differences and autograd measure the same function.
    return {
        "input_ids": torch.randint(1, 40, (4, 8), generator=g),
        "attention_mask": torch.ones(4, 8, dtype=torch.long),
    }
