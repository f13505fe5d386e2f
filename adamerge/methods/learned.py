"""Options every learned method shares, and the one training pass they are all made of.

A learned method builds a merged model over the pool (granularity, coefficient init and form, task-vector storage),
fits its coefficient table with the configured objective (``cfg.objective``) and returns it. Its schema is this
dataclass: ``conf/method/<name>.yaml`` sets these fields and nothing else, and ``build_method`` checks them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from adamerge.core.coefficients import GRANULARITIES, PARAMETRIZATIONS
from adamerge.core.factory import merged_model
from adamerge.core.merged import STORAGES
from adamerge.engine.module import BACKWARD_MODES
from adamerge.methods.registry import ConfigError, MergeResult, Run, build_transform, check_choice


def adam(lr: float = 1e-3) -> dict:
    return {"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr, "betas": [0.9, 0.999]}


@dataclass
class LearnedMethod:
    """Coefficients learned on unlabeled calibration data.

    Attributes:
        steps: optimizer steps (one batch of every task each).
        granularity: ``task`` | ``layer`` | ``block`` | ``chunk``: which tensors share a coefficient.
        init: the start: a number, one per expert, or a full [K, G] table.
        parametrization: ``identity`` (clamped to ``clamp`` in the forward) or ``sigmoid``.
        clamp: [low, high] for identity coefficients, or null.
        chunks: chunks per tensor at ``chunk`` granularity.
        block_pattern: regex whose group 1 names a tensor's block (null: layers.N / layer.N / h.N / blocks.N).
        storage: ``resident`` | ``streamed`` (pinned host memory) | ``lowrank`` (truncated SVD, ``rank``/``energy``).
        rank, energy: the low-rank storage's rank cap and kept spectral energy.
        activation_checkpointing: recompute each block in the backward (less memory, slower step).
        compile: ``torch.compile`` the merged forward.
        backward: ``auto`` | ``split`` | ``concat`` | ``joint`` (``adamerge.engine.module``).
        optimizer: a partial ``torch.optim`` constructor (``_target_``, ``_partial_: true``, its kwargs).
        scheduler: a partial LR scheduler, or null.
        transform: a static method whose per-task processed task vectors the coefficients are learned over
            (``ties`` for AdaMerging++, ``doge``, ``tsv_m`` ...): its name (its preset as is) or ``{name: ..., <its
            options>}``; null: the raw task vectors. ``adamerge methods`` says which methods compose.
    """

    name: str
    steps: int = 500
    granularity: str = "layer"
    init: float | list = 0.3
    parametrization: str = "identity"
    clamp: list | None = field(default_factory=lambda: [0.0, 1.0])
    chunks: int = 1
    block_pattern: str | None = None
    storage: str = "resident"
    rank: int | None = None
    energy: float | None = None
    activation_checkpointing: bool = False
    compile: bool = False
    backward: str = "auto"
    optimizer: dict = field(default_factory=adam)
    scheduler: dict | None = None
    transform: str | dict | None = None

    def __post_init__(self) -> None:
        check_choice(self.granularity, GRANULARITIES, "method.granularity", self.name)
        check_choice(self.parametrization, PARAMETRIZATIONS, "method.parametrization", self.name)
        check_choice(self.storage, STORAGES, "method.storage", self.name)
        check_choice(self.backward, BACKWARD_MODES, "method.backward", self.name)
        if self.steps < 1:
            raise ConfigError(f"method.steps must be >= 1, got {self.steps} (method {self.name!r})")
        values = self.init if isinstance(self.init, list) else [self.init]
        flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in flat):
            raise ConfigError(f"method.init must hold finite numbers, got {self.init!r} (method {self.name!r})")
        if self.clamp is not None and (len(self.clamp) != 2 or self.clamp[0] > self.clamp[1]):
            raise ConfigError(f"method.clamp must be [low, high] or null, got {self.clamp!r} (method {self.name!r})")
        if self.transform is not None:
            self.first_pass = build_transform(self.transform, self.name)  # checked now, run in pool_for_learning
        if "_target_" not in self.optimizer:
            raise ConfigError(f"method.optimizer needs a _target_ (e.g. torch.optim.Adam) (method {self.name!r})")

    @property
    def calibration_steps(self) -> int:
        return self.steps

    def options(self) -> dict:
        options = {k: v for k, v in asdict(self).items() if k != "name"}
        if self.transform is not None:  # the record says which options the transform ran with, preset included
            options["transform"] = {k: v for k, v in asdict(self.first_pass).items() if v is not None}
        return options

    def build(self, pool, **overrides):
        """The learnable merged model over ``pool`` with these options (``overrides`` win)."""
        options = dict(
            granularity=self.granularity,
            init=self.init,
            parametrization=self.parametrization,
            clamp=tuple(self.clamp) if self.clamp is not None else None,
            chunks=self.chunks,
            storage=self.storage,
            rank=self.rank,
            energy=self.energy,
            activation_checkpointing=self.activation_checkpointing,
            compile=self.compile,
        )
        if self.block_pattern is not None:
            options["block_pattern"] = self.block_pattern
        return merged_model(pool, **(options | overrides))

    def learn(self, run: Run, merged, steps: int | None = None, quiet: bool = False):
        """One training pass of ``merged``'s coefficients (the engine's ``learn``) with this method's optimizer."""
        from adamerge.engine.train import learn

        experts = None if self.transform is None else merged_model(run.pool, granularity="task")  # the real experts
        return learn(run.cfg, merged, run.data, self, steps=steps, quiet=quiet, experts=experts)

    def result(self, merged, trainer, init) -> MergeResult:
        """The learned merge, with its coefficient table for the record and the plots."""
        from adamerge.core.export import coefficients_record

        record = {"method": self.name, "options": self.options(), **coefficients_record(merged)}
        with torch.no_grad():
            params = merged.merged_tensors()
        return MergeResult(merged, params, record, record["coefficients"], trainer, init)

    def pool_for_learning(self, run: Run):
        """The pool the coefficients are learned over: the task vectors, through ``transform`` when one is set."""
        if self.transform is None:
            return run.pool
        seed = run.cfg.seed if run.cfg is not None else 0  # a preset's ${seed} is the run's (built at 0 for checks)
        return build_transform(self.transform, self.name, seed).transform(run)

    def merge(self, run: Run) -> MergeResult:
        merged = self.build(self.pool_for_learning(run))
        init = merged.coefficients().detach().clone()
        trainer = self.learn(run, merged)
        return self.result(merged, trainer, init)
