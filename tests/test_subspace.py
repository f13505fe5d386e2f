"""TSV-M, Iso-C and Iso-CTS kernels on hand-worked 2x2 / 3x3 task vectors, batching, options, and the pipeline."""

import math

import pytest
import torch
from torch.testing import assert_close

from adamerge.methods.registry import REGISTRY, ConfigError, build_method, composes
from adamerge.methods.subspace import (
    iso_c,
    iso_cts,
    iso_cts_ranks,
    map_matrices,
    orthonormalize,
    top_svd,
    tsv_components,
    tsv_m,
    tsv_rank,
)
from adamerge.pipeline import run
from tests.test_config import make_cfg


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


A = 1 / math.sqrt(2)


def random_stack(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------ TSV-M


def test_tsv_m_one_task_at_full_rank_is_the_task_vector_times_alpha():
    tau = t([[[2.0, 0.0], [0.0, 1.0]]])  # K=1 keeps min(2, 2) // 1 = 2 components: all of them
    assert_close(tsv_m(tau, alpha=0.5), t([[1.0, 0.0], [0.0, 0.5]]))
    tall = random_stack(1, 5, 3)
    assert_close(tsv_m(tall, alpha=2.0), 2 * tall[0])
    assert_close(tsv_components(tall, alpha=2.0), 2 * tall)


def test_tsv_m_keeps_each_tasks_top_component_and_sums_orthogonal_ones():
    # K=2, 2x2: each task keeps its top 1 component. tau_1 = 3 e1 e1^T + 1 e2 e2^T keeps 3 e1 e1^T (drops the 1),
    # tau_2 = 2 e2 e2^T; U = V = [e1, e2] are already orthonormal, so the merge is diag(3, 2).
    tau = t([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])
    assert tsv_rank(2, 2, 2) == 1
    assert_close(tsv_m(tau), t([[3.0, 0.0], [0.0, 2.0]]))
    assert_close(tsv_components(tau), t([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]))


def test_tsv_m_decorrelates_overlapping_left_singular_vectors():
    # tau_1 = e1 e1^T, tau_2 = u e2^T with u = (e1 + e2)/sqrt2: U = [[1, a], [0, a]] (a = 1/sqrt2) is not orthogonal.
    # Its polar factor U (U^T U)^(-1/2), with U^T U = [[1, a], [a, 1]] = Q diag(1+a, 1-a) Q^T, Q = [[a, a], [a, -a]],
    # replaces it; V = I and S = (1, 1), so the merge is U_perp itself.
    tau = t([[[1.0, 0.0], [0.0, 0.0]], [[0.0, A], [0.0, A]]])
    u = t([[1.0, A], [0.0, A]])
    q = t([[A, A], [A, -A]])
    u_perp = u @ q @ torch.diag(t([1 + A, 1 - A]).rsqrt()) @ q.T
    merged = tsv_m(tau)
    assert_close(merged, u_perp)
    assert_close(merged.T @ merged, torch.eye(2, dtype=torch.float64))  # decorrelated: orthonormal columns
    parts = tsv_components(tau)
    assert_close(parts[0], u_perp[:, :1] @ t([[1.0, 0.0]]))  # task 1: its column of U_perp, its e1
    assert_close(parts.sum(0), merged)


def test_tsv_m_averages_non_matrix_parameters():
    bias = t([[1.0, 2.0], [3.0, 6.0]])
    assert_close(tsv_m(bias, alpha=2.0), t([4.0, 8.0]))
    assert_close(tsv_components(bias, alpha=2.0).sum(0), tsv_m(bias, alpha=2.0))


def test_orthonormalize_is_the_nearest_orthonormal_matrix():
    a = random_stack(6, 3)
    q = orthonormalize(a)
    assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    # polar factor: a = q h with h symmetric positive definite
    h = q.T @ a
    assert_close(h, h.T)
    assert torch.linalg.eigvalsh(h).min() > 0


# ------------------------------------------------------------------------------------------------------ Iso


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    # sum = diag(3, 1): singular values (3, 1), mean 2, U = V = I -> 2 I, times alpha.
    tau = t([[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert_close(iso_c(tau, alpha=1.5), t([[3.0, 0.0], [0.0, 3.0]]))
    merged = iso_c(random_stack(3, 5, 4), alpha=1.3)
    s = torch.linalg.svdvals(merged)
    expected = 1.3 * torch.linalg.svdvals(random_stack(3, 5, 4).sum(0)).mean()
    assert_close(s, expected.expand(4))  # flat: all singular values equal


def test_iso_cts_without_task_specific_directions_is_iso_c():
    tau = random_stack(3, 6, 4)
    assert iso_cts_ranks(3, 6, 4, 1.0) == (4, 0)
    assert_close(iso_cts(tau, alpha=1.2, common_fraction=1.0), iso_c(tau, alpha=1.2))


def test_iso_cts_adds_task_directions_off_the_common_subspace():
    # K=2, 3x3, fraction 1/3: common c = 1, one task direction each. sum = diag(6, 1, 2) -> common e1 (s=6);
    # tau_1 off e1 = diag(0, 1, 0) -> e2 (s=1); tau_2 off e1 = diag(0, 0, 2) -> e3 (s=2). Bases [e2, e3, e1] are
    # orthonormal; singular values (1, 2, 6) flattened to 3 -> 3 I, times alpha.
    tau = t([[[3.0, 0, 0], [0, 1, 0], [0, 0, 0]], [[3.0, 0, 0], [0, 0, 0], [0, 0, 2]]])
    assert iso_cts_ranks(2, 3, 3, 1 / 3) == (1, 1)
    assert_close(iso_cts(tau, alpha=0.5, common_fraction=1 / 3), 1.5 * torch.eye(3, dtype=torch.float64))


def low_rank_stack(num_tasks: int, m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    """LoRA-like task vectors: ``B_k A_k`` of rank ``rank`` each."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(num_tasks, m, rank, generator=g, dtype=torch.float64)
    return b @ torch.randn(num_tasks, rank, n, generator=g, dtype=torch.float64)


def outside(delta: torch.Tensor, tau: torch.Tensor) -> float:
    """The share of ``delta``'s norm outside the column and row spaces that the task vectors span."""
    side_by_side, stacked = tau.transpose(0, 1).flatten(1), tau.flatten(0, 1)  # [m, K n], [K m, n]
    cols = torch.linalg.svd(side_by_side, full_matrices=False)[0][:, : torch.linalg.matrix_rank(side_by_side)]
    rows = torch.linalg.svd(stacked, full_matrices=False)[2][: torch.linalg.matrix_rank(stacked)]
    inside = cols @ (cols.T @ delta @ rows.T) @ rows
    return float((delta - inside).norm() / delta.norm())


def test_iso_nonzero_spectrum_is_the_paper_on_full_rank_task_vectors():
    tau = random_stack(3, 6, 5)
    assert_close(iso_c(tau, 1.3, spectrum="nonzero"), iso_c(tau, 1.3))
    assert_close(iso_cts(tau, 1.5, 0.5, spectrum="nonzero"), iso_cts(tau, 1.5, 0.5))


def test_iso_nonzero_spectrum_flattens_only_the_directions_low_rank_task_vectors_span():
    # Three rank-2 task vectors in 12 x 10: the sum has rank 6 of 10. The paper's flat spectrum gives the 4 null
    # directions (arbitrary, from the SVD) the same weight as the 6 real ones; "nonzero" flattens only the 6.
    tau = low_rank_stack(3, 12, 10, rank=2)
    u, s, vh = torch.linalg.svd(tau.sum(0), full_matrices=False)
    assert_close(iso_c(tau, 1.3, spectrum="nonzero"), 1.3 * s[:6].mean() * u[:, :6] @ vh[:6])
    assert outside(iso_c(tau, 1.3), tau) > 0.5  # the paper's: most of the merge lies off the experts' directions
    for merged in (iso_c(tau, 1.3, spectrum="nonzero"), iso_cts(tau, 1.5, 0.8, spectrum="nonzero")):
        assert outside(merged, tau) < 1e-10
        assert torch.linalg.matrix_rank(merged) == 6
    assert_close(iso_cts(tau, 1.3, 1.0, spectrum="nonzero"), iso_c(tau, 1.3, spectrum="nonzero"))


def test_iso_of_all_zero_task_vectors_is_zero():
    # A tensor no expert changed (LoRA experts leave the MLPs alone): nothing to flatten, no 0/0.
    tau = torch.zeros(3, 6, 4, dtype=torch.float64)
    for spectrum in ("full", "nonzero"):
        assert torch.equal(iso_c(tau, 1.3, spectrum=spectrum), torch.zeros(6, 4, dtype=torch.float64))
        assert torch.equal(iso_cts(tau, 1.5, 0.5, spectrum=spectrum), torch.zeros(6, 4, dtype=torch.float64))


def test_iso_cts_ranks_split_the_task_part_evenly():
    assert iso_cts_ranks(4, 384, 384, 0.8) == (308, 19)  # floor(0.8 * 384) = 307 -> 77 / 4 rounds to 19
    assert iso_cts_ranks(8, 384, 1536, 0.8) == (304, 10)
    assert iso_cts_ranks(4, 6, 6, 0.1) == (2, 1)  # capped so that c >= 0


# ------------------------------------------------------------------------------------------------------ batching


def test_batched_over_equal_shapes_matches_one_tensor_at_a_time():
    vectors = {"a": random_stack(3, 5, 4, seed=1), "b": random_stack(3, 5, 4, seed=2), "c": random_stack(3, 4, 4)}
    vectors["bias"] = random_stack(3, 4)
    kernels = {
        "tsv_m": lambda tau, mat: tsv_m(tau, 1.0, None, mat),
        "iso_c": lambda tau, mat: iso_c(tau, 1.3, mat),
        "iso_cts": lambda tau, mat: iso_cts(tau, 1.5, 0.5, None, mat),
    }
    for name, kernel in kernels.items():
        batched = map_matrices(vectors, kernel, max_group_elements=10**6)
        assert list(batched) == list(vectors)
        for key, tau in vectors.items():
            assert_close(batched[key], kernel(tau, tau.dim() == 3), msg=f"{name} {key}")
    split = map_matrices(vectors, kernels["tsv_m"], max_group_elements=1)  # one tensor per batch
    assert_close(split, map_matrices(vectors, kernels["tsv_m"]))


def test_bf16_task_vectors_are_merged_in_float32():
    tau = random_stack(2, 6, 4).to(torch.bfloat16)
    out = map_matrices({"w": tau}, lambda x, mat: tsv_m(x, 1.0, None, mat))["w"]
    assert out.dtype == torch.float32
    assert_close(out, tsv_m(tau.float()))


def test_lowrank_svd_matches_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 200, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(3, 120, 120, generator=g))
    a = (u * 0.7 ** torch.arange(120.0)) @ v.mT  # sigma_j = 0.7^j
    exact = top_svd(a, 8)
    fast = top_svd(a, 8, lowrank_min_dim=100)
    assert_close(fast[1], exact[1], rtol=1e-5, atol=1e-6)
    assert_close(
        fast[0] * fast[1].unsqueeze(-2) @ fast[2], exact[0] * exact[1].unsqueeze(-2) @ exact[2], atol=1e-5, rtol=0
    )
    stack = a[:2].unsqueeze(0).expand(2, 2, 200, 120) * 0 + torch.stack([a[:2], a[1:]])  # [B=2, K=2, m, n]
    assert_close(tsv_m(stack, matrix=True, lowrank_min_dim=100), tsv_m(stack, matrix=True), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------ methods


def test_methods_are_registered_static_dense_and_compose():
    for name in ("tsv_m", "iso_c", "iso_cts"):
        spec = REGISTRY[name]
        assert spec.kind == "static" and spec.needs.dense and composes(spec)
        assert spec.paper.startswith("https://arxiv.org/abs/")


@pytest.mark.parametrize(
    "config, key",
    [
        ({"name": "tsv_m", "alpha": float("nan")}, "method.alpha"),
        ({"name": "tsv_m", "lowrank_min_dim": 0}, "method.lowrank_min_dim"),
        ({"name": "iso_cts", "alpha": 1.5, "common_fraction": 0.0}, "method.common_fraction"),
        ({"name": "iso_cts", "alpha": 1.5, "common_fraction": 1.5}, "method.common_fraction"),
        ({"name": "iso_cts", "alpha": 1.5}, "method.common_fraction"),
        ({"name": "iso_c", "alpha": 1.3, "common_fraction": 0.8}, "method.common_fraction"),
        ({"name": "iso_c", "alpha": "big"}, "method.alpha"),
        ({"name": "iso_c", "alpha": 1.3, "spectrum": "nonzeros"}, "method.spectrum"),
    ],
)
def test_bad_options_fail_naming_the_key(config, key):
    with pytest.raises(ConfigError, match=key):
        build_method(config)


# slow: the first pipeline run of a process builds the tiny experts (~50 s on 2 shared cores), then ~3 s per run.
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
@pytest.mark.parametrize("experiment", ["tiny", "tiny_lm"])
def test_runs_through_the_pipeline(method, experiment, tmp_path):
    overrides = [f"method={method}", f"experiment={experiment}", f"paths.output_dir={tmp_path}", "~logger"]
    if method.startswith("iso") and experiment == "tiny_lm":
        # alpha is tuned per model in the paper; the ViT-B/32 presets (1.3, 1.5) over-scale two tiny LM experts
        # (normalized score -0.26 and -1.5), 0.5 keeps 0.69 and 0.64 of their gain.
        overrides.append("method.alpha=0.5")
    result = run(make_cfg(*overrides))
    rows = {row["method"]: row for row in result["table"]}
    floor = rows["base + heads (floor)"]
    assert method in rows and math.isfinite(rows[method]["avg_normalized"])
    assert rows[method]["avg_normalized"] > floor["avg_normalized"]  # keeps part of the experts' gain
    assert (tmp_path / "merged" / "model" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["tsv_m", "iso_cts"])
def test_a_learner_learns_over_the_transformed_task_vectors(transform, tmp_path):
    overrides = ["method=adamerging", f"method.transform={transform}", "method.steps=5", "experiment=tiny"]
    result = run(make_cfg(*overrides, f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    assert math.isfinite(rows["adamerging"]["avg_normalized"])
    assert result["coefficients"]
