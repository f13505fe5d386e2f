"""Generalised task arithmetic: sparsify each task vector, optionally elect signs, then sum (or disjoint-mean).

One kernel covers the drop-then-merge family; each method is a setting of it, not a copy (``kernels.py`` keeps the
primitives: ``trim``, ``dare_mask``, ``elect_sign``, ``disjoint_mean``):

================  ===============  =========  ===========================================================
method            sparsify         consensus  options
================  ===============  =========  ===========================================================
task arithmetic   ``none``         ``none``   ``weights``
TIES              ``magnitude``    ``ties``   ``density``, ``weights``
DARE              ``dare``         ``none``   ``drop_rate``, ``rescale``, ``weights``
DELLA             ``della``        ``ties``   ``drop_rate``, ``epsilon``, ``rescale``, ``weights``
Breadcrumbs       ``breadcrumbs``  ``none``   ``bottom``, ``top``, ``weights``
================  ===============  =========  ===========================================================

Papers:
    - DELLA: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
      2024. https://arxiv.org/abs/2406.11617. MAGPRUNE: within each node (a row of a weight matrix; a vector is one
      row) the entries are ranked by magnitude, ``r_i = 0`` the largest; entry ``i`` is dropped with probability
      ``p_i = p - eps/2 + eps * r_i / n`` (so larger entries are dropped less, the mean rate stays ``p``), survivors
      are rescaled by ``1 / (1 - p_i)``; then TIES' elect and disjoint mean ("fuse"), times ``lambda``. The
      authors' code (declare-lab/della, ``mergekit/mergekit/sparsify.py``, ``rank_magnitude``) also ranks per row
      and spaces the probabilities by ``rank / (n - 1)``, not ``rank / n``: the largest drop probability differs
      by ``eps / n``. Their recipe: ``p = 0.3``, window ``eps = 0.14``, ``lambda = 1.1`` (README).
    - Model Breadcrumbs: Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
      Masks", ECCV 2024. https://arxiv.org/abs/2312.06795. Per task and layer (tensor), drop the ``bottom`` fraction
      of entries with the smallest magnitudes and the ``top`` fraction with the largest (outliers), then task
      arithmetic. The authors' code (rezazzr/breadcrumbs, ``src/task_vectors.py``, ``TaskVectorMiddleKeep``) ranks
      within each row (last dimension) of a matrix instead of the whole tensor, removes the top fraction first and
      then keeps a ``beta`` fraction of the row, and tunes ``beta``, ``gamma`` and ``lambda`` per setting
      (``find_best_hyperparam.py``: ``beta`` 0.05-0.20, ``gamma`` 0.001-0.01, ``lambda`` 0.01-1).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.kernels import (
    _check_stack,
    _expert_weights,
    _per_expert,
    dare_mask,
    disjoint_mean,
    elect_sign,
    task_arithmetic,
    trim,
)
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result
from adamerge.progress import progress

log = logging.getLogger(__name__)

SPARSIFIERS = ("none", "magnitude", "dare", "della", "breadcrumbs")
CONSENSUS = ("none", "ties")


# --------------------------------------------------------------------------------------------------- sparsifiers


def node_rows(tau: Tensor) -> Tensor:
    """View ``[K, *shape]`` as ``[K, rows, cols]``: one row per node (output unit) of a matrix; a vector is one row."""
    k = tau.shape[0]
    return tau.reshape(k, tau.shape[1], -1) if tau.dim() >= 3 else tau.reshape(k, 1, -1)


def della_mask(
    tau: Tensor, drop_rate: float, epsilon: float, rescale: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """DELLA's MAGPRUNE: drop entries with rank-dependent probabilities (small magnitudes more), rescale survivors.

    Within each node, ``r_i`` is entry ``i``'s rank by magnitude (0 = largest) among ``n``; it is dropped with
    probability ``p_i = drop_rate - epsilon/2 + epsilon * r_i / n`` and, when kept, divided by ``1 - p_i`` so its
    expectation is unchanged. ``epsilon = 0`` is DARE (``kernels.dare_mask``, the same draws).

    Args:
        tau: task-vector stack ``[K, *shape]``.
        drop_rate: mean drop probability ``p``.
        epsilon: width of the probability window; ``[p - eps/2, p + eps/2]`` must lie in ``[0, 1)``.
        rescale: divide survivors by their keep probability.
        generator: random generator on ``tau``'s device; the global RNG when ``None``.
    """
    _check_stack(tau)
    if not (0.0 <= drop_rate - epsilon / 2 and drop_rate + epsilon / 2 < 1.0 and epsilon >= 0):
        raise ValueError(
            f"DELLA needs 0 <= drop_rate - epsilon/2 and drop_rate + epsilon/2 < 1, got drop_rate={drop_rate}, "
            f"epsilon={epsilon} (config keys: method.drop_rate, method.epsilon)"
        )
    if epsilon == 0:
        dropped = dare_mask(tau, drop_rate, generator)
        return dropped if rescale or drop_rate == 0 else dropped * (1.0 - drop_rate)
    rows = node_rows(tau)  # (K, R, n)
    n = rows.shape[-1]
    order = rows.abs().argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=tau.device).expand_as(order))
    p = drop_rate - epsilon / 2 + epsilon * rank.to(torch.float32) / n  # (K, R, n) drop probabilities
    keep = torch.rand(tau.shape, generator=generator, device=tau.device).view(rows.shape) >= p
    kept = rows / (1.0 - p) if rescale else rows
    return torch.where(keep, kept, 0).to(tau.dtype).view(tau.shape)


def breadcrumbs_mask(tau: Tensor, bottom: float, top: float) -> Tensor:
    """Model Breadcrumbs' two-sided mask: per expert and tensor, zero the ``bottom`` fraction of entries with the
    smallest magnitudes and the ``top`` fraction with the largest; the rest is kept as is.

    Counts are ``round(bottom * n)`` and ``round(top * n)`` (``n`` entries); ties at a threshold are broken by
    ``torch.topk``. With nothing dropped ``tau`` itself is returned.
    """
    _check_stack(tau)
    if not (0.0 <= bottom and 0.0 <= top and bottom + top < 1.0):
        raise ValueError(
            f"breadcrumbs needs 0 <= bottom, 0 <= top, bottom + top < 1; got bottom={bottom}, top={top} "
            "(config keys: method.bottom, method.top)"
        )
    flat = tau.reshape(tau.shape[0], -1)  # (K, n)
    n = flat.shape[1]
    n_top, n_kept_or_top = round(top * n), n - round(bottom * n)
    if n_top == 0 and n_kept_or_top == n:
        return tau
    # The largest (n - n_bottom) entries, sorted: the first n_top of them are the outliers.
    kept = flat.abs().topk(n_kept_or_top, dim=1, sorted=True).indices[:, n_top:]
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=tau.device).scatter_(1, kept, True)
    return torch.where(mask, flat, 0).view(tau.shape)


def sparsify_stack(
    tau: Tensor,
    sparsify: str = "none",
    *,
    density: float = 1.0,
    drop_rate: float = 0.0,
    epsilon: float = 0.0,
    bottom: float = 0.0,
    top: float = 0.0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Each expert's task vector through one sparsifier of :data:`SPARSIFIERS` (see the module table)."""
    if sparsify == "none":
        return tau
    if sparsify == "magnitude":
        return trim(tau, density)
    if sparsify == "dare":
        dropped = dare_mask(tau, drop_rate, generator)
        return dropped if rescale or drop_rate == 0 else dropped * (1.0 - drop_rate)
    if sparsify == "della":
        return della_mask(tau, drop_rate, epsilon, rescale, generator)
    if sparsify == "breadcrumbs":
        return breadcrumbs_mask(tau, bottom, top)
    raise ValueError(f"unknown sparsify {sparsify!r}; choose one of {SPARSIFIERS}")


# --------------------------------------------------------------------------------------------------- the kernel


def generalized_task_arithmetic(
    tau: Tensor, sparsify: str = "none", consensus: str = "none", weights: Tensor | float = 1.0, **options
) -> Tensor:
    """Sparsify, weight, then sum (``consensus="none"``) or elect signs and take the disjoint mean (``"ties"``).

    ``sparsify="magnitude", consensus="ties"`` is exactly ``kernels.ties``; ``sparsify="dare"`` exactly
    ``kernels.dare`` (same generator, same draws).

    Args:
        tau: task-vector stack ``[K, *shape]``.
        sparsify: one of :data:`SPARSIFIERS`.
        consensus: one of :data:`CONSENSUS`.
        weights: scalar or ``[K]``; multiplies the sparsified vectors before any sign election (as ``kernels.ties``).
        **options: the sparsifier's options (:func:`sparsify_stack`).

    Returns:
        The merged delta, shape ``shape``.
    """
    sparse = sparsify_stack(tau, sparsify, **options)
    if consensus == "none":
        return task_arithmetic(sparse, weights)
    if consensus != "ties":
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS}")
    weighted = sparse * _per_expert(_expert_weights(weights, tau), tau)
    return disjoint_mean(weighted, elect_sign(weighted))


def generalized_task_vectors(
    tau: Tensor, sparsify: str = "none", consensus: str = "none", weights: Tensor | float = 1.0, **options
) -> Tensor:
    """Per-task form of :func:`generalized_task_arithmetic`: rows ``[K, *shape]`` whose sum over ``k`` is the merge.

    With TIES consensus, row ``k`` keeps expert ``k``'s entries that agree with the elected sign, divided by the
    number of agreeing experts, so the plain sum is the disjoint mean.
    """
    sparse = sparsify_stack(tau, sparsify, **options)
    weighted = sparse * _per_expert(_expert_weights(weights, tau), tau)
    if consensus == "none":
        return weighted
    if consensus != "ties":
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS}")
    agree = (torch.sign(weighted) == elect_sign(weighted)) & (weighted != 0)
    return torch.where(agree, weighted, 0) / agree.sum(0).clamp(min=1).to(tau.dtype)


# --------------------------------------------------------------------------------------------------- methods


def merge_pool(pool: ExpertPool, what: str, seed: int | None, **kernel_options) -> dict[str, Tensor]:
    """theta_0 + generalised task arithmetic, tensor by tensor; a seeded generator makes the random drops repeatable."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    base = pool.base_tensors()
    tensors = progress(pool.task_vectors.items(), what, log, unit="tensor", total=len(pool.task_vectors))
    return {
        name: base[name] + generalized_task_arithmetic(tau, generator=generator, **kernel_options).to(base[name].dtype)
        for name, tau in tensors
    }


def transform_pool(pool: ExpertPool, seed: int | None, **kernel_options) -> ExpertPool:
    """The pool of per-task rows (:func:`generalized_task_vectors`), drawn with the same masks as :func:`merge_pool`."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stacks = {
        n: generalized_task_vectors(tau, generator=generator, **kernel_options) for n, tau in pool.task_vectors.items()
    }
    return dataclasses.replace(pool, task_vectors=stacks)


@dataclasses.dataclass
class Della:
    """DELLA-Merging: MAGPRUNE drop-and-rescale, then TIES elect and disjoint mean, times lambda.

    Attributes:
        drop_rate: mean drop probability ``p``.
        epsilon: probability window ``eps`` (``p_i`` spans ``[p - eps/2, p + eps/2]`` by magnitude rank).
        weights: lambda, the scaling after the merge.
        rescale: divide survivors by ``1 - p_i`` (the paper's step 1).
        seed: the random drops.
    """

    name: str
    drop_rate: float = 0.3
    epsilon: float = 0.14
    weights: float = 1.1
    rescale: bool = True
    seed: int = 0

    calibration_steps = 0

    def __post_init__(self) -> None:
        if not (
            0.0 <= self.epsilon and 0.0 <= self.drop_rate - self.epsilon / 2 and self.drop_rate + self.epsilon / 2 < 1
        ):
            raise ConfigError(
                f"method.drop_rate={self.drop_rate} and method.epsilon={self.epsilon} need 0 <= drop_rate - epsilon/2 "
                f"and drop_rate + epsilon/2 < 1 ({self.name!r}); fix method.drop_rate or method.epsilon"
            )

    def kernel_options(self) -> dict:
        return dict(
            sparsify="della", consensus="ties", drop_rate=self.drop_rate, epsilon=self.epsilon,
            rescale=self.rescale, weights=self.weights,
        )  # fmt: skip

    def merge(self, run: Run) -> MergeResult:
        params = merge_pool(run.pool, self.name, self.seed, **self.kernel_options())
        return static_result(self.name, run, params, options_record(self))

    def transform(self, run: Run) -> ExpertPool:
        """Rows: each expert's MAGPRUNE-kept entries that agree with the elected sign, times lambda, divided by the
        number of agreeing experts; their plain sum is the DELLA merge (same draws)."""
        return transform_pool(run.pool, self.seed, **self.kernel_options())


@dataclasses.dataclass
class Breadcrumbs:
    """Model Breadcrumbs: per task and tensor, drop the smallest and the largest-magnitude entries, then task
    arithmetic.

    Attributes:
        bottom: fraction of each tensor's entries with the smallest magnitudes dropped (85% by default).
        top: fraction with the largest magnitudes dropped as outliers.
        weights: lambda of the task arithmetic over the masked vectors.
    """

    name: str
    bottom: float = 0.85
    top: float = 0.01
    weights: float = 0.3

    calibration_steps = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.bottom and 0.0 <= self.top and self.bottom + self.top < 1):
            raise ConfigError(
                f"method.bottom={self.bottom} and method.top={self.top} need 0 <= bottom, 0 <= top, bottom + top < 1 "
                f"({self.name!r}): something must be kept"
            )

    def kernel_options(self) -> dict:
        return dict(sparsify="breadcrumbs", bottom=self.bottom, top=self.top, weights=self.weights)

    def merge(self, run: Run) -> MergeResult:
        params = merge_pool(run.pool, self.name, None, **self.kernel_options())
        return static_result(self.name, run, params, options_record(self))

    def transform(self, run: Run) -> ExpertPool:
        """Rows: lambda times each expert's masked task vector; their plain sum is the Breadcrumbs merge."""
        return transform_pool(run.pool, None, **self.kernel_options())


def options_record(method) -> dict:
    return {k: v for k, v in dataclasses.asdict(method).items() if k != "name"}


register(
    "della",
    kind="static",
    description="DELLA: magnitude-ranked random drop and rescale (MAGPRUNE), then TIES elect and disjoint mean",
    paper="https://arxiv.org/abs/2406.11617",
    needs=Needs(dense=True),
    random_masks=True,
)(Della)
register(
    "breadcrumbs",
    kind="static",
    description="Model Breadcrumbs: drop each task vector's smallest and largest entries per tensor, then task arithmetic",
    paper="https://arxiv.org/abs/2312.06795",
    needs=Needs(dense=True),
)(Breadcrumbs)
