"""Judge merges: per-task accuracy of any set of merged tensors, next to honest references.

Every table carries the floor (the base backbone read through the task heads, i.e. no merging at all), each
expert on its own task (the ceiling used for normalized accuracy = acc / expert acc) and task arithmetic.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from adamerge.artifacts.atomic import write_text
from adamerge.core.merged import MergedModel
from adamerge.objectives.entropy import logits_of

log = logging.getLogger(__name__)

FLOOR = "base + heads (floor)"
EXPERT = "expert (own task)"


@torch.no_grad()
def accuracy(merged: MergedModel, params: Mapping[str, Tensor], loader: DataLoader, task: str) -> float:
    """Top-1 accuracy of ``task``'s head on the merged tensors ``params``."""
    device = next(iter(params.values())).device
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


def evaluate(merged: MergedModel, params: Mapping[str, Tensor], loaders: Mapping[str, DataLoader]) -> dict[str, float]:
    was_training = merged.training
    merged.eval()
    try:
        return {task: accuracy(merged, params, loader, task) for task, loader in loaders.items()}
    finally:
        merged.train(was_training)


def constant_params(merged: MergedModel, value: float | Tensor) -> dict[str, Tensor]:
    """Merged tensors for a constant coefficient table (0 = the base, 0.3 = task arithmetic at 0.3, ...)."""
    lam = torch.as_tensor(value, dtype=torch.float32).expand(merged.num_experts, len(merged.group_names))
    with torch.no_grad():
        return merged.merged_tensors(lam.to(merged.coefficients.raw.device))


def reference_rows(
    merged: MergedModel, loaders: Mapping[str, DataLoader], task_arithmetic: float = 0.3
) -> dict[str, dict[str, float]]:
    """The floor, each expert on its own task, and task arithmetic at a fixed lambda."""
    rows = {FLOOR: evaluate(merged, constant_params(merged, 0.0), loaders)}
    expert_row = {}
    for k, task in enumerate(merged.experts):
        if task not in loaders:
            continue
        one_hot = torch.zeros(merged.num_experts, 1)
        one_hot[k] = 1.0
        expert_row[task] = evaluate(merged, constant_params(merged, one_hot), {task: loaders[task]})[task]
    rows[EXPERT] = expert_row
    rows[f"task arithmetic (lam={task_arithmetic:g})"] = evaluate(
        merged, constant_params(merged, task_arithmetic), loaders
    )
    return rows


def summarize(rows: Mapping[str, Mapping[str, float]]) -> list[dict]:
    """Rows with per-task accuracy, their average and the average normalized accuracy (acc / expert acc)."""
    experts = rows.get(EXPERT, {})
    table = []
    for method, accs in rows.items():
        row = {"method": method, **{t: accs[t] for t in accs}, "avg": sum(accs.values()) / max(len(accs), 1)}
        normalized = [accs[t] / experts[t] for t in accs if experts.get(t)]
        row["avg_normalized"] = sum(normalized) / len(normalized) if normalized else float("nan")
        table.append(row)
    return table


def to_markdown(table: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in table for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def write_results(table: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return write_text(out_dir / "results.csv", to_csv(table)), write_text(out_dir / "results.md", to_markdown(table))
