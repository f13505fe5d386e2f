"""LiNeS: scale a merged update by layer depth, little in shallow blocks, more in deep ones.

Paper: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025.
https://arxiv.org/abs/2410.17146. The update of the ``l``-th of ``L`` blocks (``l = 0 .. L-1``) is multiplied by
``lambda_l = alpha + beta * l / (L - 1)``: shallow layers stay near the pre-trained weights (general features, less
interference), deep ones keep the task-specific update. Tensors outside the blocks (embeddings, final norms, pooler)
get ``alpha``, as in the authors' code; classification heads are never merged here (each task keeps its own).

For multi-task merging the paper fixes ``alpha = ||sum_t tau_t||_1 / (T ||tau_merged||_1)`` (norms over the whole
model; ``1/T`` when the merged update is task arithmetic's sum) and tunes ``beta`` on validation data in (0, 1].
Blocks are found with the project's block naming (``adamerge.core.coefficients.DEFAULT_BLOCK_PATTERN``:
``layers.N``, ``layer.N``, ``h.N``, ``blocks.N``); ``L`` is the number of distinct block indices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from adamerge.core.coefficients import DEFAULT_BLOCK_PATTERN
from adamerge.core.pool import ExpertPool
from adamerge.methods.kernels import DEFAULT_DENSITY, task_arithmetic, ties
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, check_choice, register, static_result
from adamerge.methods.sparsify import generalized_task_vectors

MERGES = ("task_arithmetic", "ties")


def block_index(name: str, pattern: str = DEFAULT_BLOCK_PATTERN) -> int | None:
    """The block number of a tensor (``encoder.layer.3.attn.w`` -> 3), ``None`` outside the blocks."""
    match = re.match(pattern, name)
    return int(match.group(1).rpartition(".")[2]) if match else None


def layer_scalings(names: Iterable[str], alpha: float, beta: float, pattern: str = DEFAULT_BLOCK_PATTERN) -> dict:
    """``lambda_l = alpha + beta * l / (L - 1)`` per tensor name; ``alpha`` outside the blocks (and when ``L = 1``)."""
    names = list(names)
    depth = {name: block_index(name, pattern) for name in names}
    blocks = sorted({d for d in depth.values() if d is not None})
    rank = {b: i for i, b in enumerate(blocks)}  # the l-th block, whatever the numbering starts at
    last = max(len(blocks) - 1, 1)
    return {name: alpha if d is None else alpha + beta * rank[d] / last for name, d in depth.items()}


def merged_updates(pool: ExpertPool, merge: str) -> dict[str, Tensor]:
    """The update LiNeS scales: task arithmetic's unscaled sum, or TIES (the paper's two main bases)."""
    if merge == "task_arithmetic":
        return {n: task_arithmetic(tau, 1.0) for n, tau in pool.task_vectors.items()}
    return {n: ties(tau, DEFAULT_DENSITY) for n, tau in pool.task_vectors.items()}


def norm_alpha(pool: ExpertPool, merged: dict[str, Tensor]) -> float:
    """The paper's ``alpha`` for merging: ``||sum_t tau_t||_1 / (T * ||tau_merged||_1)`` over the whole model."""
    summed = sum(float(tau.sum(0).abs().sum()) for tau in pool.task_vectors.values())
    norm = sum(float(delta.abs().sum()) for delta in merged.values())
    return summed / (pool.num_experts * norm) if norm > 0 else 1.0 / pool.num_experts


@dataclasses.dataclass
class LiNeS:
    """LiNeS over a merged update: depth-increasing scaling ``alpha + beta * l / (L - 1)``.

    Attributes:
        alpha: scaling of the first block and of tensors outside blocks; ``null`` = the paper's norm rule (``1/T``
            over task arithmetic).
        beta: increase from the first block to the last (the paper tunes it in (0, 1]).
        base_merge: the update scaled: ``task_arithmetic`` (sum of task vectors) or ``ties`` (density 0.2).
    """

    name: str
    alpha: float | None = None
    beta: float = 0.5
    base_merge: str = "task_arithmetic"

    calibration_steps = 0

    def __post_init__(self) -> None:
        check_choice(self.base_merge, MERGES, "method.base_merge", self.name)
        if self.alpha is not None and self.alpha < 0:
            raise ConfigError(f"method.alpha={self.alpha} must be >= 0, or null for the paper's norm rule")

    def scalings(self, pool: ExpertPool, merged: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
        alpha = norm_alpha(pool, merged) if self.alpha is None else self.alpha
        return alpha, layer_scalings(pool.task_vectors, alpha, self.beta)

    def merge(self, run: Run) -> MergeResult:
        pool = run.pool
        merged = merged_updates(pool, self.base_merge)
        alpha, scale = self.scalings(pool, merged)
        base = pool.base_tensors()
        params = {n: base[n] + (scale[n] * delta).to(base[n].dtype) for n, delta in merged.items()}
        options = {"alpha": self.alpha, "beta": self.beta, "base_merge": self.base_merge, "alpha_used": alpha}
        return static_result(self.name, run, params, options)

    def transform(self, run: Run) -> ExpertPool:
        """Rows: each task's depth-scaled vector ``lambda_l * tau_k`` (over TIES: its TIES row, agreeing entries
        divided by their count); their plain sum is the LiNeS merge."""
        pool = run.pool
        alpha, scale = self.scalings(pool, merged_updates(pool, self.base_merge))
        kernel = (
            {"sparsify": "magnitude", "consensus": "ties", "density": DEFAULT_DENSITY}
            if self.base_merge == "ties"
            else {}
        )
        stacks = {
            n: generalized_task_vectors(tau, **kernel) * torch.tensor(scale[n], dtype=tau.dtype)
            for n, tau in pool.task_vectors.items()
        }
        return dataclasses.replace(pool, task_vectors=stacks)


register(
    "lines",
    kind="static",
    description="LiNeS: scale the merged update linearly with layer depth (alpha + beta * l / (L-1))",
    paper="https://arxiv.org/abs/2410.17146",
    needs=Needs(dense=True),
)(LiNeS)
