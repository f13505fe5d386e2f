"""DOGE: projection, coefficients, objective, batched solver against the per-layer Adam reference, pool API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.testing import assert_close
from transformers import BertForSequenceClassification

from adamerge.core.pool import make_pool
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.doge import (
    Doge,
    doge_merge,
    doge_transform,
    shared_subspace,
    solve_pool,
    task_aware_coefficients,
    top_singular,
)
from adamerge.methods.doge_solvers import doge_objective, project_out, solve_batched, solve_reference
from adamerge.methods.kernels import trim
from adamerge.methods.registry import Run, build_method, build_transform
from adamerge.methods.static import static_merge
from tests.conftest import perturbed, tiny_bert_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
FAST = dict(steps=50, lr=1e-3)  # the tiny experts' task vectors are ~0.05 per entry


@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    return make_pool(model, {f"task{k}": perturbed(model, seed=k + 1) for k in range(3)})


@pytest.fixture(scope="module")
def solved(pool):
    """DOGE's deltas and coefficients for the tiny pool, solved once (tests must not modify them)."""
    return solve_pool(pool, **FAST)


def total_objective(pool, deltas, lams, form="row"):
    return sum(doge_objective(pool.task_vectors[n], lams[n], d, form).item() for n, d in deltas.items())


# --------------------------------------------------------------------------------------------------- kernels


def test_task_aware_coefficients_by_hand():
    tau = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # norms 5, 0, 1
    assert_close(task_aware_coefficients(tau, eta=0.5), torch.tensor([0.1, 0.0, 0.5]))
    batched = torch.stack([tau, 2 * tau])  # [L=2, K=3, 2]
    assert_close(task_aware_coefficients(batched, 0.5, batch_dims=1), torch.tensor([[0.1, 0, 0.5], [0.05, 0, 0.25]]))


def test_shared_subspace_holds_each_tasks_top_directions():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    U = shared_subspace(tau, rank_ratio=0.5)  # r = 6 in all, 2 per task
    assert U.shape == (20, 6)
    assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))
    for k in range(3):
        top = torch.linalg.svd(tau[k]).U[:, :2]
        assert project_out(top, U).abs().max() < 1e-12


def test_randomized_singular_vectors_match_the_exact_ones():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -2, 12, dtype=torch.float64)  # low rank + noise, like a fine-tuning update
    a = (torch.randn(2, 200, 12, generator=g, dtype=torch.float64) * spectrum) @ torch.randn(
        2, 12, 120, generator=g, dtype=torch.float64
    ) + 1e-3 * torch.randn(2, 200, 120, generator=g, dtype=torch.float64)
    exact_u, exact_s = top_singular(a, 5, exact=True)
    u, s = top_singular(a, 5)  # 2 q = 30 < 120: randomized
    assert_close(s, exact_s, rtol=1e-6, atol=0)
    assert (u - exact_u @ (exact_u.mT @ u)).abs().max() < 1e-6  # same span
    assert_close(top_singular(a[1:], 5)[0], u[1:])  # the same alone as batched


def test_projected_gradient_is_orthogonal_to_U(pool):
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    for dtype, bound in [(torch.float64, 1e-6), (torch.float32, None)]:
        tau = pool.task_vectors[name].to(dtype)
        lam = task_aware_coefficients(tau, 0.07)
        U = shared_subspace(tau, rank_ratio=0.5)
        delta = (0.1 * torch.randn(tau.shape[1:], generator=torch.Generator().manual_seed(0))).to(dtype)
        delta.requires_grad_(True)
        doge_objective(tau, lam, delta).backward()
        g = project_out(delta.grad, U)
        # fp32: U^T (g - U U^T g) is rounding of a length-m sum, a few eps times ||g|| (max column norm).
        limit = bound if bound is not None else 10 * torch.finfo(dtype).eps * delta.grad.norm(dim=0).max().item()
        assert (U.T @ g).abs().max().item() < limit
        assert (U.T @ delta.grad).abs().max().item() > 1e3 * limit  # the raw gradient did have a part along U


def test_objective_forms_by_hand():
    tau = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # K=1, [2, 2]
    lam, delta = torch.tensor([0.5]), torch.zeros(2, 2)
    # gap D = tau - 0.5 tau = 0.5 tau; row inner products <tau[r], D[r]> = 0.5, 2; whole matrix: 2.5
    assert_close(doge_objective(tau, lam, delta, "row"), torch.tensor(0.25 + 4.0))
    assert_close(doge_objective(tau, lam, delta, "matrix"), torch.tensor(6.25))


# --------------------------------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("form", ["row", "matrix"])
def test_batched_solver_matches_per_layer_adam_reference(pool, form):
    deltas, lams = solve_pool(pool, form=form, **FAST)
    assert len(deltas) == sum(t.dim() == 3 for t in pool.task_vectors.values()) > 5
    for name, delta in deltas.items():
        tau = pool.task_vectors[name]
        reference = solve_reference(tau, lams[name], shared_subspace(tau, 0.1), form, **FAST)
        got, want = (doge_objective(tau, lams[name], d, form).item() for d in (delta, reference))
        assert abs(got - want) <= 1e-4 * want, name
        assert_close(delta, reference, atol=1e-5, rtol=0)


def test_solvers_lower_the_objective_and_cg_reaches_the_minimum(pool, solved):
    deltas, lams = solved
    cg, _ = solve_pool(pool, solver="cg", steps=100)
    # token_type_embeddings is [2, 16]: its U spans all of R^2, so delta is 0 there whatever the solver
    assert cg["bert.embeddings.token_type_embeddings.weight"].abs().max() == 0
    free = {n: d for n, d in deltas.items() if "token_type" not in n}
    zero = {n: torch.zeros_like(d) for n, d in free.items()}
    before, adam, exact = (total_objective(pool, d, lams) for d in (zero, free, {n: cg[n] for n in free}))
    assert adam < 0.9 * before
    assert exact < 1e-3 * adam
    # the projected gradient vanishes at the CG solution
    name = "bert.encoder.layer.1.output.dense.weight"
    tau, U = pool.task_vectors[name], shared_subspace(pool.task_vectors[name], 0.1)
    for d, small in [(cg[name], True), (zero[name], False)]:
        d = d.clone().requires_grad_(True)
        doge_objective(tau, lams[name], d).backward()
        assert (project_out(d.grad, U).norm() < 1e-3) == small
        assert (U.T @ d.detach()).abs().max() < 1e-5


def test_max_group_splits_the_batch_without_changing_the_result(pool, solved):
    deltas, _ = solve_pool(pool, max_group=2, **FAST)
    for name, delta in solved[0].items():
        assert_close(deltas[name], delta, atol=1e-6, rtol=0)


def test_batched_solver_keeps_layers_independent():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64)
    lam = task_aware_coefficients(tau, 0.07, batch_dims=1)
    U = shared_subspace(tau, 0.3)
    both = solve_batched(tau, lam, U, steps=30, lr=1e-2)
    one = solve_batched(tau[1:], lam[1:], U[1:], steps=30, lr=1e-2)
    assert_close(both[1:], one)


# --------------------------------------------------------------------------------------------------- pool level


def test_zero_delta_with_equal_coefficients_is_task_arithmetic(pool):
    # Task-aware lam = eta / ||tau_i||: rescale every task vector to norm nu, so eta = c * nu gives lam = c exactly.
    nu, c = 0.5, 0.3
    scaled = {
        n: t * (nu / t.reshape(t.shape[0], -1).norm(dim=1)).view(-1, *[1] * (t.dim() - 1))
        for n, t in pool.task_vectors.items()
    }
    equal = dataclasses.replace(pool, task_vectors=scaled)
    expected = static_merge(equal, "task_arithmetic", weights=c)
    merged = doge_merge(equal, eta=c * nu, steps=0)
    assert merged.keys() == expected.keys()
    for name in expected:
        assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    # the fixed-coefficient option is the same merge on any pool, with no rescaling needed
    expected = static_merge(pool, "task_arithmetic", weights=c)
    for name, value in doge_merge(pool, coefficients=c, steps=0).items():
        assert_close(value, expected[name])


def test_doge_merge_returns_every_tensor_and_adds_the_shared_delta(pool, solved):
    merged = doge_merge(pool, **FAST)
    base = pool.base_tensors()
    assert merged.keys() == pool.task_vectors.keys()
    for name, value in merged.items():
        assert value.shape == base[name].shape and value.dtype == base[name].dtype
    deltas, lams = solved
    for name, tau in pool.task_vectors.items():
        lam = lams[name].view(-1, *[1] * (tau.dim() - 1))
        delta = deltas.get(name, torch.zeros(()))  # 1-D tensors: task-aware coefficients only
        assert_close(merged[name], base[name] + (lam * (tau + delta)).sum(0))


def test_bf16_task_vectors_are_upcast_for_the_solve(base_model, expert_states):
    pool = make_pool(base_model, expert_states, dtype="bfloat16")
    merged = doge_merge(pool, steps=5)
    assert all(v.dtype == torch.float32 for v in merged.values())
    transformed = doge_transform(pool, steps=5)
    assert all(t.dtype == torch.bfloat16 for t in transformed.task_vectors.values())


def test_top_k_masks_each_modified_task_vector(pool, solved):
    deltas, _ = solved
    transformed = doge_transform(pool, top_k=0.25, **FAST)
    for name, tau in pool.task_vectors.items():
        assert_close(transformed.task_vectors[name], trim(tau + deltas.get(name, 0), 0.25))
    full = doge_merge(pool, top_k=1.0, steps=3)
    for name, value in doge_merge(pool, steps=3).items():
        assert_close(full[name], value)


def test_doge_transform_keeps_the_pool_but_modifies_2d_task_vectors(pool, solved):
    transformed = doge_transform(pool, **FAST)
    assert transformed.model is pool.model and transformed.experts == pool.experts
    assert transformed.task_vectors.keys() == pool.task_vectors.keys()
    deltas, _ = solved
    for name, tau in pool.task_vectors.items():
        new = transformed.task_vectors[name]
        assert new.shape == tau.shape and new.dtype == tau.dtype
        assert_close(new, tau + deltas[name] if name in deltas else tau)
    assert pool.task_vectors is not transformed.task_vectors  # the input pool is untouched


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"eta": 0.0}, "method.eta"),
        ({"eta": float("nan")}, "method.eta"),
        ({"rank_ratio": 1.5}, "method.rank_ratio"),
        ({"form": "gram"}, "method.form"),
        ({"solver": "sgd"}, "method.solver"),
        ({"steps": -1}, "method.steps"),
        ({"steps": 2.5}, "method.steps"),
        ({"lr": 0}, "method.lr"),
        ({"top_k": 0}, "method.top_k"),
        ({"coefficients": "0.3"}, "method.coefficients"),
        ({"max_group": 0}, "method.max_group"),
    ],
)
def test_bad_arguments_name_the_config_key(pool, kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        doge_merge(pool, **kwargs)
    with pytest.raises(ValueError, match=key.replace("method.", "method.transform.").replace(".", r"\.")):
        doge_transform(pool, **kwargs)


def test_method_configs_compose_into_the_train_config():
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        doge = build_method(compose("train", overrides=["method=doge"]).method)
        learned = build_method(compose("train", overrides=["method=doge_adamerging"]).method)
    assert isinstance(doge, Doge) and doge.eta == 0.07 and doge.calibration_steps == 0
    assert isinstance(learned, AdaMerging) and learned.granularity == "layer" and learned.steps == 500  # AdaMerging's
    assert learned.transform == "doge" and isinstance(learned.first_pass, Doge) and learned.first_pass.eta == 0.07


def test_method_configs_instantiate(pool):
    merge_cfg = OmegaConf.load(CONF / "doge.yaml")
    assert merge_cfg.name == "doge" and merge_cfg.eta == 0.07
    options = {k: v for k, v in OmegaConf.to_container(merge_cfg).items() if k != "name"}
    merged = doge_merge(pool, **(options | {"steps": 2}))
    assert merged.keys() == pool.task_vectors.keys()
    transform_cfg = OmegaConf.load(CONF / "doge_adamerging.yaml")
    assert list(transform_cfg.defaults) == ["adamerging", "_self_"]
    first_pass = build_transform({"name": transform_cfg.transform, "steps": 2}, "doge_adamerging")
    transformed = first_pass.transform(Run(None, pool, None))
    assert transformed.task_vectors.keys() == pool.task_vectors.keys()
