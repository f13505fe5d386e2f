"""WUDI-Merging: data-free, per-layer least squares with the task vectors standing in for the layers' inputs.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors",
ICML 2025. https://arxiv.org/abs/2503.08099

The paper shows that a linear layer's task vector ``tau_k [m, n]`` lies approximately in the span of the inputs
the expert was fine-tuned on, so its rows can replace those inputs when measuring how much the merged update
``tau_m`` disturbs task k. For every 2-D tensor the merged vector minimises (the paper's objective)::

    L(tau_m) = sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2

by Adam from ``tau_m = sum_k tau_k`` (task arithmetic with lam = 1), ``lr = 1e-5``, 300 steps, no weight decay
(the paper's settings for ViT; FusionBench's preset runs 400). Other tensors (biases, norms) are averaged. There
is no scaling coefficient: the optimisation sets the merge's scale.

``L`` is quadratic: with ``G_k = tau_k^T tau_k`` and ``c_k = ||tau_k||_F^2``, its gradient is ``2 (tau_m A - B)``,
``A = sum_k G_k / c_k [n, n]`` and ``B = sum_k tau_k G_k / c_k [m, n]``, so ``A`` and ``B`` are formed once and each
step costs one ``[m, n] x [n, n]`` product instead of ``K`` products through ``[m, m]`` matrices (a 30522-row
embedding would need four 30522 x 30522 ones). The minimiser solves ``tau_m A = B`` (:func:`wudi_closed_form`); the
finite Adam run from the sum is the paper's method, not that solve. Tensors of one shape are stacked
``[L, K, m, n]`` and optimised together: Adam is elementwise, so the batch follows the per-layer runs exactly.

The paper defines only a merged vector, so the per-task form (``transform``) is ``delta / K`` per row.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.doge_solvers import adam
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result
from adamerge.methods.subspace import MAX_GROUP_ELEMENTS, map_matrices, merged_params, rows_of_delta

log = logging.getLogger(__name__)

__all__ = ["wudi", "wudi_closed_form", "wudi_gradient", "wudi_normal_equations", "wudi_objective", "wudi_solve"]

DEFAULT_STEPS = 300
DEFAULT_LR = 1e-5


def squared_norms(tau: Tensor) -> Tensor:
    """``||tau_k||_F^2`` per task, ``[*, K, 1, 1]``; an all-zero task vector gets 1 (it adds nothing to ``L``)."""
    norms = tau.square().sum((-2, -1), keepdim=True)
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def wudi_objective(merged: Tensor, tau: Tensor) -> Tensor:
    """``sum_k ||(merged - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2`` as the paper writes it: ``merged [*, m, n]``,
    ``tau [*, K, m, n]`` -> ``[*]``."""
    product = (merged.unsqueeze(-3) - tau) @ tau.mT  # (*, K, m, m)
    return (product.square() / squared_norms(tau)).sum((-3, -2, -1))


def wudi_normal_equations(tau: Tensor) -> tuple[Tensor, Tensor]:
    """``A = sum_k tau_k^T tau_k / c_k [*, n, n]`` and ``B = sum_k tau_k tau_k^T tau_k / c_k [*, m, n]``."""
    gram = tau.mT @ tau / squared_norms(tau)  # (*, K, n, n)
    return gram.sum(-3), (tau @ gram).sum(-3)


def wudi_gradient(merged: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``dL/d merged = 2 (merged A - B)``."""
    return 2 * (merged @ a - b)


def wudi_closed_form(tau: Tensor) -> Tensor:
    """The exact minimiser ``B A^+`` (least squares; unique when ``A`` is invertible)."""
    a, b = wudi_normal_equations(tau)
    return torch.linalg.lstsq(a, b.mT).solution.mT  # A is symmetric: solve A X^T = B^T


def wudi_solve(tau: Tensor, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> Tensor:
    """Adam on ``L`` from ``sum_k tau_k`` for a stack ``tau [*, K, m, n]`` (batched over ``*``) -> ``[*, m, n]``."""
    a, b = wudi_normal_equations(tau)
    merged = tau.sum(-3).clone().requires_grad_(True)
    optimizer = adam(merged, lr)
    with torch.no_grad():
        for _ in range(steps):
            merged.grad = wudi_gradient(merged, a, b)
            optimizer.step()
    return merged.detach()


def wudi(tau: Tensor, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, matrix: bool | None = None) -> Tensor:
    """WUDI merged delta of one parameter's stack ``tau [K, *shape]``: the optimised vector for a 2-D parameter
    (``matrix``: by default ``tau.dim() == 3``; True for a batch ``[*, K, m, n]``), the mean otherwise."""
    if not (tau.dim() == 3 if matrix is None else matrix):
        return tau.mean(0)
    return wudi_solve(tau, steps, lr)


@dataclasses.dataclass
class WUDI:
    """WUDI-Merging (see the module docstring).

    Attributes:
        steps: Adam steps per tensor (paper: 300).
        lr: Adam learning rate (paper: 1e-5).
        max_group: most tensors of one shape optimised in one batch (memory bound); null: up to 2^27 entries.
    """

    name: str
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    max_group: int | None = None

    calibration_steps = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(
                f"method.steps must be >= 0 for 'wudi' (Adam steps; 0 is task arithmetic), got {self.steps}"
            )
        if not self.lr > 0:
            raise ConfigError(f"method.lr must be > 0 for 'wudi', got {self.lr!r}")
        if self.max_group is not None and self.max_group < 1:
            raise ConfigError(f"method.max_group must be null or >= 1 for 'wudi', got {self.max_group}")

    def options(self) -> dict:
        return {"steps": self.steps, "lr": self.lr}

    def deltas(self, pool: ExpertPool) -> dict[str, Tensor]:
        limit = MAX_GROUP_ELEMENTS
        if self.max_group is not None:
            largest = max((t[0].numel() * t.shape[0] for t in pool.task_vectors.values() if t.dim() == 3), default=1)
            limit = min(limit, self.max_group * largest)
        return map_matrices(pool.task_vectors, lambda tau, mat: wudi(tau, self.steps, self.lr, mat), limit)

    def merge(self, run: Run) -> MergeResult:
        return static_result(self.name, run, merged_params(run, self.deltas(run.pool)), self.options())

    def transform(self, run: Run) -> ExpertPool:
        """No per-task form in the paper: every row is the merged delta / K."""
        return rows_of_delta(run.pool, self.deltas(run.pool))


register(
    "wudi",
    kind="static",
    description="WUDI: per-layer Adam on sum_k ||(tau_m - tau_k) tau_k^T||^2 / ||tau_k||^2, data-free",
    paper="https://arxiv.org/abs/2503.08099",
    needs=Needs(dense=True),
)(WUDI)
