"""Expert Merging++ chunking: allocation by hand, K=1 = layer-wise, warm start, importance vs uniform on tiny."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.train import fit_coefficients
from adamerge.methods.chunking import (
    ImportanceChunking,
    allocate_chunks,
    chunk_init,
    chunked_model,
    importance_scores,
    uniform_chunks,
)
from adamerge.objectives.alignment import ExpertAlignment


def test_allocation_by_hand():
    numel = {"a": 4096, "b": 4096, "c": 4096, "norm": 16}
    scores = {"a": 3.0, "b": 1.0, "c": 0.0, "norm": 100.0}
    # 3 eligible tensors x budget 2 = 6 chunks: one each, the 3 extra by score (2.25, 0.75, 0): a +2, b +1 (remainder)
    assert allocate_chunks(scores, numel, budget=2, max_chunks=16, min_numel=1024) == {
        "a": 3,
        "b": 2,
        "c": 1,
        "norm": 1,
    }
    # capped at 2: a's overflow goes on to the next by remainder
    assert allocate_chunks(scores, numel, budget=2, max_chunks=2, min_numel=1024) == {"a": 2, "b": 2, "c": 2, "norm": 1}
    assert uniform_chunks(numel, budget=2, min_numel=1024) == {"a": 2, "b": 2, "c": 2, "norm": 1}
    # equal scores: an even split
    even = allocate_chunks(dict.fromkeys(numel, 1.0), numel, budget=4, min_numel=1024)
    assert even == {"a": 4, "b": 4, "c": 4, "norm": 1}
    with pytest.raises(ValueError, match="method.chunking.budget"):
        allocate_chunks(scores, numel, budget=0.5)


def test_importance_score_by_hand():
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    experts = {
        "x": {"0.weight": torch.full((2, 2), 2.0), "0.bias": torch.tensor([3.0, 4.0])},
        "y": {"0.weight": torch.tensor([[0.0, 0.0], [0.0, 4.0]]), "0.bias": torch.zeros(2)},
    }
    merged = MergedModel(make_pool(model, experts), granularity="layer", init=[[0.5, 0.1], [0.25, 0.3]], clamp=None)
    scores = importance_scores(merged, numel_power=0.5)
    # weight: 0.5 * rms(2,2,2,2) * 2 + 0.25 * rms(0,0,0,4) * 2 = 0.5*2*2 + 0.25*2*2 = 3
    assert scores["0.weight"] == pytest.approx(3.0)
    # bias: 0.1 * rms(3, 4) * sqrt(2) + 0 = 0.1 * 5 = 0.5 (the Frobenius norm)
    assert scores["0.bias"] == pytest.approx(0.5)
    assert importance_scores(merged, numel_power=0.0)["0.bias"] == pytest.approx(0.5 / math.sqrt(2))


def test_one_chunk_per_tensor_is_layer_wise(base_model, expert_states, batch):
    layer = MergedModel(make_pool(copy.deepcopy(base_model), expert_states), granularity="layer", init=0.2)
    chunk = MergedModel(make_pool(copy.deepcopy(base_model), expert_states), granularity="chunk", init=0.2, chunks=1)
    assert chunk.group_names == layer.group_names
    lam = torch.rand_like(layer.coefficients())
    for name, value in layer.merged_tensors(lam).items():
        torch.testing.assert_close(chunk.merged_tensors(lam)[name], value)


def test_one_chunk_training_equals_layer_wise_training(base_model, expert_states):
    import datasets

    g = torch.Generator().manual_seed(3)
    calib = {
        t: datasets.Dataset.from_dict({"input_ids": torch.randint(1, 40, (6, 8), generator=g).tolist()})
        for t in expert_states
    }
    results = []
    for granularity in ("layer", "chunk"):
        merged = MergedModel(
            make_pool(copy.deepcopy(base_model), expert_states),
            granularity=granularity,
            init=0.1,
            parametrization="sigmoid",
            chunks=1,
        )
        objective = ExpertAlignment(temperature=2.0, layers="all", coef_reg=0.01, cache_dtype="float32")
        fit_coefficients(merged, objective, calib, steps=5, lr=0.05, batch_size=3)
        results.append(merged.coefficients().detach())
    assert (results[0] - 0.1).abs().max() > 1e-3
    torch.testing.assert_close(results[0], results[1])


def test_chunked_model_starts_at_the_layer_wise_merge(base_model, expert_states):
    pool = make_pool(copy.deepcopy(base_model), expert_states)
    layer = MergedModel(pool, granularity="layer", init=0.3, parametrization="sigmoid")
    with torch.no_grad():
        layer.coefficients.raw.normal_(generator=torch.Generator().manual_seed(0))
    chunks = ImportanceChunking(budget=3, max_chunks=8, min_numel=64)(layer)
    assert max(chunks.values()) > 1 and min(chunks.values()) == 1
    eligible = [n for n, tau in pool.task_vectors.items() if tau[0].numel() >= 64]
    assert sum(chunks[n] for n in eligible) == round(3 * len(eligible))
    assert all(chunks[n] == 1 for n in chunks if n not in eligible)
    second = chunked_model(layer, pool, chunks, parametrization="sigmoid")
    assert len(second.group_names) == sum(chunks.values())
    assert chunk_init(layer, chunks).shape == second.coefficients().shape
    before, after = layer.merged_tensors(), second.merged_tensors()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-5)


def test_chunking_needs_a_layer_wise_model(base_model, expert_states):
    merged = MergedModel(make_pool(base_model, expert_states), granularity="chunk", chunks=2)
    with pytest.raises(ValueError, match="layer-wise pass"):
        importance_scores(merged)


def held_out(merged: MergedModel, tasks: dict) -> dict[str, tuple[float, float]]:
    """task -> (accuracy, KL to the expert) on the test split."""
    from adamerge.objectives.alignment import distill_kl

    out = {}
    with torch.no_grad():
        for k, (task, data) in enumerate(tasks.items()):
            test = data["test"]
            inputs = {c: torch.tensor(test[c]) for c in ("input_ids", "attention_mask")}
            one_hot = torch.zeros_like(merged.coefficients())
            one_hot[k] = 1.0
            teacher = merged(**inputs, task=task, params=merged.merged_tensors(one_hot)).logits
            logits = merged(**inputs, task=task).logits
            acc = (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()
            out[task] = (acc, distill_kl(logits, teacher, None, 1.0).item())
    return out


STEPS = 60


@pytest.mark.slow
def test_importance_chunking_vs_uniform_on_tiny(capsys):
    """Expert Merging++ on the tiny experiment: layer-wise pass, then importance-allocated vs uniform chunks at the
    same coefficient count (and layer-wise trained as long). Prints the table; the allocation must not lose to
    uniform chunking on the held-out alignment (KL to the experts)."""
    from adamerge.testbeds.tiny import build

    base, experts, tasks = build(3, 0, 80, lr=3e-4)
    calib = {t: d["calib"].select(range(16)) for t, d in tasks.items()}
    pool = make_pool(copy.deepcopy(base), experts)
    settings = dict(parametrization="sigmoid", clamp=None)

    def objective():
        return ExpertAlignment(temperature=1.0, hidden_weight=1.0, coef_reg=0.0, layers="middle")

    first = MergedModel(pool, granularity="layer", init=0.1, **settings)
    fit_coefficients(first, objective(), calib, steps=STEPS, lr=0.05, batch_size=8)
    rows = {"layer-wise": held_out(first, tasks)}
    layer_more = chunked_model(first, pool, dict.fromkeys(first.names, 1), **settings)
    fit_coefficients(layer_more, objective(), calib, steps=STEPS, lr=0.05, batch_size=8, seed=1)
    rows["layer-wise (trained as long again)"] = held_out(layer_more, tasks)
    for name, uniform in (("++ importance", False), ("++ uniform", True)):
        chunks = ImportanceChunking(budget=4, max_chunks=16, min_numel=256, uniform=uniform)(first)
        second = chunked_model(first, pool, chunks, **settings)
        fit_coefficients(second, objective(), calib, steps=STEPS, lr=0.05, batch_size=8, seed=1)
        rows[f"{name} ({len(second.group_names)} columns)"] = held_out(second, tasks)
    with capsys.disabled():
        print("\n| method | " + " | ".join(f"{t} acc / KL" for t in tasks) + " | mean acc | mean KL |")
        for name, row in rows.items():
            accs, kls = [row[t][0] for t in tasks], [row[t][1] for t in tasks]
            cells = " | ".join(f"{a:.3f} / {kl:.4f}" for a, kl in zip(accs, kls))
            print(f"| {name} | {cells} | {sum(accs) / 3:.3f} | {sum(kls) / 3:.4f} |")
    kl = {name: sum(v[1] for v in row.values()) for name, row in rows.items()}
    importance = next(v for k, v in kl.items() if k.startswith("++ importance"))
    uniform = next(v for k, v in kl.items() if k.startswith("++ uniform"))
    assert importance <= uniform * 1.05
