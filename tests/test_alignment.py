"""Expert Merging's objective: KL/MSE terms by hand, cached targets equal to the expert's, cached = online training."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.engine.train import fit_coefficients
from adamerge.objectives.alignment import ExpertAlignment, distill_kl
from adamerge.objectives.teachers import build_teacher_cache, expert_targets, sample_positions, select_layers


@pytest.fixture
def merged(base_model, expert_states):
    return MergedModel(make_pool(base_model, expert_states), granularity="layer", init=0.1, parametrization="sigmoid")


@pytest.fixture
def calib():
    """Unlabeled calibration rows per task; varying lengths so batches get padded."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for k in range(3):
        lengths = torch.randint(4, 9, (6,), generator=g).tolist()
        ids = [torch.randint(1, 40, (n,), generator=g).tolist() for n in lengths]
        out[f"task{k}"] = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths]})
    return out


def test_distill_kl_by_hand():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    student = torch.zeros(1, 2)  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert distill_kl(student, teacher, None, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert distill_kl(teacher, teacher, None, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # temperature 2 on logits (0, 2 log 3) gives the same p as T=1 on (0, log 3)
    assert distill_kl(student, 2 * teacher, None, 2.0).item() == pytest.approx(expected, abs=1e-6)


def test_top_k_targets_equal_full_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    values, ids = teacher.topk(7, dim=-1)
    torch.testing.assert_close(distill_kl(student, values, ids, 1.5), distill_kl(student, teacher, None, 1.5))
    # top-2: the teacher is renormalised over its 2 best ids
    values, ids = teacher.topk(2, dim=-1)
    p = torch.softmax(values, -1)
    log_q = torch.log_softmax(student, -1).gather(-1, ids)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(distill_kl(student, values, ids, 1.0), expected)


def test_layer_selection():
    assert select_layers("all", 5) == [1, 2, 3, 4]
    assert select_layers("middle", 5) == [2]
    assert select_layers("last", 5) == [4]
    assert select_layers([-1, 0], 5) == [4, 0]
    assert select_layers(None, 5) == []
    with pytest.raises(ValueError, match="objective.layers"):
        select_layers([7], 5)
    with pytest.raises(ValueError, match="objective.layers"):
        select_layers("first", 5)


def test_response_positions_are_shifted_to_the_predicting_token():
    row = {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "response_mask": [0, 0, 1, 1, 1]}
    assert sample_positions(row).tolist() == [1, 2, 3]  # logits at 1..3 predict tokens 2..4
    assert sample_positions({"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}).tolist() == [0, 1]


def test_cached_targets_equal_the_expert_run_on_the_training_batch(merged, calib, tmp_path):
    cache = build_teacher_cache(merged, calib, layers="all", dtype="float32", batch_size=4)
    disk = build_teacher_cache(merged, calib, layers="all", dtype="float32", batch_size=2, path=tmp_path)
    assert (tmp_path / "task1.safetensors").exists()
    ds = calib["task1"]
    index = torch.tensor([5, 0, 3])
    rows = [ds[int(i)] for i in index]
    n = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([r["attention_mask"] + [0] * (n - len(r["input_ids"])) for r in rows]),
        "_index": index,
    }
    ref = expert_targets(merged, "task1", batch, [sample_positions(r) for r in rows], cache.layers, None)
    for got in (cache.targets("task1", batch), disk.targets("task1", batch)):
        torch.testing.assert_close(got.rows, ref.rows)
        torch.testing.assert_close(got.positions, ref.positions)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    assert ref.logits.shape == (3, 3) and ref.hidden.shape == (int(batch["attention_mask"].sum()), 2, 16)
    # the disk-backed cache keeps only the row index in memory; bf16 storage halves the in-memory one
    assert disk.nbytes() == 0
    bf16 = build_teacher_cache(merged, calib, layers="all", batch_size=4)
    torch.testing.assert_close(bf16.targets("task1", batch).hidden.float(), ref.hidden, atol=0.05, rtol=0.02)


def test_expert_targets_are_the_expert_model(base_model, expert_states, calib):
    """The one-hot merge is expert k itself: compare with the expert materialised as a model."""
    import copy

    merged = MergedModel(make_pool(copy.deepcopy(base_model), expert_states), granularity="layer")
    expert = copy.deepcopy(base_model)
    expert.load_state_dict(expert_states["task2"])
    ds = calib["task2"]
    batch = {"input_ids": torch.tensor([ds[0]["input_ids"]]), "attention_mask": torch.tensor([ds[0]["attention_mask"]])}
    t = expert_targets(merged, "task2", batch, [sample_positions(ds[0])], [1], None)
    out = expert(**batch, output_hidden_states=True)
    torch.testing.assert_close(t.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.hidden[:, 0], out.hidden_states[1][0], atol=1e-5, rtol=1e-5)


def test_objective_terms_and_weights(merged, calib):
    objective = ExpertAlignment(temperature=2.0, hidden_weight=0.5, coef_reg=0.3, alpha={"task0": 2.0}, layers="all")
    objective.bind(merged, datasets=calib)
    row = calib["task0"][1]
    inputs = {"input_ids": torch.tensor([row["input_ids"]]), "attention_mask": torch.tensor([row["attention_mask"]])}
    batch = inputs | {"_index": torch.tensor([1])}
    # at the one-hot table the merged model IS expert 0: both terms vanish (and lam == lam_init: no pull)
    one_hot = torch.zeros_like(merged.coefficients())
    one_hot[0] = 1.0
    out = merged(**inputs, output_hidden_states=True, task="task0", params=merged.merged_tensors(one_hot))
    assert objective(out, "task0", batch).item() == pytest.approx(0.0, abs=1e-5)
    # at init: alpha * (T^2 KL + w_h MSE), computed here by hand
    out = merged(**inputs, output_hidden_states=True, task="task0")
    target = objective.teacher.targets("task0", batch)
    kl = distill_kl(out.logits, target.logits, None, 2.0)
    mse = (torch.stack(out.hidden_states[1:], 1)[0].transpose(0, 1) - target.hidden).pow(2).mean()
    assert objective(out, "task0", batch).item() == pytest.approx(2.0 * (4 * kl + 0.5 * mse).item(), rel=1e-5)
    # the pull to init: gamma * mean |lam - lam_init|, split over the 3 task calls of a step
    with torch.no_grad():
        merged.coefficients.raw.add_(0.5)
    reg = (merged.coefficients() - objective.lam_init).abs().mean()
    out = merged(**inputs, output_hidden_states=True, task="task0")
    no_reg = ExpertAlignment(temperature=2.0, hidden_weight=0.5, alpha={"task0": 2.0}, layers="all")
    no_reg.bind(merged, datasets=calib)
    difference = objective(out, "task0", batch) - no_reg(out, "task0", batch)
    assert difference.item() == pytest.approx(0.3 * reg.item() / 3, rel=1e-4)


def test_unbound_objective_and_bad_config_are_refused():
    with pytest.raises(RuntimeError, match="bind"):
        ExpertAlignment()(torch.zeros(1, 2), "t", {})
    with pytest.raises(ValueError, match="objective.teacher"):
        ExpertAlignment(teacher="live")
    with pytest.raises(ValueError, match="objective.temperature"):
        ExpertAlignment(temperature=0)


@pytest.mark.parametrize("backward", ["split", "concat", "joint"])
def test_cached_target_training_equals_online_teacher_training(base_model, expert_states, calib, backward):
    """Same coefficients after N steps whether the targets were cached once or recomputed on every step."""
    import copy

    results = []
    for teacher in ("cache", "online"):
        torch.manual_seed(0)
        pool = make_pool(copy.deepcopy(base_model), expert_states)
        merged = MergedModel(pool, granularity="layer", init=0.1, parametrization="sigmoid")
        objective = ExpertAlignment(
            temperature=2.0, hidden_weight=1.0, coef_reg=0.01, layers="all", teacher=teacher, cache_dtype="float32"
        )
        fit_coefficients(merged, objective, calib, steps=6, lr=0.05, batch_size=3, backward=backward)
        results.append(merged.coefficients().detach())
    moved = (results[0] - 0.1).abs().max().item()
    assert moved > 1e-3  # training did something
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["expert_merging", "expert_merging_pp"])
def test_presets_run_on_the_tiny_experiment(tmp_path, method):
    """`adamerge experiment=tiny method=expert_merging[_pp]`: the objective is bound, ++ runs its two passes."""
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers
    from adamerge.pipeline import run

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=tiny", f"method={method}", "debug=fast", f"paths.output_dir={tmp_path}"]
        )
    assert cfg.objective._target_ == "adamerge.objectives.alignment.ExpertAlignment"  # the preset picks its objective
    record = run(cfg)["coefficients"]
    layer_names = len({g.split("#")[0] for g in record["groups"]})
    if method == "expert_merging":
        assert record["granularity"] == "layer" and len(record["groups"]) == layer_names
    else:
        assert record["granularity"] == "chunk" and len(record["groups"]) > layer_names
