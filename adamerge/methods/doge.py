"""DOGE: data-free merging by adaptive projective gradient descent on a shared modification of the task vectors.

Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", ICML 2025.
https://arxiv.org/abs/2501.01230

Every merged tensor with task-vector stack ``tau [K, *shape]`` becomes::

    theta = theta_0 + sum_i lam_i (tau_i + delta)

- ``lam_i = eta / ||tau_i||_F`` per expert and tensor: task-aware and training-free (``eta`` = 0.07 by default), so
  every ``lam_i tau_i`` has norm ``eta``; an all-zero task vector gets ``lam = 0``.
- ``delta [m, n]``, for 2-D tensors only, is one modification shared by the experts, learned without data so that
  the merge stays close to each expert. With ``D_j = tau_j - sum_i lam_i (tau_i + delta)`` (expert ``j`` minus the
  merge) the objective is ``sum_j ||tau_j^T D_j||^2``, the gap measured along the expert's own task vector, in one
  of two forms (``form``):

  * ``"row"`` (default): ``sum_j sum_r <tau_j[r], D_j[r]>^2``, one inner product per row (output unit) of the
    weight;
  * ``"matrix"``: ``sum_j <tau_j, D_j>_F^2``, the formula read with each task vector flattened to one vector.

  Both cost ``O(K m n)`` per step. ``row`` is the default because ``matrix`` gives only ``K`` scalar conditions per
  tensor: its gradient ``sum_j c_j tau_j`` (projected) keeps delta in the span of the ``K`` projected task vectors,
  so it can only re-weight the tasks' non-shared parts, little beyond what ``lam`` does. ``row`` gives ``K``
  conditions per row, so it can close each output unit's gap, and it is strictly finer:
  ``<tau, D>_F = sum_r <tau[r], D[r]>``, so a zero ``row`` objective makes the ``matrix`` one zero too. (The third reading, the ``[n, n]`` product
  ``tau_j^T D_j``, costs ``O(K m n^2)`` a step, 7e10 flops for a 30522 x 384 embedding, and is not implemented.)
- Shared subspace: each ``tau_i`` keeps its top ``k`` left singular vectors; the ``K k`` of them are stacked and
  their SVD gives an orthonormal basis ``U [m, <= K k]`` of the directions the tasks rely on. The gradient of
  delta is projected onto its orthogonal complement, ``g <- g - U U^T g``, so the modification leaves that shared
  knowledge alone.
- Optional masking (``top_k``): each expert's modified task vector ``tau_i + delta`` keeps its top ``top_k``
  fraction of entries by magnitude (TIES's ``trim``), before the coefficients are applied.

Non-2-D tensors (biases, norms) get no delta, only the task-aware coefficients; which tensors are merged at all is
the pool's include/exclude config. The objective reads a 2-D tensor in its stored layout (rows = dim 0, the
output units of ``nn.Linear``).

Choices where the paper leaves room (all arguments):

- ``rank_ratio`` = 0.1: the shared subspace has ``r = rank_ratio * min(m, n)`` directions in all, ``k = r / K``
  (at least 1) per task. ``rank_ratio=1`` with ``m <= n`` makes ``U`` span everything and delta 0 (task-aware task
  arithmetic); 0 means no projection. A tenth keeps each task's top 1-3% of directions for 4-8 tasks, where
  fine-tuning updates keep most of their energy.
- ``solver="adam"``, ``steps`` = 400, ``lr`` = 1e-4, default betas and eps: Adam from ``delta = 0`` for the 400
  steps of the per-layer loop this replaces (the lr is our choice: a step moves an entry by about ``lr``, and
  fine-tuning task vectors are ~1e-4-1e-3 per entry). The step count is the regulariser: the exact minimiser can need
  ``|delta| ~ |tau| / sum lam`` (on the tiny test experts it is 10x the task vectors). ``solver="cg"`` runs
  projected conjugate gradient to that exact minimiser instead (``steps`` = iterations).
- ``project_update`` = True: Adam rescales each entry, so a projected gradient alone does not give a step
  orthogonal to ``U``; the iterate is projected after each step too (projected gradient descent). False projects
  the gradient only.
- Masking: ``top_k`` = None (off); when set, per expert and tensor, on ``tau_i + delta``, before ``lam``.
- Per-task singular vectors: exact SVD for small matrices, randomized subspace iteration (4 power iterations, 10
  extra columns, fixed seed) otherwise; the second SVD (of the tall ``[m, K k]`` stack) goes through its ``K k``
  Gram matrix in float64. Both avoid batched LAPACK SVDs, which take tens of seconds per model on a CPU.

This module sets the problem up (coefficients, shared subspace), checks the arguments and merges; the objective
and its solvers (batched projected Adam or CG, and the per-layer reference) are in :mod:`adamerge.methods.doge_solvers`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.doge_solvers import FORMS, SOLVERS, check_choice, doge_objective, solve_batched, solve_dtype
from adamerge.methods.kernels import task_arithmetic, trim
from adamerge.methods.registry import MergeResult, Needs, Run, register, static_result

log = logging.getLogger(__name__)

__all__ = [
    "doge_merge",
    "doge_transform",
    "shared_subspace",
    "top_singular",
    "solve_pool",
    "task_aware_coefficients",
]

RANK_TOL = 1e-4
"""Singular values below this fraction of the largest are treated as zero (fp32 noise is ~1e-7)."""
OVERSAMPLE = 10
POWER_ITERS = 4
"""Randomized SVD settings (see :func:`top_singular`)."""


# --------------------------------------------------------------------------------------------------- kernels


def task_aware_coefficients(tau: Tensor, eta: float, batch_dims: int = 0) -> Tensor:
    """``lam_i = eta / ||tau_i||_F`` per expert, 0 for an all-zero task vector.

    Args:
        tau: stack ``[*batch, K, *shape]``.
        eta: target norm of each ``lam_i tau_i``.
        batch_dims: how many leading dims are batch (tensors solved together), not experts.

    Returns:
        ``[*batch, K]`` in the solve dtype.
    """
    flat = tau.reshape(*tau.shape[: batch_dims + 1], -1).to(solve_dtype(tau.dtype))
    norms = flat.norm(dim=-1)
    return torch.where(norms > 0, eta / norms, torch.zeros_like(norms))


def per_task_rank(num_experts: int, m: int, n: int, rank_ratio: float) -> int:
    """Top singular vectors kept per task: ``rank_ratio * min(m, n) / K``, at least 1 unless the ratio is 0."""
    if rank_ratio == 0:
        return 0
    full = min(m, n)
    return min(full, max(1, round(rank_ratio * full / num_experts)))


def top_singular(a: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
    """Top ``k`` left singular vectors ``[*, m, k]`` and values ``[*, k]`` of a matrix stack ``a [*, m, n]``.

    Exact SVD for small matrices (or ``exact=True``); otherwise randomized subspace iteration (Halko, Martinsson and
    Tropp, 2011) with ``OVERSAMPLE`` extra columns and ``POWER_ITERS`` power iterations: a batched LAPACK SVD of a
    hundred 384 x 384 matrices takes ~20 s on two CPU cores, this a fraction of a second. The test matrix comes from
    a fixed seed and is shared by the whole batch, so a tensor gets the same basis alone or batched.
    """
    m, n = a.shape[-2:]
    q = min(m, n, k + OVERSAMPLE)
    if exact or (exact is None and 2 * q >= min(m, n)):
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        return u[..., :k], s[..., :k]
    omega = torch.randn(n, q, generator=torch.Generator().manual_seed(0), dtype=a.dtype).to(a.device)
    y = a @ omega  # (*, m, q)
    for _ in range(POWER_ITERS):
        y = a @ (a.mT @ torch.linalg.qr(y).Q)
    basis = torch.linalg.qr(y).Q
    u, s, _ = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # (*, q, q): a small SVD
    return basis @ u[..., :k], s[..., :k]


def shared_subspace(tau: Tensor, rank_ratio: float, exact: bool | None = None) -> Tensor:
    """Orthonormal basis of the tasks' shared column space: top left singular vectors per task, stacked, SVD again.

    Directions with (near) zero singular value, from all-zero or low-rank task vectors or from tasks sharing a
    direction, are dropped as zero columns, so ``U U^T`` is always the projector onto the kept span.

    Args:
        tau: stack ``[*batch, K, m, n]``.
        rank_ratio: total rank ``r = rank_ratio * min(m, n)`` shared by the ``K`` tasks, in ``[0, 1]``.
        exact: per-task singular vectors by full SVD (True), randomized (False) or by size (None, see
            :func:`top_singular`).

    Returns:
        ``U [*batch, m, K k]`` with orthonormal or zero columns (at most ``min(m, K k)`` nonzero).
    """
    *batch, K, m, n = tau.shape
    k = per_task_rank(K, m, n, rank_ratio)
    tau = tau.to(solve_dtype(tau.dtype))
    if k == 0:
        return tau.new_zeros(*batch, m, 0)
    u, s = top_singular(tau, k, exact)  # (*, K, m, k), (*, K, k)
    u = u * (s > RANK_TOL * s.amax(dim=(-2, -1), keepdim=True)).unsqueeze(-2)
    stacked = u.transpose(-3, -2).reshape(*batch, m, K * k)  # (*, m, K k)
    # SVD of the tall stack through its small Gram matrix, in float64 so that singular values down to RANK_TOL
    # survive the squaring; same left singular vectors, no LAPACK call on an [m, K k] matrix.
    eigvals, w = torch.linalg.eigh(stacked.mT.double() @ stacked.double())  # ascending, (*, K k)
    s2 = eigvals.clamp_min(0).sqrt()
    keep = s2 > RANK_TOL * s2.amax(dim=-1, keepdim=True)
    w = torch.where(keep.unsqueeze(-2), w / torch.where(keep, s2, 1).unsqueeze(-2), 0)
    return (stacked.double() @ w).to(stacked.dtype).flip(-1)  # (*, m, K k): strongest direction first


# --------------------------------------------------------------------------------------------------- pool level


def solve_pool(
    pool: ExpertPool,
    eta: float = 0.07,
    rank_ratio: float = 0.1,
    form: str = "row",
    solver: str = "adam",
    steps: int = 400,
    lr: float = 1e-4,
    coefficients: float | None = None,
    project_update: bool = True,
    max_group: int | None = None,
    key: str = "method.merge",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """DOGE's deltas (2-D tensors) and coefficients (all tensors), solving equal shapes together.

    Args: as in :func:`doge_merge`; ``key`` is the config node named in error messages.

    Returns:
        ``(deltas, lams)``: ``{name: delta [m, n]}`` for 2-D tensors and ``{name: lam [K]}`` for every tensor, both
        in the solve dtype on the task vectors' device.
    """
    _check_args(key, eta, rank_ratio, form, solver, steps, lr, coefficients, max_group)
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    lams = {}
    for name, tau in pool.task_vectors.items():
        if tau.dim() == 3:
            groups[tuple(tau.shape)].append(name)
        else:
            lams[name] = _coefficients(tau, eta, coefficients, batch_dims=0)
    deltas = {}
    for shape, names in groups.items():
        size = max_group or len(names)
        for start in range(0, len(names), size):
            chunk = names[start : start + size]
            tau = torch.stack([pool.task_vectors[n] for n in chunk]).to(solve_dtype(pool.task_vectors[chunk[0]].dtype))
            lam = _coefficients(tau, eta, coefficients, batch_dims=1)  # (L, K)
            U = shared_subspace(tau, rank_ratio)
            delta = solve_batched(tau, lam, U, form, solver, steps, lr, project_update)
            if log.isEnabledFor(logging.INFO):
                before = doge_objective(tau, lam, torch.zeros_like(delta), form).sum().item()
                after = doge_objective(tau, lam, delta, form).sum().item()
                log.info(
                    "doge %s x%d (U rank %d): objective %.4g -> %.4g",
                    list(shape[1:]),
                    len(chunk),
                    U.shape[-1],
                    before,
                    after,
                )
            deltas |= dict(zip(chunk, delta.unbind(0)))
            lams |= dict(zip(chunk, lam.unbind(0)))
    return deltas, lams


def modified_task_vectors(tau: Tensor, delta: Tensor | None, top_k: float | None) -> Tensor:
    """``tau_i + delta`` for every expert (``tau`` where there is no delta), then the optional top-k mask."""
    out = tau.to(solve_dtype(tau.dtype))
    if delta is not None:
        out = out + delta
    return trim(out, top_k) if top_k is not None else out


def doge_merge(
    pool: ExpertPool,
    eta: float = 0.07,
    rank_ratio: float = 0.1,
    form: str = "row",
    solver: str = "adam",
    steps: int = 400,
    lr: float = 1e-4,
    top_k: float | None = None,
    coefficients: float | None = None,
    project_update: bool = True,
    max_group: int | None = None,
) -> dict[str, Tensor]:
    """DOGE merge: ``theta_0 + sum_i lam_i mask(tau_i + delta)`` for every tensor of the pool.

    Args:
        pool: the experts; every tensor in ``pool.task_vectors`` is merged.
        eta: task-aware coefficients ``lam_i = eta / ||tau_i||`` per tensor.
        rank_ratio: size of the shared subspace, as a fraction of ``min(m, n)``, in ``[0, 1]``.
        form: objective form, ``"row"`` (default) or ``"matrix"``; see the module docstring.
        solver: ``"adam"`` (paper) or ``"cg"`` (exact minimiser of the quadratic).
        steps: Adam steps or CG iterations; 0 gives ``delta = 0``.
        lr: Adam learning rate.
        top_k: fraction of entries each modified task vector keeps by magnitude, in ``(0, 1]``; None: no mask.
        coefficients: one fixed ``lam`` for every expert and tensor instead of the task-aware ones (e.g. 0.3 for
            task arithmetic's); None: task-aware.
        project_update: also project delta after each Adam step (see the module docstring).
        max_group: most tensors solved in one batch (bounds memory); None: a whole shape group at once.

    Returns:
        ``{name: merged tensor}`` in each base tensor's dtype.
    """
    _check_top_k(top_k, "method")
    deltas, lams = solve_pool(
        pool, eta, rank_ratio, form, solver, steps, lr, coefficients, project_update, max_group, key="method"
    )
    base = pool.base_tensors()
    merged = {}
    for name, tau in pool.task_vectors.items():
        update = task_arithmetic(modified_task_vectors(tau, deltas.get(name), top_k), lams[name])
        merged[name] = (base[name].to(update.dtype) + update.to(base[name].device)).to(base[name].dtype)
    return merged


def doge_transform(
    pool: ExpertPool,
    eta: float = 0.07,
    rank_ratio: float = 0.1,
    form: str = "row",
    solver: str = "adam",
    steps: int = 400,
    lr: float = 1e-4,
    top_k: float | None = None,
    coefficients: float | None = None,
    project_update: bool = True,
    max_group: int | None = None,
) -> ExpertPool:
    """A pool whose task vectors are DOGE's ``mask(tau_i + delta)``, for learning coefficients on (DOGE AdaMerging).

    ``lam`` is used to solve for delta only; the learned method brings its own coefficients.

    Args: as in :func:`doge_merge`.
    """
    _check_top_k(top_k, "method.transform")
    deltas, _ = solve_pool(
        pool, eta, rank_ratio, form, solver, steps, lr, coefficients, project_update, max_group, key="method.transform"
    )
    task_vectors = {
        n: modified_task_vectors(tau, deltas.get(n), top_k).to(tau.dtype) for n, tau in pool.task_vectors.items()
    }
    return dataclasses.replace(pool, task_vectors=task_vectors)


# --------------------------------------------------------------------------------------------------- checks


def _coefficients(tau: Tensor, eta: float, fixed: float | None, batch_dims: int) -> Tensor:
    if fixed is None:
        return task_aware_coefficients(tau, eta, batch_dims)
    return torch.full(tau.shape[: batch_dims + 1], float(fixed), dtype=solve_dtype(tau.dtype), device=tau.device)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_top_k(top_k: float | None, key: str) -> None:
    if top_k is not None and not (_is_number(top_k) and 0 < top_k <= 1):
        raise ValueError(f"top_k must be a fraction in (0, 1] or null, got {top_k!r} (config key: {key}.top_k)")


def _check_args(key, eta, rank_ratio, form, solver, steps, lr, coefficients, max_group) -> None:
    if not (_is_number(eta) and eta > 0):
        raise ValueError(f"eta must be a number > 0, got {eta!r} (config key: {key}.eta)")
    if not (_is_number(rank_ratio) and 0 <= rank_ratio <= 1):
        raise ValueError(f"rank_ratio must be in [0, 1], got {rank_ratio!r} (config key: {key}.rank_ratio)")
    check_choice(form, FORMS, "form", key)
    check_choice(solver, SOLVERS, "solver", key)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r} (config key: {key}.steps)")
    if not (_is_number(lr) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r} (config key: {key}.lr)")
    if coefficients is not None and not _is_number(coefficients):
        raise ValueError(
            f"coefficients must be a number or null, got {coefficients!r} (config key: {key}.coefficients)"
        )
    if max_group is not None and (isinstance(max_group, bool) or not isinstance(max_group, int) or max_group < 1):
        raise ValueError(f"max_group must be an int >= 1 or null, got {max_group!r} (config key: {key}.max_group)")


@dataclasses.dataclass
class Doge:
    """DOGE's options, as :func:`doge_merge` documents them (config keys ``method.<option>``)."""

    name: str
    eta: float = 0.07
    rank_ratio: float = 0.1
    form: str = "row"
    solver: str = "adam"
    steps: int = 400
    lr: float = 1e-4
    top_k: float | None = None
    coefficients: float | None = None
    project_update: bool = True
    max_group: int | None = None

    calibration_steps = 0

    def __post_init__(self) -> None:
        _check_top_k(self.top_k, "method")
        o = self
        _check_args("method", o.eta, o.rank_ratio, o.form, o.solver, o.steps, o.lr, o.coefficients, o.max_group)

    def options(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def transform(self, run: Run) -> ExpertPool:
        """Task vectors modified by DOGE's shared delta (its task-aware lam serves the solve only)."""
        return doge_transform(run.pool, **self.options())

    def merge(self, run: Run) -> MergeResult:
        return static_result(self.name, run, doge_merge(run.pool, **self.options()), self.options())


register(
    "doge",
    kind="static",
    description="DOGE: data-free; task-aware lam = eta / norm(tau) and a shared delta by projective gradient descent",
    paper="https://arxiv.org/abs/2501.01230",
    needs=Needs(dense=True),
)(Doge)
