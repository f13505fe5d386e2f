"""Mask merges: TALL masks and Consensus merging, PCB-Merging (and, from ``sparsify.py``, DELLA and Breadcrumbs).

Papers:
    - TALL masks and Consensus merging: Wang et al., "Localizing Task Information for Improved Model Merging and
      Compression", ICML 2024. https://arxiv.org/abs/2405.07813. With ``tau_MTL = sum_t tau_t`` (task arithmetic's
      multi-task vector, unscaled), task ``t``'s mask is ``m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|`` (eq. 4):
      the entries where task ``t`` carries more than a ``lambda_t`` share of the others' interference. TALL masks are
      task-specific at inference: task ``t`` runs ``theta_0 + m_t * tau_MTL`` (the pipeline's "(per-task)" row); the
      exported one model of ``tall_masks`` is task arithmetic, ``theta_0 + weights * tau_MTL``. Consensus keeps the
      entries selected by at least ``k`` masks (``k=2`` drops "selfish" and "catastrophic" weights) and merges one
      model, ``theta_0 + weights * (m_cons * tau_MTL)``. The paper picks ``lambda_t`` per task on validation data from
      {0.2, ..., 0.6}; without validation data one ``mask_lambda`` (or one per task) is given.
    - PCB-Merging: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.
      https://arxiv.org/abs/2410.02396. Per task ``i`` (flattened, ``D`` entries), intra-balancing
      ``softmax(T * Norm(tau_i * tau_i))`` (temperature ``T``, the number of tasks by default) times inter-balancing
      ``sum_j softmax(Norm(tau_i * tau_j))`` gives ``beta_i``; only the top ``ratio`` of ``beta_i`` survives
      (``beta_hat_i``), and the merge is ``lambda * sum_i beta_hat_i tau_i / sum_i beta_hat_i``. ``Norm`` is min-max
      scaling to [0, 1] (the authors' ``normalize``). Definitional notes: the authors' released code
      (duguodong7/pcb-merging) uses ``exp`` without the softmax's normaliser (a per-task factor, so the same
      selection), replaces the inter-balancing softmax by a ``tanh`` (``pcb-merging.py``: ``tanh(tau_i * sum_j
      tau_j)``; ``vision_source_code/pcb_ES.py``: ``sum_j tanh(N_i * N_j)`` with ``N = sign(tau) Norm(|tau|)``), first
      clips magnitudes at their 0.01% (``pcb-merging.py``) or 1% (``vision_source_code``) quantiles, and weights the
      kept entries by the min-max-normalised scores after flooring them at the top-``ratio`` threshold; this follows
      the paper's equations. Like TIES here, it works per tensor, where the authors flatten the whole model.
      Defaults: ``ratio = 0.05``, ``lambda = 1.2``, the authors' CLIP ViT-B/32 8-task run
      (``vision_source_code/pcb.py``: ``att_ratio = 0.05``, ``lams = 1.2``; ``pcb_ES.py`` then tunes one lambda per
      task in [0.8, 1.3] on validation data); their T5 runs use ratios 0.05-0.2 with lambda searched over 0.8-2.2
      (``run_merging.sh``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods import sparsify  # noqa: F401 - registers della and breadcrumbs (the generalised kernel)
from adamerge.methods.kernels import _check_stack, _expert_weights, _per_expert, trim
from adamerge.methods.registry import ConfigError, MergeResult, Needs, Run, register, static_result

log = logging.getLogger(__name__)

MASKS_FILE = "tall_masks.safetensors"


# --------------------------------------------------------------------------------------------------- TALL / Consensus


def tall_masks(tau: Tensor, mask_lambda: float | Sequence[float] | Tensor) -> Tensor:
    """TALL masks ``m_k = |tau_k| >= lambda_k |tau_MTL - tau_k|`` with ``tau_MTL = sum_k tau_k``, boolean ``[K, *shape]``.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        mask_lambda: one ``lambda`` for every task or one per task (``[K]``).
    """
    _check_stack(tau)
    lam = _per_expert(_expert_weights(torch.as_tensor(mask_lambda, dtype=tau.dtype), tau), tau)
    return tau.abs() >= lam * (tau.sum(0) - tau).abs()


def consensus_mask(masks: Tensor, k: int = 2) -> Tensor:
    """Entries selected by at least ``k`` of the ``[K, *shape]`` boolean masks."""
    return masks.sum(0) >= k


def consensus_task_vectors(tau: Tensor, mask_lambda, k: int = 2, weights: Tensor | float = 1.0) -> Tensor:
    """Consensus merging, per task: ``weights * m_cons * tau_k``; their sum is :func:`consensus_merge`."""
    keep = consensus_mask(tall_masks(tau, mask_lambda), k)
    return torch.where(keep, tau, 0) * _per_expert(_expert_weights(weights, tau), tau)


def consensus_merge(tau: Tensor, mask_lambda, k: int = 2, weights: Tensor | float = 1.0) -> Tensor:
    """Consensus task arithmetic: ``weights * (m_cons * tau_MTL)``, the merged delta ``shape``."""
    return consensus_task_vectors(tau, mask_lambda, k, weights).sum(0)


def tall_task_params(base: Tensor, tau_mtl: Tensor, mask: Tensor) -> Tensor:
    """Task ``t``'s weights under its TALL mask: ``theta_0 + m_t * tau_MTL`` (shared by the merge and the loader, so
    what is judged and what is loaded are the same tensors)."""
    return base + torch.where(mask, tau_mtl, 0).to(base.dtype)


def check_lambdas(mask_lambda, num_experts: int, method: str) -> None:
    if isinstance(mask_lambda, list | tuple) and len(mask_lambda) != num_experts:
        raise ConfigError(
            f"method.mask_lambda has {len(mask_lambda)} values for {num_experts} experts ({method!r}); "
            "give one value, or one per expert in the order of experts.experts"
        )


def write_tall_masks(folder: Path, experts: list[str], base: dict, tau_mtl: dict, masks: dict, record: dict) -> None:
    """Bit-packed masks (``numpy.packbits``: 1 bit per entry and task), tau_MTL and theta_0 in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {}
    for name, mask in masks.items():
        bits = np.packbits(mask.reshape(mask.shape[0], -1).cpu().numpy(), axis=1)  # (K, ceil(n / 8)) uint8
        tensors[f"mask/{name}"] = torch.from_numpy(bits)
        tensors[f"tau_mtl/{name}"] = tau_mtl[name].detach().contiguous().clone()
        tensors[f"base/{name}"] = base[name].detach().contiguous().clone()
    metadata = {"experts": json.dumps(experts), "names": json.dumps(list(masks)), "record": json.dumps(record)}
    save_file(tensors, str(Path(folder) / MASKS_FILE), metadata=metadata)


def load_task_params(run_dir: str | Path, task: str) -> dict[str, Tensor]:
    """Rebuild task ``task``'s TALL-masked weights ``theta_0 + m_t * tau_MTL`` from a run's ``tall_masks.safetensors``.

    Args:
        run_dir: the run's output folder (``paths.output_dir``).
        task: an expert name of that run.

    Returns:
        Merged tensor name -> tensor, the params that task was judged with.
    """
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / MASKS_FILE), framework="pt") as f:
        meta = f.metadata()
        experts = json.loads(meta["experts"])
        if task not in experts:
            raise KeyError(f"task {task!r} has no TALL mask in {run_dir}; its tasks: {experts}")
        row = experts.index(task)
        params = {}
        for name in json.loads(meta["names"]):
            tau_mtl, base = f.get_tensor(f"tau_mtl/{name}"), f.get_tensor(f"base/{name}")
            bits = f.get_tensor(f"mask/{name}")[row].numpy()
            mask = torch.from_numpy(np.unpackbits(bits, count=tau_mtl.numel()).astype(bool)).view(tau_mtl.shape)
            params[name] = tall_task_params(base, tau_mtl, mask)
    return params


@dataclasses.dataclass
class TallMasks:
    """TALL masks: each task judged with ``theta_0 + m_t * tau_MTL``; the exported model is task arithmetic.

    Attributes:
        mask_lambda: ``lambda`` of the mask rule, one for all tasks or one per task (experts' order).
        weights: lambda of the exported one model, ``theta_0 + weights * tau_MTL`` (task arithmetic).
    """

    name: str
    mask_lambda: float | list[float] = 0.6
    weights: float = 0.3

    calibration_steps = 0

    def __post_init__(self) -> None:
        check_nonnegative(self.mask_lambda, self.name)

    def merge(self, run: Run) -> MergeResult:
        pool = run.pool
        check_lambdas(self.mask_lambda, pool.num_experts, self.name)
        base = pool.base_tensors()
        params, task_params = {}, {task: {} for task in pool.experts}
        tau_mtl, masks = {}, {}
        for name, tau in pool.task_vectors.items():
            tau_mtl[name], masks[name] = tau.sum(0), tall_masks(tau, self.mask_lambda)
            params[name] = base[name] + (self.weights * tau_mtl[name]).to(base[name].dtype)
            for k, task in enumerate(pool.experts):
                task_params[task][name] = tall_task_params(base[name], tau_mtl[name], masks[name][k])
        options = options_record(self)
        result = static_result(self.name, run, params, options)
        result.task_params = task_params
        result.write_artifacts = lambda folder: write_tall_masks(folder, pool.experts, base, tau_mtl, masks, options)
        return result

    def transform(self, run: Run) -> ExpertPool:
        """Rows: each task's TALL reconstruction ``m_k * tau_MTL``. Their sum is not the exported merge: TALL masks
        are per-task models, so a learner learns how much of each task's reconstruction to add."""
        check_lambdas(self.mask_lambda, run.pool.num_experts, self.name)
        stacks = {}
        for name, tau in run.pool.task_vectors.items():
            stacks[name] = torch.where(tall_masks(tau, self.mask_lambda), tau.sum(0), 0)
        return dataclasses.replace(run.pool, task_vectors=stacks)


@dataclasses.dataclass
class Consensus:
    """Consensus merging over task arithmetic: keep the entries at least ``k`` TALL masks select.

    Attributes:
        mask_lambda: ``lambda`` of the TALL masks, one for all tasks or one per task.
        k: minimum number of tasks whose masks select an entry (2: drop selfish and catastrophic weights).
        weights: lambda of the task arithmetic over the consensus-masked vectors.
    """

    name: str
    mask_lambda: float | list[float] = 0.6
    k: int = 2
    weights: float = 0.3

    calibration_steps = 0

    def __post_init__(self) -> None:
        check_nonnegative(self.mask_lambda, self.name)
        if self.k < 0:
            raise ConfigError(f"method.k={self.k} must be >= 0 ({self.name!r}); 2 is the paper's")

    def merge(self, run: Run) -> MergeResult:
        check_lambdas(self.mask_lambda, run.pool.num_experts, self.name)
        base = run.pool.base_tensors()
        params = {
            name: base[name] + consensus_merge(tau, self.mask_lambda, self.k, self.weights).to(base[name].dtype)
            for name, tau in run.pool.task_vectors.items()
        }
        return static_result(self.name, run, params, options_record(self))

    def transform(self, run: Run) -> ExpertPool:
        """Rows: ``weights * m_cons * tau_k``; their plain sum is the consensus merge."""
        check_lambdas(self.mask_lambda, run.pool.num_experts, self.name)
        stacks = {
            name: consensus_task_vectors(tau, self.mask_lambda, self.k, self.weights)
            for name, tau in run.pool.task_vectors.items()
        }
        return dataclasses.replace(run.pool, task_vectors=stacks)


def check_nonnegative(mask_lambda, method: str) -> None:
    values = mask_lambda if isinstance(mask_lambda, list | tuple) else [mask_lambda]
    if any(v < 0 for v in values):
        raise ConfigError(f"method.mask_lambda={mask_lambda} must be >= 0 ({method!r}); the paper uses 0.2-0.6")


# --------------------------------------------------------------------------------------------------- PCB


def minmax(x: Tensor) -> Tensor:
    """Each row of ``(K, n)`` scaled to [0, 1]; a constant row maps to 0."""
    low = x.amin(dim=1, keepdim=True)
    return (x - low) / (x.amax(dim=1, keepdim=True) - low).clamp(min=torch.finfo(x.dtype).tiny)


def pcb_scores(tau: Tensor, temperature: float | None = None) -> Tensor:
    """PCB's balancing scores ``beta_i = intra_i * inter_i``, float32 ``(K, n)``.

    Both softmaxes are over a task's ``n`` entries; they are multiplied by ``n`` (a factor common to every task, so
    neither the per-task top-``ratio`` selection nor the rescale changes) to keep the scores near 1 for large tensors.
    """
    _check_stack(tau)
    k = tau.shape[0]
    flat = tau.reshape(k, -1).float()  # (K, n)
    n = flat.shape[1]
    t = float(k if temperature is None else temperature)
    intra = torch.softmax(t * minmax(flat * flat), dim=1) * n
    inter = torch.zeros_like(flat)
    for i in range(k):  # softmax(Norm(tau_i * tau_j)) is symmetric in (i, j): compute each pair once
        for j in range(i, k):
            pair = torch.softmax(minmax(flat[i : i + 1] * flat[j : j + 1]), dim=1)[0] * n
            inter[i] += pair
            if j != i:
                inter[j] += pair
    return intra * inter


def pcb_task_vectors(
    tau: Tensor, ratio: float = 0.1, temperature: float | None = None, weights: Tensor | float = 1.0
) -> Tensor:
    """PCB, per task: ``weights * beta_hat_k * tau_k / sum_j beta_hat_j``, ``[K, *shape]``; their sum is :func:`pcb`.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        ratio: fraction of each task's entries kept by balancing score (``r``), in (0, 1].
        temperature: intra-balancing temperature; ``None`` is the number of tasks (the paper's).
        weights: lambda, scalar or ``[K]``.
    """
    kept = trim(pcb_scores(tau, temperature), ratio)  # beta_hat: the top-ratio scores of each task (scores are >= 0)
    flat = tau.reshape(tau.shape[0], -1).float()
    total = kept.sum(0)
    rows = torch.where(total > 0, kept * flat / total.clamp(min=torch.finfo(total.dtype).tiny), 0)
    return rows.to(tau.dtype).view(tau.shape) * _per_expert(_expert_weights(weights, tau), tau)


def pcb(tau: Tensor, ratio: float = 0.1, temperature: float | None = None, weights: Tensor | float = 1.0) -> Tensor:
    """PCB-Merging's merged delta: the score-weighted mean of the kept entries, times lambda (shape ``shape``)."""
    return pcb_task_vectors(tau, ratio, temperature, weights).sum(0)


@dataclasses.dataclass
class PCB:
    """PCB-Merging: balance each entry by its magnitude within the task and its agreement with the other tasks.

    Attributes:
        ratio: fraction of each task vector kept, by balancing score (``r``).
        temperature: intra-balancing temperature; ``null`` = the number of tasks (the paper's).
        weights: lambda, the scaling of the merged vector.
    """

    name: str
    ratio: float = 0.05
    temperature: float | None = None
    weights: float = 1.2

    calibration_steps = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"method.ratio={self.ratio} must be in (0, 1] ({self.name!r}): the fraction kept")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature} must be > 0, or null for the number of tasks")

    def merge(self, run: Run) -> MergeResult:
        base = run.pool.base_tensors()
        params = {
            name: base[name] + pcb(tau, self.ratio, self.temperature, self.weights).to(base[name].dtype)
            for name, tau in run.pool.task_vectors.items()
        }
        return static_result(self.name, run, params, options_record(self))

    def transform(self, run: Run) -> ExpertPool:
        """Rows: ``weights * beta_hat_k * tau_k / sum_j beta_hat_j``; their plain sum is the PCB merge."""
        stacks = {
            name: pcb_task_vectors(tau, self.ratio, self.temperature, self.weights)
            for name, tau in run.pool.task_vectors.items()
        }
        return dataclasses.replace(run.pool, task_vectors=stacks)


def options_record(method) -> dict:
    return {k: v for k, v in dataclasses.asdict(method).items() if k != "name"}


register(
    "tall_masks",
    kind="static",
    description="TALL masks: per-task masks over the task-arithmetic vector, each task judged with its own mask",
    paper="https://arxiv.org/abs/2405.07813",
    needs=Needs(dense=True),
)(TallMasks)
register(
    "consensus",
    kind="static",
    description="Consensus merging: task arithmetic over the entries that at least k TALL masks select",
    paper="https://arxiv.org/abs/2405.07813",
    needs=Needs(dense=True),
)(Consensus)
register(
    "pcb",
    kind="static",
    description="PCB-Merging: intra- and inter-task balancing scores, keep the top ratio, score-weighted mean",
    paper="https://arxiv.org/abs/2410.02396",
    needs=Needs(dense=True),
)(PCB)
