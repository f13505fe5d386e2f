"""Expert Merging++: importance-guided chunking of the layer-wise coefficients.

Expert Merging++ (Zhang et al., ICLR 2026, https://arxiv.org/abs/2509.25712) splits a merged tensor into K contiguous
chunks (flattened row-major order, so a Linear weight is cut into groups of output rows) with one coefficient per
expert each, and gives more chunks to the more important tensors. The paper derives importance from the learned
layer-wise coefficients, the task-vector magnitudes and the parameter counts, but does not publish the formula.
Ours, after a first layer-wise pass with coefficients ``lam[k, t]``:

    I_t = sum_k |lam[k, t]| * rms(tau_k,t) * n_t ** p          (p = ``numel_power``, 0.5 by default)

i.e. the coefficient-weighted size of the update each expert makes to tensor t. With p = 0.5 this is
``sum_k |lam[k, t]| * ||tau_k,t||_F``: at equal per-entry magnitude a tensor with 4x the parameters counts 2x, so
the large matrices earn chunks but the embeddings do not swallow the budget. Tensors smaller than ``min_numel``
(norms, biases) keep one chunk. The eligible tensors share ``round(budget * n_eligible)`` chunks: each gets one,
the rest go in proportion to ``I_t`` (largest remainders, at most ``max_chunks`` each, overflow handed on).
``uniform_chunks`` gives every eligible tensor ``budget`` chunks: the same number of coefficients, spread evenly,
the baseline the allocation is compared with.

The second pass starts where the first stopped: ``chunk_init`` copies each tensor's layer-wise coefficient to all
its chunks, so the chunked model begins at exactly the layer-wise merge (see ``chunked_model``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from adamerge.core.merged import MergedModel
from adamerge.core.pool import ExpertPool

log = logging.getLogger(__name__)


def tensor_coefficients(merged: MergedModel) -> dict[str, Tensor]:
    """Each merged tensor's [K] coefficients; the model must give every tensor one column (task/layer/block)."""
    lam = merged.coefficients().detach()
    out = {}
    for name, cols in zip(merged.names, merged.layout):
        if len(cols) != 1:
            raise ValueError(
                f"tensor {name!r} has {len(cols)} coefficient columns: importance needs the layer-wise pass "
                "(granularity layer, block or task), not a chunked model"
            )
        out[name] = lam[:, cols[0]]
    return out


def importance_scores(merged: MergedModel, numel_power: float = 0.5) -> dict[str, float]:
    """I_t = sum_k |lam[k, t]| * rms(tau_k,t) * numel_t ** numel_power, per merged tensor (module docstring)."""
    lam = tensor_coefficients(merged)
    task_vectors = dict(merged.task_vectors.items())
    if set(task_vectors) != set(merged.names):
        raise ValueError(
            "importance-guided chunking needs every task vector dense; set method.storage=resident or streamed"
        )
    scores = {}
    for name, tau in task_vectors.items():
        flat = tau.reshape(tau.shape[0], -1).float()  # (K, n)
        rms = flat.pow(2).mean(1).sqrt()  # (K,)
        scores[name] = float((lam[name].abs().to(rms.device) * rms).sum() * flat.shape[1] ** numel_power)
    return scores


def allocate_chunks(
    scores: Mapping[str, float],
    numel: Mapping[str, int],
    budget: float = 4.0,
    max_chunks: int = 16,
    min_numel: int = 1024,
) -> dict[str, int]:
    """Chunk counts: eligible tensors (numel >= min_numel) share round(budget * n_eligible) chunks by score."""
    check_budget(budget, max_chunks)
    chunks = {name: 1 for name in numel}
    eligible = [n for n in numel if numel[n] >= min_numel]
    cap = {n: min(max_chunks, numel[n]) for n in eligible}
    extra = min(round(budget * len(eligible)) - len(eligible), sum(cap[n] - 1 for n in eligible))
    open_ = [n for n in eligible if cap[n] > 1]
    while extra > 0 and open_:
        total = sum(max(scores[n], 0.0) for n in open_)
        share = {n: extra * (max(scores[n], 0.0) / total if total > 0 else 1 / len(open_)) for n in open_}
        room = {n: cap[n] - chunks[n] for n in open_}
        give = {n: min(math.floor(share[n]), room[n]) for n in open_}
        left = extra - sum(give.values())
        # largest remainders first (ties: the larger score, then name order, so the result is deterministic)
        for n in sorted(open_, key=lambda n: (-(share[n] - math.floor(share[n])), -scores[n], n)):
            if left == 0:
                break
            if give[n] < room[n]:
                give[n] += 1
                left -= 1
        for n in open_:
            chunks[n] += give[n]
        extra -= sum(give.values())
        open_ = [n for n in open_ if chunks[n] < cap[n]]
        if not any(give.values()):
            break
    return chunks


def uniform_chunks(
    numel: Mapping[str, int], budget: float = 4.0, max_chunks: int = 16, min_numel: int = 1024
) -> dict[str, int]:
    """The baseline: every eligible tensor gets ``budget`` chunks (same eligibility as ``allocate_chunks``)."""
    check_budget(budget, max_chunks)
    return {n: min(round(budget), max_chunks, size) if size >= min_numel else 1 for n, size in numel.items()}


def check_budget(budget: float, max_chunks: int) -> None:
    if budget < 1 or max_chunks < 1:
        raise ValueError(
            f"chunk budget {budget} and max_chunks {max_chunks} must be >= 1 (config keys: "
            "method.chunking.budget, method.chunking.max_chunks)"
        )


def numels(merged: MergedModel) -> dict[str, int]:
    return {name: tau[0].numel() for name, tau in merged.task_vectors.items()}


class ImportanceChunking:
    """``allocate(layerwise_model) -> {tensor: chunks}`` by importance (config ``method.chunking.allocate``).

    Args:
        budget: mean chunks per eligible tensor (total coefficients ~ budget x eligible tensors x experts).
        max_chunks: most chunks for one tensor.
        min_numel: tensors with fewer parameters keep one chunk.
        numel_power: exponent p of the parameter count in the importance score.
        uniform: give every eligible tensor ``budget`` chunks instead (the baseline).
    """

    def __init__(
        self,
        budget: float = 4.0,
        max_chunks: int = 16,
        min_numel: int = 1024,
        numel_power: float = 0.5,
        uniform: bool = False,
    ):
        check_budget(budget, max_chunks)
        self.budget, self.max_chunks, self.min_numel = budget, max_chunks, min_numel
        self.numel_power, self.uniform = numel_power, uniform

    def __call__(self, merged: MergedModel) -> dict[str, int]:
        sizes = numels(merged)
        if self.uniform:
            chunks = uniform_chunks(sizes, self.budget, self.max_chunks, self.min_numel)
        else:
            scores = importance_scores(merged, self.numel_power)
            chunks = allocate_chunks(scores, sizes, self.budget, self.max_chunks, self.min_numel)
        log.info("chunking: %d tensors, %d coefficient columns", len(chunks), sum(chunks.values()))
        return chunks


def chunk_init(merged: MergedModel, chunks: Mapping[str, int]) -> Tensor:
    """The [K, G] coefficient table of a chunked model that starts at ``merged``'s (layer-wise) merge."""
    lam = tensor_coefficients(merged)
    return torch.cat([lam[name][:, None].expand(-1, chunks.get(name, 1)) for name in merged.names], 1).cpu()


def chunked_model(merged: MergedModel, pool: ExpertPool, chunks: Mapping[str, int], **kwargs) -> MergedModel:
    """The second pass's model: granularity ``chunk`` with ``chunks``, initialised from the first pass.

    ``kwargs`` go to ``MergedModel``; parametrization, clamp and storage default to the first pass's.
    """
    kwargs.setdefault("parametrization", merged.coefficients.parametrization)
    kwargs.setdefault("clamp", merged.coefficients.clamp)
    kwargs.setdefault("storage", merged.storage)
    init = chunk_init(merged, chunks)
    if kwargs.get("parametrization") == "sigmoid":
        init = init.clamp(1e-6, 1 - 1e-6)  # a coefficient that saturated in float32 must stay inside (0, 1)
    return MergedModel(pool, granularity="chunk", init=init, chunks=dict(chunks), **kwargs)
