"""Per-expert statistics of the calibration data for the data-driven closed-form merges (RegMean, Fisher merging).

One pass over an expert's own calibration set (the papers' setting: expert ``k`` is measured on task ``k``'s data),
run through the pool's merged model with that expert's tensors (``merged(**inputs, task=, params=)``); forward hooks
on the base's ``nn.Linear`` / GPT-2 ``Conv1D`` submodules fire under ``functional_call``.

- **Input Gram matrices** ``G = X^T X`` per linear layer (RegMean). ``X`` holds the rows of the layer's input that
  count: tokens with ``attention_mask`` 1 (padding never counts) and, for a causal LM whose data has a
  ``response_mask`` column, only the positions that predict a response token (``response_mask[t + 1] == 1``: the
  positions whose outputs the LM loss reads). Each batch's product is formed by one fp32 ``addmm_`` into an fp32
  accumulator (what the layer computes in; the solve casts to float64). ``Conv1D`` computes ``x @ W`` with
  ``W [in, out]``: its Gram is the same ``X^T X`` over its input, and the solver reads the weight transposed.
  Layers that read the very same input tensor (query/key/value, gate/up) share one Gram: it is computed once and
  the group's weights are solved together.
- **Diagonal Fisher** per merged parameter (Fisher merging): ``F = mean_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2``
  with ``y`` drawn from the expert's *own* predictive distribution (no labels: the calibration data is unlabeled, and
  the Fisher of the model is defined under its own distribution, not the data's). For classification the expectation
  over the classes is exact (``labels="expected"``, Matena and Raffel's choice for classifiers: C backward passes per
  example); ``labels="sampled"`` draws one class. For a causal LM the vocabulary is too large for the exact sum: one
  token is sampled per response position (teacher forcing on the real prefix) and the sequence's summed
  log-likelihood is differentiated; the positions' samples are independent given the input and each score has mean
  zero, so the squared per-sequence gradient is an unbiased estimate of the sum of the positions' Fishers. Gradients
  are per example (squares of batch gradients would add cross terms between examples).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adamerge.core.coefficients import DEFAULT_BLOCK_PATTERN
from adamerge.engine.datasets import MODEL_INPUTS, collate
from adamerge.objectives.entropy import logits_of

log = logging.getLogger(__name__)

RESPONSE = "response_mask"


@dataclass(frozen=True)
class Site:
    """A linear layer whose weight is merged: the weight's tensor name and whether it is stored ``[in, out]``."""

    weight: str
    transposed: bool


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b``, ``W [in, out]``), told by its class name so
    that this module does not import transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def linear_sites(model: nn.Module, merged_names: Iterable[str]) -> dict[str, Site]:
    """Module name -> Site, for every Linear / Conv1D whose weight is a merged tensor (tied or task-specific weights,
    e.g. a tied ``lm_head`` or a classification head, are not merged tensors and are left out)."""
    names = set(merged_names)
    sites = {}
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if weight in names and (isinstance(module, nn.Linear) or is_conv1d(module)):
            sites[name] = Site(weight, transposed=is_conv1d(module))
    return sites


# ---------------------------------------------------------------------------------------------------- data


def calibration_batches(
    dataset, num_examples: int, batch_size: int, pad_id: int = 0, seed: int = 0
) -> Iterator[dict[str, Tensor]]:
    """The first ``num_examples`` rows of a seeded permutation of ``dataset`` (all rows if it has fewer; a row is
    never used twice), collated ``batch_size`` at a time with their model inputs and ``response_mask``."""
    n = min(num_examples, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    keys = [c for c in dataset.column_names if c in (*MODEL_INPUTS, RESPONSE)]
    for start in range(0, n, batch_size):
        yield collate([dataset[i] for i in order[start : start + batch_size]], keys, pad_id)


def token_mask(batch: Mapping[str, Tensor]) -> Tensor | None:
    """[B, T] bool: the positions whose activations count (attended; for LM data, those that predict a response
    token); ``None`` when every position counts (images)."""
    mask = batch.get("attention_mask")
    if RESPONSE in batch:
        response = torch.zeros_like(batch[RESPONSE], dtype=torch.bool)
        response[:, :-1] = batch[RESPONSE][:, 1:].bool()
        mask = response if mask is None else response & mask.bool()
    return None if mask is None else mask.bool()


def inputs_of(batch: Mapping[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}


# ---------------------------------------------------------------------------------------------------- Grams


class StopForward(Exception):
    """Raised by a hook once the layers of interest have run: the rest of the forward is not needed."""


@dataclass
class GramStatistics:
    """One expert's input Grams: ``grams[group]`` (fp32, [d, d]) summed over ``tokens[group]`` rows; ``members``: the
    modules (in call order) that read that input; ``order``: the groups in the order the forward computes them."""

    grams: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    examples: int = 0


class GramCollector:
    """Forward hooks that add ``X^T X`` of each site's (masked) input into ``stats``; ``stop_after``: the module after
    whose hook the forward is cut short (``StopForward``)."""

    def __init__(self, model: nn.Module, sites: Iterable[str], stop_after: str | None = None):
        self.model, self.sites, self.stop_after = model, list(sites), stop_after
        self.stats = GramStatistics()
        self.group_of: dict[str, str] = {}
        self.mask: Tensor | None = None
        self._last: tuple[Tensor, str] | None = None  # holds the last input alive, so `is` cannot match a new tensor
        self._handles: list = []

    def __enter__(self) -> GramCollector:
        self._handles = [self.model.get_submodule(s).register_forward_hook(self._hook(s)) for s in self.sites]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def start_batch(self, mask: Tensor | None) -> None:
        self.mask, self._last = mask, None

    def rows(self, x: Tensor) -> Tensor:
        """The input's rows that count: [N, d]."""
        if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
            x = x[self.mask]
        return x.reshape(-1, x.shape[-1]).float()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0]
            shared = self._last is not None and self._last[0] is x
            group = self._last[1] if shared else name
            if self.group_of.setdefault(name, group) != group:
                raise RuntimeError(
                    f"{name!r} shared its input with {self.group_of[name]!r} in one batch and not in another; "
                    "the model's forward is not the same from batch to batch"
                )
            if not shared:
                rows = self.rows(x)
                stats = self.stats
                if group not in stats.grams:
                    stats.grams[group] = rows.new_zeros(rows.shape[1], rows.shape[1])
                    stats.tokens[group], stats.members[group] = 0, []
                    stats.order.append(group)
                stats.grams[group].addmm_(rows.T, rows)
                stats.tokens[group] += rows.shape[0]
                self._last = (x, group)
            if name not in self.stats.members[group]:
                self.stats.members[group].append(name)
            if name == self.stop_after:
                raise StopForward

        return hook


@torch.no_grad()
def collect_grams(
    merged, task: str, params, batches: Iterable[Mapping[str, Tensor]], sites: Iterable[str], stop_after=None
) -> GramStatistics:
    """Input Grams of ``sites`` while ``merged`` runs ``params`` (with ``task``'s head) on ``batches``."""
    was_training = merged.training
    merged.eval()
    collector = GramCollector(merged.model, sites, stop_after)
    try:
        with collector:
            for batch in batches:
                mask = token_mask(batch)
                collector.start_batch(None if mask is None else mask.to(merged.device))
                try:
                    merged(**inputs_of(batch, merged.device), task=task, params=params)
                except StopForward:
                    pass
                collector.stats.examples += len(next(iter(batch.values())))
    finally:
        merged.train(was_training)
    return collector.stats


# ---------------------------------------------------------------------------------------------------- Fisher


def diagonal_fisher(
    merged,
    task: str,
    params: Mapping[str, Tensor],
    batches: Iterable[Mapping[str, Tensor]],
    names: Iterable[str],
    labels: str = "expected",
    seed: int = 0,
) -> tuple[dict[str, Tensor], int]:
    """(name -> diagonal Fisher [fp32, the tensor's shape], number of examples) of the model ``params`` (task's head)
    on ``batches``, for the tensors ``names``; labels from the model's own distribution (module docstring)."""
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    full = {**params, **leaves}
    fisher = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in leaves.items()}
    generator = torch.Generator().manual_seed(seed)
    was_training = merged.training
    merged.eval()
    count = 0

    def accumulate(objective: Tensor, weight: Tensor | float, retain: bool) -> None:
        grads = torch.autograd.grad(objective, list(leaves.values()), retain_graph=retain, allow_unused=True)
        for (name, _), grad in zip(leaves.items(), grads):
            if grad is not None:
                fisher[name].add_(grad.float().square() * weight)

    try:
        with torch.enable_grad():
            for batch in batches:
                mask = token_mask(batch)
                for i in range(len(next(iter(batch.values())))):
                    example = {k: v[i : i + 1] for k, v in batch.items()}
                    logits = logits_of(merged(**inputs_of(example, merged.device), task=task, params=full)).float()
                    if logits.dim() == 2:  # classification: [1, C]
                        log_p = torch.log_softmax(logits[0], dim=-1)
                        probs = log_p.detach().exp()
                        if labels == "expected":
                            for y in range(log_p.shape[0]):
                                accumulate(log_p[y], probs[y], retain=y < log_p.shape[0] - 1)
                        else:
                            y = int(torch.multinomial(probs.cpu(), 1, generator=generator))
                            accumulate(log_p[y], 1.0, retain=False)
                    else:  # causal LM: [1, T, V]; the positions that predict the response (or every attended one)
                        where = mask[i] if mask is not None else torch.ones(logits.shape[1], dtype=torch.bool)
                        log_p = torch.log_softmax(logits[0, where.to(logits.device)], dim=-1)  # (P, V)
                        if log_p.shape[0] == 0:
                            continue
                        sampled = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator)
                        accumulate(log_p.gather(1, sampled.to(log_p.device)).sum(), 1.0, retain=False)
                    count += 1
    finally:
        merged.train(was_training)
    if count == 0:
        raise ValueError(f"task {task!r}: no calibration example to compute the Fisher on (method.num_examples)")
    return {n: f / count for n, f in fisher.items()}, count


# ---------------------------------------------------------------------------------------------------- stages

BLOCK = re.compile(DEFAULT_BLOCK_PATTERN)


def stage_of(module: str) -> str:
    """The forward stage a linear layer belongs to: its transformer block (``encoder.layer.3``), else itself."""
    match = BLOCK.match(module + ".")
    return match.group(1) if match else module
