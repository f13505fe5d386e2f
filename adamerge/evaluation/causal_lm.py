"""Causal LMs: the held-out next-token loss (and perplexity) on response tokens, the metric of LLM experts.

Any ``AutoModelForCausalLM`` (Llama, Qwen, Mistral, GPT-2 ...) merges like the other models: its ``lm_head`` is an
ordinary merged tensor (or tied to the embeddings), nothing is task-specific. A ``response_mask`` column (1 on
response tokens) restricts the loss to the responses; without one, every attended token counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.merged_base import MergedModelBase
from adamerge.engine.datasets import MODEL_INPUTS, DataError, collate
from adamerge.evaluation.protocol import Evaluator, Metric


def response_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """Next-token labels on the response tokens only (-100 elsewhere), as Hugging Face causal LMs expect."""
    mask = batch.get("response_mask", batch.get("attention_mask"))
    return batch["input_ids"].masked_fill(mask == 0, -100)


@torch.no_grad()
def lm_loss(merged, params: Any, dataset, batch_size: int = 32, pad_id: int = 0) -> float:
    """Mean next-token cross-entropy over the response tokens of ``dataset`` (attended tokens if no mask)."""
    was_training = merged.training
    merged.eval()
    keys = [c for c in dataset.column_names if c in (*MODEL_INPUTS, "response_mask")]
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(merged.device) for k, v in collate(rows, keys, pad_id).items()}
            labels = response_labels(batch)[:, 1:]
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
            logits = merged(**inputs, params=params).logits[:, :-1].float()
            total += nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
            count += int((labels != -100).sum())
    finally:
        merged.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped where it would overflow (a diverged merge still gets a finite, huge number)."""
    return math.exp(min(loss, 700.0))


class CausalLM(Evaluator):
    """Held-out next-token loss on the response tokens (primary, lower is better) and its perplexity.

    Args:
        batch_size: sequences per forward.
    """

    metrics = (Metric("loss", higher_is_better=False), Metric("perplexity", higher_is_better=False))

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    def check(self, data) -> None:
        for task, dataset in data.eval.items():
            if "input_ids" not in dataset.column_names:
                raise DataError(
                    f"task {task!r}: evaluation split {data.eval_split!r} has no input_ids (columns: "
                    f"{dataset.column_names}); tokenize it (data.tokenizer) for evaluator=causal_lm"
                )

    def score(self, model: MergedModelBase, params: Any, data, task: str) -> dict[str, float]:
        loss = lm_loss(model, params, data.eval[task], self.batch_size, data.pad_id)
        return {"loss": loss, "perplexity": perplexity(loss)}
