"""Fisher merging: the kernel on hand-worked values, the Fisher against its closed form on a linear classifier, the
transform's rows, and the pipeline on the tiny experiments."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adamerge.core.factory import merged_model
from adamerge.core.pool import make_pool
from adamerge.methods.fisher import FisherMerging, fisher_merge
from adamerge.methods.registry import ConfigError, build_method
from adamerge.methods.statistics import calibration_batches, diagonal_fisher
from adamerge.pipeline import run
from tests.test_config import make_cfg


def test_equal_fishers_give_weight_averaging():
    tau = torch.tensor([[1.0, -2.0, 4.0], [3.0, 0.0, -4.0]])
    fisher = torch.tensor([[0.5, 2.0, 7.0], [0.5, 2.0, 7.0]])
    torch.testing.assert_close(fisher_merge(tau, fisher), tau.mean(0))


def test_fisher_weights_each_entry_and_floors_zeros():
    tau = torch.tensor([[1.0, 2.0, 5.0], [3.0, 6.0, -1.0]])
    fisher = torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]])
    # entry 0: (1*1 + 3*3) / 4; entry 1: expert 0 floored to 1e-6, ~expert 1; entry 2: both floored: the mean
    expected = torch.tensor([10 / 4, (1e-6 * 2 + 2 * 6) / (2 + 1e-6), 2.0])
    torch.testing.assert_close(fisher_merge(tau, fisher, floor=1e-6), expected)


class Linear(nn.Module):
    def __init__(self, d: int = 3, classes: int = 3):
        super().__init__()
        self.layer = nn.Linear(d, classes)

    def forward(self, pixel_values):
        return self.layer(pixel_values)  # (B, C) logits


def linear_run(classes: int = 3, d: int = 3, examples: int = 5):
    import datasets

    g = torch.Generator().manual_seed(0)
    model = Linear(d, classes)
    experts = {
        name: {n: t + 0.5 * torch.randn(t.shape, generator=g) for n, t in model.state_dict().items()}
        for name in ("a", "b")
    }
    pool = make_pool(model, experts, head_patterns=[])
    calib = {
        n: datasets.Dataset.from_dict({"pixel_values": torch.randn(examples, d, generator=g).tolist()}) for n in experts
    }
    return SimpleNamespace(pool=pool, data=SimpleNamespace(calib=calib, batch_size=2, pad_id=0, seed=0), cfg=None)


def test_expected_fisher_matches_its_closed_form_on_a_linear_classifier():
    """d log p_y / dW = (e_y - p) x^T, so F_W = mean_x sum_y p_y ((e_y - p) x^T)^2."""
    toy = linear_run()
    merged = merged_model(toy.pool, granularity="task")
    params = merged.expert_params("a")
    batches = calibration_batches(toy.data.calib["a"], 100, 2)
    fisher, count = diagonal_fisher(merged, "a", params, batches, toy.pool.task_vectors)
    x = torch.tensor(toy.data.calib["a"]["pixel_values"])
    p = torch.softmax(x @ params["layer.weight"].T + params["layer.bias"], dim=-1)  # (N, C)
    eye = torch.eye(p.shape[1])
    score = eye[None] - p[:, None, :]  # (N, y, C): d log p_y / d logits
    expected_w = (p[:, :, None, None] * (score[..., None] * x[:, None, None, :]) ** 2).sum(1).mean(0)
    expected_b = (p[:, :, None] * score**2).sum(1).mean(0)
    assert count == 5
    torch.testing.assert_close(fisher["layer.weight"], expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fisher["layer.bias"], expected_b, rtol=1e-5, atol=1e-6)


def test_the_transform_rows_sum_to_the_merge():
    toy = linear_run()
    method = FisherMerging("fisher")
    merged = method.merge(toy).params
    rows = method.transform(toy).task_vectors
    base = toy.pool.base_tensors()
    for name, stack in rows.items():
        torch.testing.assert_close(base[name] + stack.sum(0), merged[name])
    assert not torch.allclose(
        merged["layer.weight"], base["layer.weight"] + toy.pool.task_vectors["layer.weight"].mean(0)
    )


def test_bad_options_fail_naming_the_key():
    with pytest.raises(ConfigError, match="method.labels"):
        build_method({"name": "fisher", "labels": "empirical"})
    with pytest.raises(ConfigError, match="method.fisher_floor"):
        build_method({"name": "fisher", "fisher_floor": 0.0})


def test_fisher_runs_on_tiny_and_beats_task_arithmetic(tmp_path):
    result = run(make_cfg("method=fisher", "experiment=tiny", f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    assert rows["fisher"]["avg"] > rows["task arithmetic (lam=0.3)"]["avg"]  # measured 0.82 vs 0.71


def test_fisher_runs_on_the_tiny_llama(tmp_path):
    result = run(make_cfg("method=fisher", "experiment=tiny_lm", f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    floor = rows["base + heads (floor)"]
    for task in ("seq0", "seq1"):
        assert (
            math.isfinite(rows["fisher"][task]) and rows["fisher"][task] < floor[task]
        )  # measured 0.49/0.17 vs 0.68/0.82


def test_fisher_composes_under_a_learner(tmp_path):
    overrides = [
        "method=adamerging",
        "method.transform={name: fisher, num_examples: 16}",
        "method.steps=3",
        "experiment=tiny",
    ]
    result = run(make_cfg(*overrides, f"paths.output_dir={tmp_path}", "~logger"))
    assert math.isfinite({row["method"]: row for row in result["table"]}["adamerging"]["avg"])
