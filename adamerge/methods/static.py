"""Static (training-free) merges and task-vector transforms applied to a whole pool, tensor by tensor."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.kernels import get_merge, get_transform
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result
from adamerge.progress import progress

log = logging.getLogger(__name__)


def static_merge(pool: ExpertPool, method: str, seed: int = 0, **kwargs) -> dict[str, Tensor]:
    """theta_0 + merge(tau) for every merged tensor; ``kwargs`` go to the kernel (e.g. ``weights``, ``density``)."""
    merge = get_merge(method)
    kwargs = with_generator(method, seed, kwargs)
    base = pool.base_tensors()
    tensors = progress(pool.task_vectors.items(), method, log, unit="tensor", total=len(pool.task_vectors))
    return {name: base[name] + merge(tau, **kwargs).to(base[name].dtype) for name, tau in tensors}


def transform_pool(pool: ExpertPool, transform: str, seed: int = 0, **kwargs) -> ExpertPool:
    """A pool whose task vectors went through a per-tensor kernel (e.g. TIES-processed for AdaMerging++)."""
    if transform == "none":
        return pool
    fn = get_transform(transform)
    kwargs = with_generator(transform, seed, kwargs)
    return dataclasses.replace(pool, task_vectors={n: fn(tau, **kwargs) for n, tau in pool.task_vectors.items()})


def with_generator(method: str, seed: int, kwargs: dict) -> dict:
    """DARE draws random masks: give it a seeded generator so a merge is reproducible."""
    if method.startswith("dare"):
        return {**kwargs, "generator": torch.Generator().manual_seed(seed)}
    return kwargs


# --------------------------------------------------------------------------------------------------- methods

# Which options each member of the family reads; anything else set in its config is a mistake.
FAMILY_OPTIONS = {
    "average": (),
    "task_arithmetic": ("weights",),
    "ties": ("weights", "density"),
    "dare": ("weights", "drop_rate", "seed"),
}


@dataclasses.dataclass
class TaskArithmeticFamily:
    """Training-free merges over the task vectors, one kernel per name (``adamerge.methods.kernels``).

    Attributes:
        weights: lam, one scaling for all experts (task arithmetic, TIES, DARE).
        density: fraction of each task vector TIES keeps, in (0, 1].
        drop_rate: fraction DARE drops, in [0, 1).
        seed: DARE's random masks.
    """

    name: str
    weights: float | None = None
    density: float | None = None
    drop_rate: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        allowed = FAMILY_OPTIONS[self.name]
        for key in ("weights", "density", "drop_rate", "seed"):
            value = getattr(self, key)
            if value is None and key in allowed and key != "seed":
                raise ConfigError(f"method.{key} must be set for {self.name!r} (conf/method/{self.name}.yaml)")
            if value is not None and key not in allowed:
                raise ConfigError(f"method.{key} does not apply to {self.name!r}; it reads only {list(allowed)}")
        ranges = {"density": (lambda v: 0 < v <= 1, "in (0, 1]"), "drop_rate": (lambda v: 0 <= v < 1, "in [0, 1)")}
        for key, (ok, where) in ranges.items():
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise ConfigError(f"method.{key}={value!r} must be {where} (method {self.name!r})")

    calibration_steps = 0

    def kernel_options(self) -> dict:
        return {k: getattr(self, k) for k in FAMILY_OPTIONS[self.name] if getattr(self, k) is not None}

    def transform(self, run: Run) -> ExpertPool:
        """Per-task processed task vectors for a learner: TIES-trimmed with elected signs, DARE-dropped, or as they
        are (average, task arithmetic: learning over them is learning over the raw task vectors)."""
        if self.name == "ties":
            return transform_pool(run.pool, "ties", density=self.density)
        if self.name == "dare":
            return transform_pool(run.pool, "dare", seed=self.seed or 0, drop_rate=self.drop_rate)
        return run.pool

    def tensor_merge(self):
        """The per-tensor merge for out-of-core merging (``adamerge merge-files``): (name, tau) -> delta. DARE's masks
        come from one seeded generator, drawn in the order the tensors are merged."""
        merge = get_merge(self.name)
        kwargs = with_generator(self.name, self.seed or 0, self.kernel_options())
        kwargs.pop("seed", None)
        return lambda name, tau: merge(tau, **kwargs)

    def merge(self, run: Run) -> MergeResult:
        options = self.kernel_options()
        return static_result(self.name, run, static_merge(run.pool, self.name, **options), options)


register(
    "average",
    kind="static",
    description="Weight averaging: theta_0 + mean_k tau_k",
    paper="https://arxiv.org/abs/2203.05482",
    needs=Needs(dense=True),
)(TaskArithmeticFamily)
register(
    "task_arithmetic",
    kind="static",
    description="Task arithmetic: theta_0 + lam * sum_k tau_k",
    paper="https://arxiv.org/abs/2212.04089",
    needs=Needs(dense=True),
)(TaskArithmeticFamily)
register(
    "ties",
    kind="static",
    description="TIES: trim each task vector to its top entries, elect signs, disjoint mean",
    paper="https://arxiv.org/abs/2306.01708",
    needs=Needs(dense=True),
)(TaskArithmeticFamily)
register(
    "dare",
    kind="static",
    description="DARE: drop a fraction of each task vector, rescale the rest, then task arithmetic",
    paper="https://arxiv.org/abs/2311.03099",
    needs=Needs(dense=True),
    random_masks=True,
)(TaskArithmeticFamily)
