"""Subspace merges: TSV-M, Iso-C and Iso-CTS, from the singular vectors of the task vectors of each matrix.

- TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.
  https://arxiv.org/abs/2412.00081
- Iso-C, Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
  Subspaces", ICML 2025. https://arxiv.org/abs/2502.04959

For a 2-D parameter with task-vector stack ``tau [K, m, n]`` (``r = min(m, n)``):

- **TSV-M**: each task keeps its top ``k = floor(r / K)`` singular triplets ``U_k S_k V_k^T``; the concatenations
  ``U = [U_1 .. U_K]`` and ``V = [V_1 .. V_K]`` are decorrelated by replacing each with its nearest orthonormal
  matrix (the polar factor ``P Q^T`` of ``U = P S Q^T``: the Procrustes solution the paper uses), and the merge is
  ``alpha * U_perp diag(S_1 .. S_K) V_perp^T`` (``alpha`` = 1, the paper's main results). ``k`` is at least 1 (the
  paper's ``floor`` gives 0, an all-zero merge, when ``r < K``).
- **Iso-C**: ``alpha * mean(s) U V^T`` where ``U diag(s) V^T = sum_k tau_k``: the summed task matrix with its
  spectrum flattened to its mean, so no direction dominates.
- **Iso-CTS**: the top ``c`` directions of the sum (the common subspace, ``c ~ common_fraction * r``) plus, per
  task, the top ``(r - c) / K`` directions of ``tau_k`` projected off the common left subspace; the concatenated
  bases are orthonormalised as in TSV-M and all ``r`` singular values replaced by their mean, times ``alpha``.
  ``c`` is rounded so that ``(r - c)`` splits evenly over the tasks; ``common_fraction = 1`` is Iso-C.

Other tensors (biases, norms: not 2-D) are averaged, ``alpha * mean_k tau_k``, as in both papers' code.

Low-rank task vectors (``spectrum``, a documented deviation; default ``full``, the paper). The Iso papers flatten all
``r`` singular values, which assumes full-rank task vectors. K LoRA experts of rank ``q`` sum to rank ``K q``, often
far below ``r`` (3 x 8 of 576 on SmolLM2's attention): the ``r - K q`` null directions are arbitrary vectors from the
SVD, and flattening gives them the mean's weight while the real directions shrink about ``r / (K q)``-fold, so the
merge falls to the base (README, causal-LM table). ``spectrum="nonzero"`` keeps only directions whose singular value is
above the numerical-rank tolerance ``eps * max(m, n) * s_max`` of the solve dtype (on SmolLM2's fp32 LoRA task
vectors it keeps exactly the 24); on full-rank task vectors it is the paper's merge.

Defaults: TSV-M ``alpha = 1``. Iso-C/Iso-CTS tune ``alpha`` per model: the authors' code (danielm1405/iso-merging,
``src/eval/eval.py``) sweeps 0.1, 0.2, ..., 3.0 on held-out validation splits and keeps the best average accuracy.
The presets hold the CLIP ViT-B/32, 8-task values (Iso-C 1.3, Iso-CTS 1.5, as run in the RegMean++ authors'
``experiments/main_results.sh``; B/16 1.4/1.6, L/14 1.5/1.9) and ``common_fraction = 0.8`` (the authors'
``config/method/iso_cts.yaml``, also FusionBench's default). On other models, tune ``alpha``: on two tiny causal-LM
experts 1.3 is below the base, 0.5 keeps two thirds of the experts' gain.

Per-task form (``transform``, for learners): TSV-M's row k is ``alpha * U_perp[:, block k] S_k V_perp[:, block k]^T``
(``alpha * tau_k / K`` for other tensors), whose sum is the merge. Iso-C and Iso-CTS define only a merged matrix:
every row is ``delta / K``.

Speed: the SVDs of all matrices of one shape run as one batched ``torch.linalg.svd`` on a ``[B, K, m, n]`` stack,
and a wide matrix is decomposed through its transpose (``A^T = V S U^T``), which LAPACK does 1.8x faster on CPU (MiniLM's
384 x 1536 MLP matrices: 1.8 s instead of 3.2 s for a [6, 4] batch).
``lowrank_min_dim`` switches the per-task truncated SVDs (TSV-M, Iso-CTS's task-specific part) of matrices with
``min(m, n) >= lowrank_min_dim`` to ``torch.svd_lowrank`` (``q = k + 10`` columns, 4 power iterations, a fixed
seed). Its rank-``k`` error is ``||A - A_k'|| <= C^{1/9} sigma_{k+1}`` in expectation, ``C = 1 + sqrt(k / 9) +
e sqrt(k + 10) / 10 * sqrt(r - k)`` (Halko, Martinsson and Tropp 2011, Cor. 10.10), i.e. near-exact when the
spectrum decays past ``k``; ``None`` (default) is exact everywhere, cheap at the sizes of encoders like MiniLM.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result

log = logging.getLogger(__name__)

__all__ = [
    "is_matrix",
    "iso_c",
    "iso_cts",
    "iso_cts_ranks",
    "map_matrices",
    "spanned",
    "orthonormalize",
    "top_svd",
    "tsv_components",
    "tsv_factors",
    "tsv_m",
    "tsv_rank",
]

OVERSAMPLE = 10
POWER_ITERS = 4
MAX_GROUP_ELEMENTS = 2**27
"""Most task-vector entries stacked into one batched SVD (512 MiB in fp32): bounds memory, not speed."""


# --------------------------------------------------------------------------------------------------- kernels


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVDs run in float32 (float64 stays): LAPACK has no half-precision SVD."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_matrix(tau: Tensor, matrix: bool | None) -> bool:
    """Whether a stack holds 2-D parameters: ``[K, m, n]`` by default; ``matrix=True`` for a batch ``[B, K, m, n]``."""
    return tau.dim() == 3 if matrix is None else matrix


def top_svd(a: Tensor, k: int, lowrank_min_dim: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` singular triplets of a matrix stack ``a [*, m, n]``: ``u [*, m, k]``, ``s [*, k]``, ``vh [*, k, n]``.

    Exact (batched LAPACK) unless ``min(m, n) >= lowrank_min_dim`` and ``k`` is small enough for a randomized SVD to
    pay off; see the module docstring for its error.
    """
    r = min(a.shape[-2:])
    q = k + OVERSAMPLE
    if lowrank_min_dim is not None and r >= lowrank_min_dim and 2 * q <= r:
        with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(a, q=q, niter=POWER_ITERS)
        return u[..., :k], s[..., :k], v[..., :k].mT
    u, s, vh = svd(a)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``a [*, m, n]``; a wide matrix through its (tall) transpose, which LAPACK's CPU path does faster."""
    if a.shape[-2] >= a.shape[-1]:
        return torch.linalg.svd(a, full_matrices=False)
    v, s, uh = torch.linalg.svd(a.mT, full_matrices=False)
    return uh.mT, s, v.mT


def orthonormalize(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to ``a [*, m, r]`` in Frobenius norm: ``P Q^T`` of ``a = P S Q^T``."""
    p, _, qh = svd(a)
    return p @ qh


def tsv_rank(num_tasks: int, m: int, n: int) -> int:
    """Singular components TSV-M keeps per task: ``floor(min(m, n) / K)``, at least 1."""
    return max(1, min(m, n) // num_tasks)


def tsv_factors(tau: Tensor, lowrank_min_dim: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Decorrelated TSV factors of ``tau [*, K, m, n]``: ``U_perp [*, m, K k]``, ``s [*, K k]``, ``Vh_perp [*, K k, n]``.

    Columns ``k j .. k (j + 1)`` belong to task ``j``.
    """
    num_tasks, m, n = tau.shape[-3:]
    u, s, vh = top_svd(tau, tsv_rank(num_tasks, m, n), lowrank_min_dim)  # (*, K, m, k), (*, K, k), (*, K, k, n)
    u_cat = u.transpose(-3, -2).flatten(-2)  # (*, m, K k)
    vh_cat = vh.flatten(-3, -2)  # (*, K k, n)
    return orthonormalize(u_cat), s.flatten(-2), orthonormalize(vh_cat.mT).mT


def tsv_m(tau: Tensor, alpha: float = 1.0, lowrank_min_dim: int | None = None, matrix: bool | None = None) -> Tensor:
    """TSV-M merged delta of one parameter's stack ``tau [K, *shape]``.

    A 2-D parameter (``matrix``: by default ``tau.dim() == 3``; True for a batch ``[*, K, m, n]``) gets the
    decorrelated reassembly, anything else the task-vector mean; both times ``alpha``.
    """
    if not is_matrix(tau, matrix):
        return alpha * tau.mean(0)
    u, s, vh = tsv_factors(tau, lowrank_min_dim)
    return alpha * ((u * s.unsqueeze(-2)) @ vh)


def tsv_components(
    tau: Tensor, alpha: float = 1.0, lowrank_min_dim: int | None = None, matrix: bool | None = None
) -> Tensor:
    """Per-task TSV-M components ``[*, K, m, n]``: task k's ``alpha * U_perp[:, k] S_k V_perp[:, k]^T``.

    They sum over ``K`` to :func:`tsv_m`; a non-2-D stack gives ``alpha * tau / K`` per row.
    """
    if not is_matrix(tau, matrix):
        return alpha * tau / tau.shape[0]
    num_tasks = tau.shape[-3]
    u, s, vh = tsv_factors(tau, lowrank_min_dim)
    u = u.unflatten(-1, (num_tasks, -1)).transpose(-3, -2)  # (*, K, m, k)
    s = s.unflatten(-1, (num_tasks, -1))  # (*, K, k)
    vh = vh.unflatten(-2, (num_tasks, -1))  # (*, K, k, n)
    return alpha * ((u * s.unsqueeze(-2)) @ vh)


SPECTRA = ("full", "nonzero")


def spanned(s: Tensor, shape: tuple[int, int], spectrum: str, reference: Tensor | None = None) -> Tensor:
    """Which singular directions the isotropic merges keep: every one (``full``, the paper) or those whose singular
    value is above the numerical-rank tolerance ``eps * max(m, n) * s_max`` (``nonzero``); ``s_max`` is taken from
    ``reference`` (default ``s``). A float mask shaped like ``s``."""
    if spectrum == "full":
        return torch.ones_like(s)
    top = (s if reference is None else reference).amax(-1, keepdim=True)
    return (s > torch.finfo(s.dtype).eps * max(shape) * top).to(s.dtype)


def isotropic(u: Tensor, s: Tensor, vh: Tensor, keep: Tensor, alpha: float) -> Tensor:
    """``alpha * mean(s over kept) * U_kept V_kept^T``; zero where nothing is kept (an all-zero task matrix)."""
    level = (s * keep).sum(-1) / keep.sum(-1).clamp(min=1)
    return alpha * level[..., None, None] * ((u * keep.unsqueeze(-2)) @ vh)


def iso_c(tau: Tensor, alpha: float = 1.0, matrix: bool | None = None, spectrum: str = "full") -> Tensor:
    """Iso-C merged delta: ``alpha * mean(s) U V^T`` of ``sum_k tau_k`` for 2-D stacks, ``alpha * mean`` otherwise.

    ``spectrum="nonzero"`` flattens only the directions the sum spans (see ``spanned``): for low-rank task vectors
    (LoRA experts) the paper's mean over all ``min(m, n)`` values gives the null space's arbitrary directions the same
    weight as the task's own.
    """
    if not is_matrix(tau, matrix):
        return alpha * tau.mean(0)
    u, s, vh = svd(tau.sum(-3))
    return isotropic(u, s, vh, spanned(s, tau.shape[-2:], spectrum), alpha)


def iso_cts_ranks(num_tasks: int, m: int, n: int, common_fraction: float) -> tuple[int, int]:
    """``(c, per_task)``: common-subspace size and task-specific directions per task, ``c + K per_task = min(m, n)``.

    ``per_task = round((r - floor(fraction r)) / K)``, capped at ``r // K``, so the task part splits evenly.
    """
    r = min(m, n)
    per_task = min(r // num_tasks, round((r - int(r * common_fraction)) / num_tasks))
    return r - num_tasks * per_task, per_task


def iso_cts(
    tau: Tensor,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    lowrank_min_dim: int | None = None,
    matrix: bool | None = None,
    spectrum: str = "full",
) -> Tensor:
    """Iso-CTS merged delta of ``tau [*, K, m, n]`` (``alpha * mean`` for non-2-D stacks).

    ``spectrum="nonzero"``: as for ``iso_c``, directions with a numerically zero singular value (tolerance from the
    sum's largest) are dropped before the bases are orthonormalised, so they mix with no kept direction.
    """
    if not is_matrix(tau, matrix):
        return alpha * tau.mean(0)
    num_tasks, m, n = tau.shape[-3:]
    common, per_task = iso_cts_ranks(num_tasks, m, n, common_fraction)
    u, s_sum, vh = svd(tau.sum(-3))
    u, s, vh = u[..., :common], s_sum[..., :common], vh[..., :common, :]
    if per_task > 0:
        specific = tau - u.unsqueeze(-3) @ (u.mT.unsqueeze(-3) @ tau)  # off the common left subspace
        u_ts, s_ts, vh_ts = top_svd(specific, per_task, lowrank_min_dim)  # (*, K, m, p), (*, K, p), (*, K, p, n)
        u = torch.cat([u_ts.transpose(-3, -2).flatten(-2), u], -1)
        s = torch.cat([s_ts.flatten(-2), s], -1)
        vh = torch.cat([vh_ts.flatten(-3, -2), vh], -2)
    keep = spanned(s, (m, n), spectrum, reference=s_sum)
    if per_task > 0:  # a zeroed column stays out of the polar factor of the others: P Q^T is block-diagonal in it
        u, vh = orthonormalize(u * keep.unsqueeze(-2)), orthonormalize((vh * keep.unsqueeze(-1)).mT).mT
    return isotropic(u, s, vh, keep, alpha)


# --------------------------------------------------------------------------------------------------- pool


def map_matrices(
    task_vectors: Mapping[str, Tensor],
    fn: Callable[[Tensor, bool], Tensor],
    max_group_elements: int = MAX_GROUP_ELEMENTS,
) -> dict[str, Tensor]:
    """``fn`` over every stack, in the solve dtype, with 2-D parameters of one shape batched as ``[B, K, m, n]``.

    ``fn(stack, matrix)`` maps a ``[K, *shape]`` stack of another parameter (``matrix=False``) or a ``[B, K, m, n]``
    batch of 2-D ones (``matrix=True``) to its result (batched: ``[B, ...]``); the results keep ``task_vectors``'
    order and are in the solve dtype.
    """
    out: dict[str, Tensor] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, tau in task_vectors.items():
        if tau.dim() == 3:
            groups[tuple(tau.shape)].append(name)
        else:
            out[name] = fn(tau.to(compute_dtype(tau.dtype)), False)
    for shape, names in groups.items():
        per_batch = max(1, max_group_elements // math.prod(shape))
        for start in range(0, len(names), per_batch):
            chunk = names[start : start + per_batch]
            stack = torch.stack([task_vectors[n] for n in chunk]).to(compute_dtype(task_vectors[chunk[0]].dtype))
            out.update(zip(chunk, fn(stack, True).unbind(0)))
    return {name: out[name] for name in task_vectors}


def merged_params(run: Run, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    base = run.pool.base_tensors()
    return {name: base[name] + delta.to(base[name].dtype) for name, delta in deltas.items()}


def rows_of_delta(pool: ExpertPool, deltas: Mapping[str, Tensor]) -> ExpertPool:
    """A pool whose every task vector is ``delta / K``: the per-task form of a method that defines only a merge."""
    k = pool.num_experts
    stacks = {n: (d / k).to(pool.task_vectors[n].dtype).expand(k, *d.shape).contiguous() for n, d in deltas.items()}
    return dataclasses.replace(pool, task_vectors=stacks)


def check_options(method: str, alpha: float, lowrank_min_dim: int | None, common_fraction: float | None = None) -> None:
    if not math.isfinite(alpha):
        raise ConfigError(f"method.alpha must be a finite number for {method!r}, got {alpha!r}")
    if lowrank_min_dim is not None and lowrank_min_dim < 1:
        raise ConfigError(
            f"method.lowrank_min_dim must be null (exact SVD) or >= 1 for {method!r}, got {lowrank_min_dim}"
        )
    if common_fraction is not None and not 0.0 < common_fraction <= 1.0:
        raise ConfigError(f"method.common_fraction must be in (0, 1] for {method!r}, got {common_fraction!r}")


# --------------------------------------------------------------------------------------------------- methods


@dataclasses.dataclass
class TSVM:
    """TSV-M (see the module docstring).

    Attributes:
        alpha: scaling of the merged delta (the paper's main results: 1.0).
        lowrank_min_dim: randomized per-task SVD for matrices with ``min(m, n)`` at least this; null: exact.
    """

    name: str
    alpha: float = 1.0
    lowrank_min_dim: int | None = None

    calibration_steps = 0

    def __post_init__(self) -> None:
        check_options(self.name, self.alpha, self.lowrank_min_dim)

    def options(self) -> dict:
        return {"alpha": self.alpha, "lowrank_min_dim": self.lowrank_min_dim}

    def deltas(self, pool: ExpertPool) -> dict[str, Tensor]:
        return map_matrices(pool.task_vectors, lambda tau, mat: tsv_m(tau, self.alpha, self.lowrank_min_dim, mat))

    def merge(self, run: Run) -> MergeResult:
        return static_result(self.name, run, merged_params(run, self.deltas(run.pool)), self.options())

    def transform(self, run: Run) -> ExpertPool:
        """Per-task decorrelated components; with coefficients 1 they sum to the TSV-M merge."""
        stacks = map_matrices(
            run.pool.task_vectors, lambda tau, mat: tsv_components(tau, self.alpha, self.lowrank_min_dim, mat)
        )
        return dataclasses.replace(
            run.pool, task_vectors={n: s.to(run.pool.task_vectors[n].dtype) for n, s in stacks.items()}
        )


@dataclasses.dataclass
class Isotropic:
    """Iso-C (``iso_c``) and Iso-CTS (``iso_cts``); see the module docstring.

    Attributes:
        alpha: scaling of the merged delta (tuned per model in the paper; the presets hold ViT-B/32's).
        common_fraction: Iso-CTS only: fraction of ``min(m, n)`` kept as the common subspace (paper: 0.8).
        lowrank_min_dim: Iso-CTS only: randomized task-specific SVDs for ``min(m, n)`` at least this; null: exact.
        spectrum: ``full`` (the paper: all ``min(m, n)`` singular values flattened) or ``nonzero`` (only the directions
            the task vectors span; for low-rank task vectors such as LoRA experts', see ``iso_c``).
    """

    name: str
    alpha: float = 1.0
    common_fraction: float | None = None
    lowrank_min_dim: int | None = None
    spectrum: str = "full"

    calibration_steps = 0

    def __post_init__(self) -> None:
        if self.name == "iso_c" and (self.common_fraction is not None or self.lowrank_min_dim is not None):
            key = "common_fraction" if self.common_fraction is not None else "lowrank_min_dim"
            raise ConfigError(f"method.{key} does not apply to 'iso_c' (it has no task-specific subspace)")
        if self.name == "iso_cts" and self.common_fraction is None:
            raise ConfigError("method.common_fraction must be set for 'iso_cts' (conf/method/iso_cts.yaml: 0.8)")
        if self.spectrum not in SPECTRA:
            raise ConfigError(f"method.spectrum must be one of {SPECTRA} for {self.name!r}, got {self.spectrum!r}")
        check_options(self.name, self.alpha, self.lowrank_min_dim, self.common_fraction)

    def options(self) -> dict:
        keys = ("alpha",) if self.name == "iso_c" else ("alpha", "common_fraction", "lowrank_min_dim")
        return {k: getattr(self, k) for k in keys} | {"spectrum": self.spectrum}

    def kernel(self, tau: Tensor, matrix: bool) -> Tensor:
        if self.name == "iso_c":
            return iso_c(tau, self.alpha, matrix, self.spectrum)
        return iso_cts(tau, self.alpha, self.common_fraction, self.lowrank_min_dim, matrix, self.spectrum)

    def merge(self, run: Run) -> MergeResult:
        deltas = map_matrices(run.pool.task_vectors, self.kernel)
        return static_result(self.name, run, merged_params(run, deltas), self.options())

    def transform(self, run: Run) -> ExpertPool:
        """No per-task form in the paper: every row is the merged delta / K."""
        return rows_of_delta(run.pool, map_matrices(run.pool.task_vectors, self.kernel))


register(
    "tsv_m",
    kind="static",
    description="TSV-M: each task's top 1/K singular components, decorrelated (orthogonalised bases), summed",
    paper="https://arxiv.org/abs/2412.00081",
    needs=Needs(dense=True),
)(TSVM)
register(
    "iso_c",
    kind="static",
    description="Iso-C: the summed task matrix with its singular values flattened to their mean",
    paper="https://arxiv.org/abs/2502.04959",
    needs=Needs(dense=True),
)(Isotropic)
register(
    "iso_cts",
    kind="static",
    description="Iso-CTS: common plus task-specific singular directions, orthogonalised, isotropic spectrum",
    paper="https://arxiv.org/abs/2502.04959",
    needs=Needs(dense=True),
)(Isotropic)
