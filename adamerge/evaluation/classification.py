"""Classification: top-1 accuracy of each task's head on its labeled evaluation split."""

from __future__ import annotations

from typing import Any

import torch

from adamerge.core.merged_base import MergedModelBase
from adamerge.engine.datasets import DataError
from adamerge.evaluation.protocol import Evaluator, Metric
from adamerge.objectives.entropy import logits_of


@torch.no_grad()
def accuracy(merged: MergedModelBase, params: Any, loader, task: str) -> float:
    """Top-1 accuracy of ``task``'s head on the merge ``params``; ``loader`` yields model inputs plus ``labels``."""
    device = merged.device
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = logits_of(merged(**batch, task=task, params=params))
        if labels.max() >= logits.shape[-1] or labels.min() < 0:
            raise ValueError(
                f"task {task!r}: labels reach {labels.max().item()} but its head has "
                f"{logits.shape[-1]} classes; the eval data does not belong to this head "
                "(check data.tasks against experts)"
            )
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


class Classification(Evaluator):
    """Accuracy (higher is better) of each task's head; the labels are ``data.label_column`` of the eval split."""

    metrics = (Metric("accuracy", higher_is_better=True),)
    chat_prompts = False

    def check(self, data) -> None:
        for task, dataset in data.eval.items():
            if data.label_column not in dataset.column_names:
                raise DataError(
                    f"task {task!r}: evaluation split {data.eval_split!r} has no label column "
                    f"{data.label_column!r} (columns: {dataset.column_names}); set data.label_column, or "
                    "evaluator=causal_lm for language-model experts"
                )

    def score(self, model: MergedModelBase, params: Any, data, task: str) -> dict[str, float]:
        return {"accuracy": accuracy(model, params, data.eval_dataloaders()[task], task)}
