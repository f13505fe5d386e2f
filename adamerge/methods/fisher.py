"""Fisher merging: a per-parameter weighted average, each expert weighted by its diagonal Fisher information.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, https://arxiv.org/abs/2111.09832:

    theta* = sum_k F_k theta_k / sum_k F_k      (per entry; F_k floored at ``fisher_floor``)

and on task vectors, since the base term cancels: ``delta = sum_k F_k tau_k / sum_k F_k``. ``F_k`` is expert ``k``'s
diagonal Fisher on its own task's unlabeled calibration data, with labels from the expert's own predictive
distribution (``adamerge.methods.statistics.diagonal_fisher``: exact expectation over classes for classifiers,
sampled tokens for causal LMs). The heads are per task and never merged.

Choices and differences with FusionBench (``scripts/regmean_peer_check.py``):

- The floor is ``max(F, 1e-6)`` (``fisher_floor``; the paper's code floors the Fisher at 1e-6). FusionBench adds
  ``minimal_fisher_weight`` = 1e-6 instead (``F + 1e-6``): the same where ``F >> 1e-6``, and the peer check shows the
  two agree exactly once the floor is moved.
- No normalisation of each expert's Fisher: the paper's equation weights the raw Fishers (equal model weights
  ``lambda_k = 1/K``, which cancel). FusionBench defaults to ``normalize_fisher_weight: true`` (each expert's
  Fisher divided by its global L2 norm), which is not in the paper.
- FusionBench's Fisher squares the gradient of a whole batch's sum of ``sqrt(p_y) log p_y``, which adds cross terms
  between examples and classes; the paper's Fisher is the expectation of per-example squared scores, computed here
  example by example.

As a transform (``method.transform=fisher``) row ``k`` is ``F_k tau_k / sum_j F_j``: the per-task parts whose sum is
the merge.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

from adamerge.core.factory import merged_model
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, check_choice, register, static_result
from adamerge.methods.statistics import calibration_batches, diagonal_fisher

log = logging.getLogger(__name__)

LABELS = ("expected", "sampled")


def fisher_weights(fisher: Tensor, floor: float) -> Tensor:
    """Per-expert weights ``max(F_k, floor) / sum_j max(F_j, floor)`` over a [K, *shape] Fisher stack."""
    floored = fisher.clamp_min(floor)
    return floored / floored.sum(0)


def fisher_merge(tau: Tensor, fisher: Tensor, floor: float = 1e-6) -> Tensor:
    """``sum_k F_k tau_k / sum_k F_k`` per entry, ``F`` floored at ``floor``. tau, fisher: [K, *shape]."""
    if tau.shape != fisher.shape:
        raise ValueError(f"Fisher {tuple(fisher.shape)} does not match the task vectors {tuple(tau.shape)}")
    return (fisher_weights(fisher.float(), floor) * tau.float()).sum(0).to(tau.dtype)


@dataclasses.dataclass
class FisherMerging:
    """Attributes:
    num_examples: calibration examples per task for each Fisher (the split's size if smaller).
    fisher_floor: the least Fisher value an entry counts with (keeps 0/0 away).
    labels: classifiers: ``expected`` (exact sum over classes) or ``sampled`` (one class per example); causal
        LMs always sample one token per response position.
    """

    name: str
    num_examples: int = 256
    fisher_floor: float = 1e-6
    labels: str = "expected"

    # Reads ``num_examples`` rows of data.calib itself; no training stream.
    calibration_steps = 0

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ConfigError(f"method.num_examples={self.num_examples} must be >= 1 ({self.name!r})")
        if not self.fisher_floor > 0:
            raise ConfigError(f"method.fisher_floor={self.fisher_floor} must be > 0 ({self.name!r})")
        check_choice(self.labels, LABELS, "method.labels", self.name)

    def fishers(self, run: Run) -> dict[str, Tensor]:
        """name -> [K, *shape] diagonal Fishers, expert k on task k's calibration data."""
        pool, data = run.pool, run.data
        merged = merged_model(pool, granularity="task")
        stacks = {
            n: torch.empty(tau.shape, dtype=torch.float32, device=tau.device) for n, tau in pool.task_vectors.items()
        }
        for k, task in enumerate(pool.experts):
            batches = calibration_batches(data.calib[task], self.num_examples, data.batch_size, data.pad_id, data.seed)
            fisher, count = diagonal_fisher(
                merged, task, merged.expert_params(task), batches, pool.task_vectors, self.labels, data.seed + k
            )
            for name, value in fisher.items():
                stacks[name][k] = value.to(stacks[name].device)
            log.info("%s: Fisher of %s (%d examples)", self.name, task, count)
        return stacks

    def merge(self, run: Run) -> MergeResult:
        fishers, base = self.fishers(run), run.pool.base_tensors()
        params = {
            name: base[name] + fisher_merge(tau, fishers.pop(name), self.fisher_floor).to(base[name].dtype)
            for name, tau in run.pool.task_vectors.items()
        }
        options = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        return static_result(self.name, run, params, options)

    def transform(self, run: Run):
        """Row k = F_k tau_k / sum_j F_j: the rows sum (coefficients 1) to the Fisher merge."""
        fishers = self.fishers(run)
        rows = {
            name: (fisher_weights(fishers.pop(name), self.fisher_floor) * tau.float()).to(tau.dtype)
            for name, tau in run.pool.task_vectors.items()
        }
        return dataclasses.replace(run.pool, task_vectors=rows)


register(
    "fisher",
    kind="static",
    description="Fisher merging: per-parameter average weighted by each expert's diagonal Fisher on its own data",
    paper="https://arxiv.org/abs/2111.09832",
    needs=Needs(dense=True, calibration=True, activation_statistics=True),
)(FisherMerging)
