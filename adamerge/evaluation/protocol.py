"""The evaluator protocol: ``evaluate(model, params, data) -> {task: {metric: value}}`` with one primary metric.

An evaluator judges any merge (a static state dict, a learned coefficient table, an expert alone) through the merged
model's protocol, so the results table, the normalized scores and the loggers never depend on the task family.
``reference_rows`` gives the rows every table carries: the floor (the base through the task heads: no merging), each
expert on its own task (the ceiling of the normalized score) and task arithmetic at a fixed lambda.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adamerge.core.merged_base import MergedModelBase
from adamerge.progress import progress

log = logging.getLogger(__name__)

FLOOR = "base + heads (floor)"
EXPERT = "expert (own task)"

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class Metric:
    """A metric's name and direction: the results table normalizes by it (see ``adamerge.evaluation.results``)."""

    name: str
    higher_is_better: bool


class Evaluator:
    """Judges merges on each task's held-out split. Subclasses set ``metrics`` (the first is primary) and
    implement ``score``; ``check`` fails before any work when the data cannot be judged."""

    metrics: tuple[Metric, ...] = ()
    # Whether calibration prompts may go through the tokenizer's chat template (``data.chat_template=null``): a
    # language model is prompted as a chat; a classifier reads raw text when judged, so it calibrates on raw text.
    chat_prompts: bool = True

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def check(self, data) -> None:
        """Raise a clear error if ``data`` (the datamodule, set up) lacks what this evaluator reads."""

    def score(self, model: MergedModelBase, params: Any, data, task: str) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model: MergedModelBase, params: Any, data, tasks: Iterable[str] | None = None) -> Scores:
        """``{task: {metric: value}}`` for the merge ``params`` (every evaluation task unless ``tasks``)."""
        was_training = model.training
        model.eval()
        try:
            names = list(tasks or data.eval)
            return {task: self.score(model, params, data, task) for task in progress(names, "evaluating", log)}
        finally:
            model.train(was_training)


def reference_rows(
    model: MergedModelBase, evaluator: Evaluator, data, task_arithmetic: float = 0.3
) -> dict[str, Scores]:
    """The floor, each expert on its own task, and task arithmetic at a fixed lambda."""
    log.info("evaluating the references: floor, %d experts, task arithmetic", model.num_experts)
    rows = {FLOOR: evaluator.evaluate(model, model.constant_params(0.0), data)}
    rows[EXPERT] = {}
    for task in model.experts:
        if task in data.eval:
            rows[EXPERT] |= evaluator.evaluate(model, model.expert_params(task), data, [task])
    rows[f"task arithmetic (lam={task_arithmetic:g})"] = evaluator.evaluate(
        model, model.constant_params(task_arithmetic), data
    )
    return rows


def primary_values(rows: Mapping[str, Scores], metric: str) -> dict[str, dict[str, float]]:
    """row -> task -> the value of one metric."""
    return {row: {task: scores[metric] for task, scores in tasks.items()} for row, tasks in rows.items()}
