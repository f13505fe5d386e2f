"""Training objectives: plain functions ``objective(outputs, task, batch) -> scalar loss``, chosen by config.

AdaMerging's objective is the Shannon entropy of each task head's prediction on unlabeled test data, averaged over
the batch and summed over tasks (the sum over tasks is the trainer's: one loss per task batch).
https://arxiv.org/abs/2310.02575
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def logits_of(outputs) -> Tensor:
    """Logits from a model output: ``.logits`` of a Hugging Face output, else the output itself or its first item."""
    if isinstance(outputs, Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    return outputs[0]


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) along the last dim, computed in float32 for bf16 safety. Shape: logits[:-1]."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_objective(outputs, task: str | None = None, batch: Mapping | None = None) -> Tensor:
    """Mean prediction entropy over the batch (over the non-padding tokens for sequence outputs)."""
    h = entropy(logits_of(outputs))
    if h.dim() == 2 and batch is not None and "attention_mask" in batch:  # (B, T): per-token predictions
        mask = batch["attention_mask"].to(h.dtype)
        return (h * mask).sum() / mask.sum().clamp_min(1)
    return h.mean()
