"""Causal LMs: a tiny Llama fine-tuned here into two experts; Expert Merging beats task arithmetic on their losses."""

from __future__ import annotations

import copy

import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.train import fit_coefficients
from adamerge.evaluation.causal_lm import lm_loss
from adamerge.objectives.alignment import ExpertAlignment
from adamerge.objectives.generation import with_expert_responses
from adamerge.objectives.teachers import build_teacher_cache
from adamerge.testbeds.tiny_lm import build_tiny_lm

PROMPT = 7  # 6 prompt tokens + the separator (adamerge.testbeds.tiny_lm.lm_task_dataset defaults)


@pytest.fixture(scope="module")
def tiny_lm():
    return build_tiny_lm(num_tasks=2, seed=0)


def make_merged(tiny_lm, **kwargs) -> MergedModel:
    base, experts, _ = tiny_lm
    return MergedModel(make_pool(copy.deepcopy(base), experts), **kwargs)


def constant(merged: MergedModel, value: float) -> dict:
    return merged.merged_tensors(torch.full_like(merged.coefficients(), value))


def test_experts_are_specialists(tiny_lm):
    merged = make_merged(tiny_lm, granularity="task")
    _, _, tasks = tiny_lm
    for k, task in enumerate(merged.experts):
        one_hot = torch.zeros(2, 1)
        one_hot[k] = 1.0
        own = lm_loss(merged, merged.merged_tensors(one_hot), tasks[task]["test"])
        other = lm_loss(merged, merged.merged_tensors(1 - one_hot), tasks[task]["test"])
        assert own < 0.05 < 1.0 < other, (task, own, other)


def test_cache_rows_are_the_response_positions(tiny_lm):
    merged = make_merged(tiny_lm, granularity="layer")
    _, _, tasks = tiny_lm
    calib = {t: d["calib"].select(range(3)) for t, d in tasks.items()}
    cache = build_teacher_cache(merged, calib, layers="last", top_k=5, batch_size=2)
    store = cache.stores["seq0"]
    n = len(calib["seq0"][0]["input_ids"])
    assert store.positions[: n - PROMPT].tolist() == list(range(PROMPT - 1, n - 1))
    target = cache.targets("seq0", {"_index": torch.tensor([2, 0])})
    assert target.logits.shape == (2 * (n - PROMPT), 5) and target.ids.shape == (2 * (n - PROMPT), 5)
    assert target.logits.dtype == torch.bfloat16 and target.hidden.shape == (2 * (n - PROMPT), 1, 32)
    # the expert's top-1 at each response position is the next token of its rule
    ids = torch.tensor(calib["seq0"][2]["input_ids"])
    assert target.ids[: n - PROMPT, 0].tolist() == ids[PROMPT:].tolist()


def test_expert_generated_responses(tiny_lm):
    merged = make_merged(tiny_lm, granularity="layer")
    _, _, tasks = tiny_lm
    prompts = {
        t: d["calib"].select(range(4)).map(lambda r: {"input_ids": r["input_ids"][:PROMPT]}) for t, d in tasks.items()
    }
    prompts = {t: d.remove_columns(["attention_mask", "response_mask"]) for t, d in prompts.items()}
    completed = with_expert_responses(merged, prompts, max_new_tokens=8)
    for task, data in completed.items():
        truth = tasks[task]["calib"].select(range(4))
        assert data["input_ids"] == truth["input_ids"]  # each expert continues its own rule
        assert data["response_mask"][0] == [0] * PROMPT + [1] * 8


def test_expert_merging_beats_task_arithmetic_on_the_experts_own_loss(tiny_lm):
    _, _, tasks = tiny_lm
    merged = make_merged(tiny_lm, granularity="layer", init=0.1, parametrization="sigmoid", clamp=None)
    calib = {t: d["calib"].select(range(8)) for t, d in tasks.items()}  # a handful of samples, as in the paper
    objective = ExpertAlignment(temperature=1.0, hidden_weight=1.0, coef_reg=0.0, layers="middle")
    fit_coefficients(merged, objective, calib, steps=40, lr=0.05, batch_size=4)
    learned = {t: lm_loss(merged, None, d["test"]) for t, d in tasks.items()}
    arithmetic = {t: lm_loss(merged, constant(merged, 0.3), d["test"]) for t, d in tasks.items()}
    for task in tasks:
        assert learned[task] < arithmetic[task], (task, learned, arithmetic)


def test_alignment_on_expert_generated_responses(tiny_lm):
    """Prompt-only calibration: each expert answers its prompts once; the cache covers the responses only."""
    merged = make_merged(tiny_lm, granularity="layer", init=0.1, parametrization="sigmoid", clamp=None)
    _, _, tasks = tiny_lm
    prompts = {
        t: d["calib"]
        .select(range(4))
        .map(lambda r: {"input_ids": r["input_ids"][:PROMPT]})
        .select_columns(["input_ids"])
        for t, d in tasks.items()
    }
    objective = ExpertAlignment(layers="middle", generate=5)
    fit_coefficients(merged, objective, prompts, steps=3, lr=0.05, batch_size=2)
    assert all(len(r) == PROMPT + 5 for d in objective.datasets.values() for r in d["input_ids"])
    store = objective.teacher.stores["seq1"]
    assert store.positions[:5].tolist() == list(range(PROMPT - 1, PROMPT + 4))  # predicting the 5 response tokens
    assert (merged.coefficients() != 0.1).any()


def test_a_row_without_tasks_has_no_average():
    """The experts' row is empty when no evaluation task maps to an expert (lm-eval tasks): its average was 0."""
    import math

    from adamerge.evaluation.protocol import EXPERT, FLOOR, Metric
    from adamerge.evaluation.results import summarize

    rows = {FLOOR: {"t": {"acc": 0.5}}, EXPERT: {}, "merge": {"t": {"acc": 0.75}}}
    table = {row["method"]: row for row in summarize(rows, [Metric("acc", True)])}
    assert math.isnan(table[EXPERT]["avg"]) and table["merge"]["avg"] == 0.75
