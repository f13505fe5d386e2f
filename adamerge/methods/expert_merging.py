"""Expert Merging (Zhang et al., ICLR 2026, https://arxiv.org/abs/2509.25712): layer-wise coefficients learned by
aligning the merged model's logits and hidden states with each expert's on a few unlabeled samples per task
(``objective=expert_alignment``, ``adamerge.objectives.alignment``).

Expert Merging++ owns two passes: a layer-wise pass, then chunk-wise coefficients (each tensor cut into contiguous
chunks, their number allocated by importance: ``adamerge.methods.chunking``), initialised from the first pass's
merge and trained again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.utils import instantiate

from adamerge.methods.chunking import chunked_model
from adamerge.methods.learned import LearnedMethod
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register

PAPER = "https://arxiv.org/abs/2509.25712"


@dataclass
class ExpertMerging(LearnedMethod):
    pass


register(
    "expert_merging",
    kind="learned",
    description="Expert Merging: layer-wise coefficients aligning the merge with each expert's logits and hidden states",
    paper=PAPER,
    needs=Needs(calibration=True, expert_outputs=True),
)(ExpertMerging)


def importance_chunking() -> dict:
    return {"layer_steps": None, "allocate": {"_target_": "adamerge.methods.chunking.ImportanceChunking"}}


@dataclass
class ExpertMergingPP(ExpertMerging):
    """Attributes (besides ``LearnedMethod``'s; ``granularity`` must be ``chunk``):
    chunking: ``layer_steps`` (steps of the layer-wise first pass; null: ``steps``) and ``allocate`` (a callable
        layer-wise model -> {tensor: chunks}, e.g. ``ImportanceChunking``).
    """

    chunking: dict = field(default_factory=importance_chunking)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity != "chunk":
            raise ConfigError(f"method.granularity must be chunk for {self.name!r}, got {self.granularity!r}")
        unknown = set(self.chunking) - {"layer_steps", "allocate"}
        if unknown:
            raise ConfigError(f"method.chunking.{sorted(unknown)[0]} is not an option; use layer_steps, allocate")

    def merge(self, run: Run) -> MergeResult:
        layer_steps = self.chunking["layer_steps"] or self.steps
        pool = self.pool_for_learning(run)
        first = self.build(pool, granularity="layer", chunks=1)
        self.learn(run, first, steps=layer_steps, quiet=True)
        merged = chunked_model(first, pool, instantiate(self.chunking["allocate"])(first))
        init = merged.coefficients().detach().clone()  # the second pass starts at the layer-wise merge
        trainer = self.learn(run, merged)
        return self.result(merged, trainer, init)


register(
    "expert_merging_pp",
    kind="learned",
    description="Expert Merging++: a layer-wise pass, then chunk-wise coefficients allocated by importance",
    paper=PAPER,
    needs=Needs(dense=True, calibration=True, expert_outputs=True, first_pass="layer-wise Expert Merging"),
)(ExpertMergingPP)
