"""WUDI: its objective and gradient by hand and against autograd, the Adam solve against the closed-form minimiser."""

import math

import pytest
import torch
from torch.testing import assert_close

from adamerge.methods.registry import REGISTRY, ConfigError, build_method, composes
from adamerge.methods.subspace import map_matrices
from adamerge.methods.wudi import (
    wudi,
    wudi_closed_form,
    wudi_gradient,
    wudi_normal_equations,
    wudi_objective,
    wudi_solve,
)
from adamerge.pipeline import run
from tests.test_config import make_cfg


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# tau_1 = e1 e1^T (||tau_1||^2 = 1), tau_2 = e1 (e1 + e2)^T (||tau_2||^2 = 2). tau_m = tau_2 gives
# (tau_2 - tau_1) tau_1^T = e1 e2^T e1 e1^T = 0 and (tau_2 - tau_2) tau_2^T = 0: zero loss, the minimiser. The
# normal equations agree: A = G_1 + G_2 / 2 = [[1.5, .5], [.5, .5]], B = tau_1 G_1 + tau_2 G_2 / 2 = [[2, 1], [0, 0]],
# B A^-1 = [[2, 1], [0, 0]] [[1, -1], [-1, 3]] = [[1, 1], [0, 0]] = tau_2. Adam starts from the sum [[2, 1], [0, 0]].
TAU = t([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
MINIMISER = t([[1.0, 1.0], [0.0, 0.0]])


def random_stack(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_objective_by_hand():
    # At the sum: (tau_m - tau_1) tau_1^T = [[1, 1], [0, 0]] e1 e1^T = e1 e1^T -> 1 / 1; (tau_m - tau_2) = e1 e1^T,
    # times tau_2^T = e1 (e1 + e2)^T... transposed: e1 e1^T (e1 + e2) e1^T = e1 e1^T -> 1 / 2. Total 1.5.
    assert wudi_objective(TAU.sum(0), TAU).item() == pytest.approx(1.5)
    assert wudi_objective(MINIMISER, TAU).item() == pytest.approx(0.0)
    a, b = wudi_normal_equations(TAU)
    assert_close(a, t([[1.5, 0.5], [0.5, 0.5]]))
    assert_close(b, t([[2.0, 1.0], [0.0, 0.0]]))
    assert_close(wudi_closed_form(TAU), MINIMISER)


def test_gram_form_gradient_is_the_gradient_of_the_papers_objective():
    tau = random_stack(2, 3, 5, 4)  # two layers batched, K=3
    merged = random_stack(2, 5, 4, seed=1).requires_grad_(True)
    wudi_objective(merged, tau).sum().backward()
    a, b = wudi_normal_equations(tau)
    assert_close(wudi_gradient(merged.detach(), a, b), merged.grad)


def test_orthogonal_tasks_keep_their_sum():
    # tau_1 = diag(1, 0), tau_2 = diag(0, 2): A = I, B = diag(1, 2), so the sum is already optimal (zero loss) and
    # Adam, started there with a zero gradient, does not move.
    tau = t([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
    assert wudi_objective(tau.sum(0), tau).item() == 0.0
    assert_close(wudi(tau, steps=50, lr=1e-2), t([[1.0, 0.0], [0.0, 2.0]]))


def test_adam_converges_to_the_closed_form_and_its_optimality_condition():
    merged = wudi_solve(TAU, steps=1500, lr=1e-2)
    assert_close(merged, MINIMISER, atol=1e-4, rtol=0)
    a, b = wudi_normal_equations(TAU)
    assert wudi_gradient(merged, a, b).abs().max() < 1e-3  # merged A = B
    tau = random_stack(2, 3, 4, 3)  # a full-rank A: unique minimiser, batched over two layers
    assert (tau.sum(1) - wudi_closed_form(tau)).abs().max() > 1  # far from the start
    assert_close(wudi_solve(tau, steps=2000, lr=1e-2), wudi_closed_form(tau), atol=1e-6, rtol=0)


def test_paper_defaults_decrease_the_objective_on_task_vector_sized_entries():
    tau = random_stack(4, 16, 12, scale=1e-3) + random_stack(1, 16, 12, seed=3, scale=2e-3)  # shared part
    start = wudi_objective(tau.sum(0), tau)
    objective = [wudi_objective(wudi_solve(tau, steps=s), tau).item() for s in (100, 300)]
    assert objective[0] < start.item() and objective[1] < objective[0]


def test_non_matrix_parameters_are_averaged_and_zero_task_vectors_are_harmless():
    assert_close(wudi(t([[1.0, 2.0], [3.0, 6.0]])), t([2.0, 4.0]))
    tau = torch.cat([TAU, torch.zeros(1, 2, 2, dtype=torch.float64)])  # an expert that did not change this matrix
    assert torch.isfinite(wudi(tau, steps=10, lr=1e-3)).all()
    assert_close(wudi_closed_form(tau), MINIMISER)


def test_batched_over_equal_shapes_matches_one_tensor_at_a_time():
    vectors = {"a": random_stack(3, 5, 4, seed=1), "b": random_stack(3, 5, 4, seed=2), "bias": random_stack(3, 4)}
    batched = map_matrices(vectors, lambda tau, mat: wudi(tau, 20, 1e-2, mat))
    for key, tau in vectors.items():
        assert_close(batched[key], wudi(tau, 20, 1e-2))


def test_registered_static_dense_and_composes():
    spec = REGISTRY["wudi"]
    assert spec.kind == "static" and spec.needs.dense and composes(spec)


@pytest.mark.parametrize(
    "config, key",
    [({"steps": -1}, "method.steps"), ({"lr": 0.0}, "method.lr"), ({"max_group": 0}, "method.max_group")],
)
def test_bad_options_fail_naming_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        build_method({"name": "wudi", **config})


# slow: the first pipeline run of a process builds the tiny experts (~50 s on 2 shared cores), then ~3 s per run.
@pytest.mark.parametrize("experiment", ["tiny", "tiny_lm"])
def test_runs_through_the_pipeline(experiment, tmp_path):
    result = run(make_cfg("method=wudi", f"experiment={experiment}", f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    assert math.isfinite(rows["wudi"]["avg_normalized"])
    assert rows["wudi"]["avg_normalized"] > rows["base + heads (floor)"]["avg_normalized"]
