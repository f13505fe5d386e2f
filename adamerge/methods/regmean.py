"""RegMean and RegMean++: merge each linear layer by the regression that keeps its outputs on every task's inputs.

RegMean: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849. For a linear layer with input Grams ``G_k = X_k^T X_k`` (expert ``k`` on its own
task's calibration data, ``adamerge.methods.statistics``) the merge minimises ``sum_k ||X_k W^T - X_k W_k^T||^2``:

    W*^T = (sum_k G~_k)^-1 sum_k G~_k W_k^T,     G~_k = alpha G_k + (1 - alpha) diag(G_k)

(``alpha`` = ``reduce_non_diagonal_ratio`` scales the off-diagonal entries). Written on task vectors it is the same
solve, ``delta^T = (sum_k G~_k)^-1 sum_k G~_k tau_k^T``, since the base term cancels exactly. Every other merged
tensor (embeddings, norms, biases) is plainly averaged, as in the paper: ``delta = mean_k tau_k``.

RegMean++: "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging",
https://arxiv.org/abs/2508.03121. The layers are merged in forward order, and the inputs of layer ``l`` are computed
by the *merged* model's layers before ``l`` (expert ``k`` runs only from layer ``l`` on, on task ``k``'s data), so
each layer's regression sees the inputs the merged model will actually feed it. A stage is a transformer block (the
linear layers inside a block read their expert's own block, as in FusionBench's ``regmean_plusplus``) or a linear
layer outside the blocks (pooler, ``lm_head``). Here each stage re-runs the merged prefix and stops right after the
stage's last linear layer (``StopForward``), rather than caching every calibration example's hidden states per
expert: no per-family code, and peak memory is one stage's Grams for K experts plus one batch's activations, at the
price of O(L^2) block forwards instead of O(L).

Numerics and choices:

- Grams are accumulated in fp32; the solve is in float64 by Cholesky, with a condition-number estimate (power
  iterations on the sum and, through the Cholesky factor, on its inverse). A sum of Grams that is singular or has
  condition number above ``MAX_CONDITION`` fails with the count of calibration rows behind it and the config keys to
  change; no jitter is added.
- ``normalize_grams`` (default true): each expert's Gram is divided by its number of rows (tokens) before the sum,
  as in the authors' code and FusionBench, so a task with longer sequences does not outweigh the others; false is
  the paper's equation taken literally (sums). With equal token counts the two agree.
- Definitional differences with FusionBench (``scripts/regmean_peer_check.py``): FusionBench's hooks count padding
  tokens (no attention mask) and invert in fp32 with ``torch.inverse``; here padding never counts (it is not data of
  the task: the paper's ``X_k`` are the layer's inputs on the task's examples) and the solve is float64. Given the
  same Grams, the merges agree to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from adamerge.core.factory import merged_model
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result
from adamerge.methods.statistics import (
    GramStatistics,
    Site,
    calibration_batches,
    collect_grams,
    linear_sites,
    stage_of,
)

log = logging.getLogger(__name__)

MAX_CONDITION = 1e12  # float64 keeps ~4 significant digits of the solve at this condition number
SOLVE_BUDGET_BYTES = 256 * 1024**2  # float64 Grams per batched solve call


class IllConditionedGram(ValueError):
    """A sum of Grams that cannot be solved: ``index`` (in the batch) and its condition-number estimate."""

    def __init__(self, index: int, condition: float):
        super().__init__(f"sum of Grams {index} is singular or ill-conditioned (condition number ~{condition:.2g})")
        self.index, self.condition = index, condition


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``alpha G + (1 - alpha) diag(G)``: off-diagonal entries scaled by ``alpha``, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def condition_estimate(a: Tensor, chol: Tensor, iters: int = 30) -> Tensor:
    """lambda_max / lambda_min of symmetric positive definite ``a`` [..., d, d] by power iteration on ``a`` and on its
    inverse (through the Cholesky factor ``chol``): a lower bound that is tight after a few dozen iterations."""
    start = torch.randn(*a.shape[:-1], 1, dtype=a.dtype, generator=torch.Generator().manual_seed(0)).to(a.device)
    top, bottom = start.clone(), start.clone()
    for _ in range(iters):
        top = a @ top
        top = top / top.norm(dim=-2, keepdim=True)
        bottom = torch.cholesky_solve(bottom, chol)
        bottom = bottom / bottom.norm(dim=-2, keepdim=True)
    rayleigh = lambda v: (v.transpose(-1, -2) @ a @ v)[..., 0, 0]  # noqa: E731
    return rayleigh(top) / rayleigh(bottom)


def regmean(grams: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """The RegMean delta of linear layers: ``((sum_k G~_k)^-1 sum_k G~_k tau_k^T)^T``.

    Args:
        grams: [..., K, d, d] input Grams (``d`` = the layer's input dimension).
        tau: [..., K, out, d] task vectors in ``nn.Linear`` layout (input dimension last).
        alpha: off-diagonal scaling (``reduce_non_diagonal_ratio``), in [0, 1].

    Returns [..., out, d] in ``tau``'s dtype, solved in float64; raises ``IllConditionedGram``.
    """
    if grams.shape[-1] != tau.shape[-1] or grams.shape[:-2] != tau.shape[:-2]:
        raise ValueError(f"Grams {tuple(grams.shape)} do not match task vectors {tuple(tau.shape)}")
    reduced = reduce_off_diagonal(grams.double(), alpha)
    system = reduced.sum(-3)  # (..., d, d)
    rhs = (reduced @ tau.double().transpose(-1, -2)).sum(-3)  # (..., d, out)
    chol, info = torch.linalg.cholesky_ex(system)
    flat_info = info.reshape(-1)
    if bool((flat_info > 0).any()):
        raise IllConditionedGram(int(flat_info.nonzero()[0]), math.inf)
    condition = condition_estimate(system, chol).reshape(-1)
    if bool((condition > MAX_CONDITION).any()):
        worst = int(condition.argmax())
        raise IllConditionedGram(worst, float(condition[worst]))
    return torch.cholesky_solve(rhs, chol).transpose(-1, -2).to(tau.dtype)


# ---------------------------------------------------------------------------------------------------- solving


def group_tau(task_vectors: Mapping[str, Tensor], sites: Mapping[str, Site], members: Sequence[str]) -> Tensor:
    """[K, sum of outs, d]: the weights of the layers that share one input, in ``nn.Linear`` layout, stacked."""
    parts = []
    for module in members:
        tau = task_vectors[sites[module].weight]
        parts.append(tau.transpose(-1, -2) if sites[module].transposed else tau)
    return torch.cat(parts, dim=1)


def split_delta(delta: Tensor, sites: Mapping[str, Site], members: Sequence[str], task_vectors) -> dict[str, Tensor]:
    """Inverse of ``group_tau`` for one merged [sum of outs, d] delta: weight name -> delta in its stored layout."""
    out, start = {}, 0
    for module in members:
        site = sites[module]
        rows = task_vectors[site.weight].shape[-1 if site.transposed else -2]
        piece = delta[start : start + rows]
        out[site.weight] = piece.T.contiguous() if site.transposed else piece
        start += rows
    return out


def solve_groups(
    task_vectors: Mapping[str, Tensor],
    sites: Mapping[str, Site],
    stats: Sequence[GramStatistics],
    groups: Sequence[str],
    alpha: float,
    normalize: bool,
    explain,
) -> dict[str, Tensor]:
    """Merged deltas of the weights of ``groups``, solved batched over groups of equal shape; each group's Grams are
    freed from ``stats`` once solved. ``explain(group, condition)`` builds the error for an unsolvable group."""
    members = stats[0].members
    buckets: dict[tuple, list[str]] = {}
    for group in groups:
        d = stats[0].grams[group].shape[0]
        outs = group_tau(task_vectors, sites, members[group]).shape[1]
        buckets.setdefault((d, outs), []).append(group)
    deltas = {}
    for (d, _), bucket in buckets.items():
        per_call = max(1, SOLVE_BUDGET_BYTES // (len(stats) * d * d * 8))
        for first in range(0, len(bucket), per_call):
            chunk = bucket[first : first + per_call]
            grams = torch.stack(
                [torch.stack([s.grams[g] / (s.tokens[g] if normalize else 1) for s in stats]) for g in chunk]
            )  # (G, K, d, d)
            tau = torch.stack([group_tau(task_vectors, sites, members[g]) for g in chunk])  # (G, K, out, d)
            try:
                merged = regmean(grams.to(tau.device), tau, alpha)
            except IllConditionedGram as err:
                raise explain(chunk[err.index], err.condition) from None
            for group, delta in zip(chunk, merged):
                deltas |= split_delta(delta, sites, members[group], task_vectors)
                for s in stats:
                    del s.grams[group]
    return deltas


# ---------------------------------------------------------------------------------------------------- the method


@dataclasses.dataclass
class RegMean:
    """RegMean (``regmean``) and RegMean++ (``regmean_pp``): one class, the stage-wise inputs are the difference.

    Attributes:
        reduce_non_diagonal_ratio: alpha, the scaling of each Gram's off-diagonal entries, in [0, 1].
        num_examples: calibration examples per task whose activations make the Grams (the split's size if smaller).
        normalize_grams: divide each expert's Gram by its token count (authors' code); false: plain sums (paper's Eq.).
    """

    name: str
    reduce_non_diagonal_ratio: float = 0.9
    num_examples: int = 1000
    normalize_grams: bool = True

    # These methods read ``num_examples`` rows of data.calib themselves; no training stream.
    calibration_steps = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.reduce_non_diagonal_ratio <= 1.0:
            raise ConfigError(
                f"method.reduce_non_diagonal_ratio={self.reduce_non_diagonal_ratio} must be in [0, 1] ({self.name!r})"
            )
        if self.num_examples < 1:
            raise ConfigError(f"method.num_examples={self.num_examples} must be >= 1 ({self.name!r})")

    def options(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def batches(self, run: Run, task: str):
        data = run.data
        return calibration_batches(data.calib[task], self.num_examples, data.batch_size, data.pad_id, data.seed)

    def explainer(self, run: Run, stats: Sequence[GramStatistics]):
        def explain(group: str, condition: float) -> ValueError:
            d = stats[0].grams[group].shape[0]
            tokens = [s.tokens[group] for s in stats]
            per_example = max(1.0, sum(tokens) / max(1, sum(s.examples for s in stats)))
            need = math.ceil(d / (len(stats) * per_example))
            sizes = {t: len(run.data.calib[t]) for t in run.pool.experts}
            why = (
                f"its {len(stats)} experts saw {sum(tokens)} calibration rows (tokens) in all, fewer than the input "
                f"dimension {d}, so the sum of their Grams has rank < {d}: give at least {need} examples per task "
                f"(method.num_examples={self.num_examples}; the calibration splits hold {sizes})"
                if sum(tokens) < d
                else f"its input has features that are (near) zero or collinear on every task's calibration data "
                f"({sum(tokens)} rows for dimension {d}): add calibration data (method.num_examples)"
            )
            return ValueError(
                f"{self.name}: the Gram of layer(s) {stats[0].members[group]} is singular or ill-conditioned "
                f"(condition number ~{condition:.2g}, limit {MAX_CONDITION:.0e}): {why}, or lower "
                f"method.reduce_non_diagonal_ratio (now {self.reduce_non_diagonal_ratio}; below 1 it keeps the "
                "diagonal, which only dead input features leave singular)"
            )

        return explain

    def deltas(self, run: Run) -> dict[str, Tensor]:
        """The merged delta of every merged tensor (RegMean on the linear weights, the mean elsewhere)."""
        pool = run.pool
        sites = linear_sites(pool.model, pool.task_vectors)
        if not sites:
            raise ConfigError(
                f"{self.name}: no nn.Linear / Conv1D weight among the merged tensors; check experts.include/exclude"
            )
        deltas = {name: tau.mean(0) for name, tau in pool.task_vectors.items()}
        merged = merged_model(pool, granularity="task")
        if self.name == "regmean_pp":
            return self.stagewise(run, merged, sites, deltas)
        stats = []
        for task in pool.experts:
            stats.append(collect_grams(merged, task, merged.expert_params(task), self.batches(run, task), sites))
            log.info("%s: Grams of %s (%d examples)", self.name, task, stats[-1].examples)
        check_same_layout(stats)
        solved = solve_groups(
            pool.task_vectors, sites, stats, stats[0].order, self.reduce_non_diagonal_ratio, self.normalize_grams,
            self.explainer(run, stats),
        )  # fmt: skip
        return deltas | solved

    def stagewise(self, run: Run, merged, sites, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        """RegMean++: stages in forward order; stage s's Grams from the merged stages before it."""
        pool = run.pool
        base = pool.base_tensors()
        first = pool.experts[0]
        probe = collect_grams(merged, first, merged.expert_params(first), [next(iter(self.batches(run, first)))], sites)
        call_order = [m for g in probe.order for m in probe.members[g]]
        stages = list(dict.fromkeys(stage_of(m) for m in call_order))
        owner = {name: next((s for s in stages if name.startswith(s + ".")), None) for name in pool.task_vectors}
        for stage in stages:
            modules = [m for m in call_order if stage_of(m) == stage]
            names = [n for n, s in owner.items() if s == stage]
            current = {n: base[n] + deltas[n].to(base[n].dtype) for n in pool.task_vectors}
            stats = []
            for k, task in enumerate(pool.experts):
                params = current | {n: base[n] + pool.task_vectors[n][k].to(base[n].dtype) for n in names}
                stats.append(collect_grams(merged, task, params, self.batches(run, task), modules, modules[-1]))
            check_same_layout(stats)
            deltas |= solve_groups(
                pool.task_vectors, sites, stats, stats[0].order, self.reduce_non_diagonal_ratio, self.normalize_grams,
                self.explainer(run, stats),
            )  # fmt: skip
            log.info("%s: stage %s merged (%d linear layers)", self.name, stage, len(modules))
        return deltas

    def transform(self, run: Run):
        """For a learner: every row is the merged delta / K (RegMean defines no per-task part), so coefficients of 1
        give this merge."""
        k = run.pool.num_experts
        rows = {n: (d / k).unsqueeze(0).expand(k, *d.shape).contiguous() for n, d in self.deltas(run).items()}
        return dataclasses.replace(run.pool, task_vectors=rows)

    def merge(self, run: Run) -> MergeResult:
        base = run.pool.base_tensors()
        params = {n: base[n] + d.to(base[n].dtype) for n, d in self.deltas(run).items()}
        return static_result(self.name, run, params, self.options())


def check_same_layout(stats: Sequence[GramStatistics]) -> None:
    """Every expert's forward grouped the same layers (same architecture): the solve pairs their Grams by group."""
    for s in stats[1:]:
        if s.members != stats[0].members:
            raise RuntimeError("the experts' forwards reached different linear layers; they must share the base")


NEEDS = Needs(dense=True, calibration=True, activation_statistics=True)
register(
    "regmean",
    kind="static",
    description="RegMean: per linear layer, the least-squares weight that keeps every task's outputs (input Grams)",
    paper="https://arxiv.org/abs/2212.09849",
    needs=NEEDS,
)(RegMean)
register(
    "regmean_pp",
    kind="static",
    description="RegMean++: RegMean layer by layer, each layer's inputs computed by the merged earlier layers",
    paper="https://arxiv.org/abs/2508.03121",
    needs=NEEDS,
)(RegMean)
