"""Static merge kernels: pure functions over one parameter's task-vector stack.

A *task-vector stack* ``tau`` has shape ``[K, *shape]``: row ``k`` is ``theta_k - theta_0`` for one parameter
tensor of expert ``k``. Merges reduce the stack to a *merged delta* of shape ``shape`` that the caller adds to
``theta_0``; transforms return a processed stack of the same shape ``[K, *shape]`` on which coefficients can be
learned (AdaMerging++ learns them on TIES-processed task vectors).

Weights may be learnable tensors: they are only cast and multiplied, never read back as Python numbers, so
gradients reach them. Everything runs in ``tau``'s dtype (weights are cast to it) and on its device.

Papers:
    - Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
      https://arxiv.org/abs/2212.04089
    - TIES-Merging: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
      https://arxiv.org/abs/2306.01708
    - DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
      Lunch", ICML 2024. https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_DENSITY",
    "DEFAULT_DROP_RATE",
    "MERGES",
    "TRANSFORMS",
    "average",
    "dare",
    "dare_mask",
    "dare_transform",
    "disjoint_mean",
    "elect_sign",
    "get_merge",
    "get_transform",
    "identity",
    "task_arithmetic",
    "ties",
    "ties_transform",
    "trim",
]

DEFAULT_DENSITY = 0.2
"""TIES keeps the top 20% of each task vector by magnitude, the paper's default ``k``."""

ROW_BY_ROW = 2**16
"""Tensors of at least this many entries are trimmed and merged one expert at a time: temporaries of one row instead
of the whole ``[K, n]`` stack (a 7B embedding's merge in ``adamerge merge-files``), with bitwise the same result."""

DEFAULT_DROP_RATE = 0.9
"""DARE's headline setting (Yu et al.): rescaled dropping of 90% of an SFT delta keeps the expert's ability
because SFT deltas are small. Fully fine-tuned vision task vectors (e.g. CLIP experts) are larger and the paper
reports DARE degrading as delta magnitudes grow, so set ``drop_rate`` lower (0.3-0.5) in such method configs."""


# --------------------------------------------------------------------------------------------------- checks


def _check_stack(tau: Tensor) -> None:
    if not isinstance(tau, Tensor):
        raise TypeError(f"tau must be a torch.Tensor stack of shape [K, ...], got {type(tau).__name__}")
    if tau.dim() < 1:
        raise ValueError("tau must have at least 1 dim (experts first, shape [K, ...]), got a 0-dim tensor")
    if not tau.is_floating_point():
        raise TypeError(f"tau must be a floating-point tensor, got dtype {tau.dtype}")
    if tau.shape[0] == 0:
        raise ValueError("tau stacks no experts (K=0); need at least one task vector")


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r} (config key: density)")


def _check_drop_rate(drop_rate: float) -> None:
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r} (config key: drop_rate)")


def _expert_weights(weights: Tensor | float, tau: Tensor) -> Tensor:
    """Return ``weights`` as a tensor in ``tau``'s dtype and device, of shape ``[]`` or ``[K]``."""
    k = tau.shape[0]
    if isinstance(weights, Tensor):
        if weights.dim() > 1 or (weights.dim() == 1 and weights.shape[0] != k):
            raise ValueError(
                f"weights must be a scalar or have shape [K]=[{k}] (one per expert), got shape {list(weights.shape)}"
            )
        # `.to` is differentiable, so learnable fp32 coefficients still get gradients through a bf16 merge.
        return weights.to(dtype=tau.dtype, device=tau.device)
    if isinstance(weights, bool) or not isinstance(weights, (int, float)):
        raise TypeError(f"weights must be a float or a tensor of shape [] or [K]=[{k}], got {type(weights).__name__}")
    return torch.tensor(weights, dtype=tau.dtype, device=tau.device)


def _per_expert(w: Tensor, tau: Tensor) -> Tensor:
    """View a ``[K]`` weight as ``[K, 1, ..., 1]`` so it broadcasts over ``tau``; scalars pass through."""
    return w if w.dim() == 0 else w.view(-1, *([1] * (tau.dim() - 1)))


# --------------------------------------------------------------------------------------------------- kernels


def task_arithmetic(tau: Tensor, weights: Tensor | float) -> Tensor:
    """Weighted sum of task vectors, ``sum_k w_k tau_k``.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        weights: one scaling coefficient for all experts (float or 0-dim tensor) or one per expert (``[K]``).

    Returns:
        The merged delta, shape ``shape``.
    """
    _check_stack(tau)
    w = _expert_weights(weights, tau)
    if w.dim() == 0:
        return w * tau.sum(0)
    # tensordot contracts K without materialising the [K, *shape] product.
    return torch.tensordot(w, tau, dims=1)


def average(tau: Tensor) -> Tensor:
    """Mean task vector: weight averaging of the experts, expressed as a delta from ``theta_0``.

    Args:
        tau: task-vector stack ``[K, *shape]``.
    """
    _check_stack(tau)
    return tau.mean(0)


def trim(tau: Tensor, density: float) -> Tensor:
    """Keep each expert's top-``density`` fraction of entries by magnitude and zero the rest (TIES "trim").

    Each expert keeps exactly ``max(1, round(density * n))`` entries, ``n = tau[k].numel()`` (Python ``round``,
    i.e. halves go to even). Among entries of equal magnitude at the threshold, which ones survive is up to
    ``torch.topk``; the count is exact either way.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        density: fraction of entries kept per expert, in ``(0, 1]``. When every entry is kept (``density=1``),
            ``tau`` itself is returned, not a copy.
    """
    _check_stack(tau)
    _check_density(density)
    flat = tau.reshape(tau.shape[0], -1)  # (K, n)
    n = flat.shape[1]
    keep = max(1, round(density * n))
    if keep >= n:
        return tau
    if n < ROW_BY_ROW:
        idx = flat.abs().topk(keep, dim=1, sorted=False).indices  # (K, keep)
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=tau.device).scatter_(1, idx, True)
        return torch.where(mask, flat, 0).view(tau.shape)
    out = torch.empty_like(flat)  # filled one expert at a time (ROW_BY_ROW)
    for k, row in enumerate(flat):
        mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
        mask[row.abs().topk(keep, sorted=False).indices] = True
        out[k] = torch.where(mask, row, 0)
    return out.view(tau.shape)


def elect_sign(tau: Tensor) -> Tensor:
    """Elected sign per entry, ``sign(sum_k tau_k)``: the sign of the total mass (TIES "elect").

    An entry whose mass sums to exactly 0 gets sign 0, so :func:`disjoint_mean` merges it to 0. The reference
    TIES code instead falls back to the tensor-wide majority sign there; the two differ only where nonzero
    entries cancel exactly, since an entry that every expert trimmed away merges to 0 under any sign.

    Args:
        tau: (usually trimmed, possibly weighted) task-vector stack ``[K, *shape]``.

    Returns:
        Tensor of -1, 0, +1 in ``tau``'s dtype, shape ``shape``.
    """
    _check_stack(tau)
    return torch.sign(tau.sum(0))


def _agrees(tau: Tensor, sign: Tensor) -> Tensor:
    """Boolean ``[K, *shape]``: nonzero entries whose sign equals the elected ``sign``."""
    # A nonzero entry never has sign 0, so sign-0 positions select nothing.
    return (torch.sign(tau) == sign) & (tau != 0)


def disjoint_mean(tau: Tensor, sign: Tensor) -> Tensor:
    """Mean over experts of the nonzero entries whose sign agrees with ``sign``; 0 where none agrees (TIES "merge").

    Args:
        tau: task-vector stack ``[K, *shape]``.
        sign: elected sign, shape ``shape`` (see :func:`elect_sign`).
    """
    _check_stack(tau)
    if sign.shape != tau.shape[1:]:
        raise ValueError(f"sign must have shape {list(tau.shape[1:])} (tau without K), got {list(sign.shape)}")
    if tau[0].numel() < ROW_BY_ROW:
        agree = _agrees(tau, sign)
        return torch.where(agree, tau, 0).sum(0) / agree.sum(0).clamp(min=1).to(tau.dtype)
    # Accumulated expert by expert: n-sized temporaries instead of [K, n] ones (the same sums in the same order as
    # torch's outer-dim sum; half precision accumulates in fp32 and rounds once, as that sum does).
    accumulate = torch.float32 if tau.dtype in (torch.float16, torch.bfloat16) else tau.dtype
    total = None
    count = torch.zeros(sign.shape, dtype=torch.int16, device=tau.device)  # <= K; int64 would double the memory
    for row in tau:
        agree = _agrees(row, sign)
        kept = torch.where(agree, row, 0).to(accumulate)
        total = kept if total is None else total + kept
        count += agree
    return total.to(tau.dtype) / count.clamp(min=1).to(tau.dtype)


def ties(tau: Tensor, density: float = DEFAULT_DENSITY, weights: Tensor | float = 1.0) -> Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean.

    Weights multiply the trimmed task vectors before sign election and the disjoint mean (as in PEFT). With a
    scalar ``w`` this equals ``w * ties(tau, density)``, the paper's ``lambda * tau_m``, because a common factor
    flips or keeps every sign together. Per-expert weights ``[K]`` can change the elected sign; an expert with
    weight 0 is left out of both the election and the count.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        density: fraction of entries each expert keeps, in ``(0, 1]``.
        weights: scalar scaling coefficient or one weight per expert (``[K]``).

    Returns:
        The merged delta, shape ``shape``.
    """
    _check_stack(tau)
    trimmed = trim(tau, density)
    unit = not isinstance(weights, Tensor) and weights == 1.0  # lam = 1 (the paper's): no [K, n] product
    weighted = trimmed if unit else trimmed * _per_expert(_expert_weights(weights, tau), tau)
    return disjoint_mean(weighted, elect_sign(weighted))


def ties_transform(tau: Tensor, density: float = DEFAULT_DENSITY) -> Tensor:
    """TIES-processed task vectors: trimmed, with entries that disagree with the elected sign zeroed.

    This is the stack AdaMerging++ learns coefficients on (``sum_k lambda_k T_k``). Dividing its sum over experts
    by the number of surviving entries gives plain TIES::

        T = ties_transform(tau, density)
        ties(tau, density) == T.sum(0) / (T != 0).sum(0).clamp(min=1)

    Args:
        tau: task-vector stack ``[K, *shape]``.
        density: fraction of entries each expert keeps, in ``(0, 1]``.

    Returns:
        Stack of shape ``[K, *shape]``.
    """
    trimmed = trim(tau, density)
    return torch.where(_agrees(trimmed, elect_sign(trimmed)), trimmed, 0)


def dare_mask(tau: Tensor, drop_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE drop-and-rescale: zero each entry independently with probability ``p``, scale survivors by ``1/(1-p)``.

    The rescaling keeps every entry's expectation equal to its input. ``p=0`` returns ``tau`` itself.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        drop_rate: drop probability ``p`` in ``[0, 1)``.
        generator: random generator on ``tau``'s device, for reproducible masks; the global RNG when ``None``.

    Returns:
        Stack of shape ``[K, *shape]``.
    """
    _check_stack(tau)
    _check_drop_rate(drop_rate)
    if generator is not None and generator.device.type != tau.device.type:
        raise ValueError(f"generator is on {generator.device} but tau is on {tau.device}; create it on tau's device")
    if drop_rate == 0:
        return tau
    # Uniforms in fp32: a bf16 uniform has too few levels to hit keep-probability 1-p accurately.
    keep = torch.rand(tau.shape, generator=generator, device=tau.device) >= drop_rate
    return torch.where(keep, tau / (1.0 - drop_rate), 0)


def dare_transform(
    tau: Tensor, drop_rate: float = DEFAULT_DROP_RATE, generator: torch.Generator | None = None
) -> Tensor:
    """DARE-processed task vectors for learned coefficients; :func:`dare_mask` with the default drop rate.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        drop_rate: drop probability ``p`` in ``[0, 1)``.
        generator: random generator on ``tau``'s device; the global RNG when ``None``.
    """
    return dare_mask(tau, drop_rate, generator)


def dare(
    tau: Tensor,
    drop_rate: float = DEFAULT_DROP_RATE,
    weights: Tensor | float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE merge: :func:`dare_mask` each task vector, then :func:`task_arithmetic`.

    Args:
        tau: task-vector stack ``[K, *shape]``.
        drop_rate: drop probability ``p`` in ``[0, 1)``; see ``DEFAULT_DROP_RATE`` for the choice of default.
        weights: scalar scaling coefficient or one weight per expert (``[K]``).
        generator: random generator on ``tau``'s device; the global RNG when ``None``.

    Returns:
        The merged delta, shape ``shape``.
    """
    return task_arithmetic(dare_mask(tau, drop_rate, generator), weights)


def identity(tau: Tensor) -> Tensor:
    """No transform: the task vectors as they are."""
    return tau


# --------------------------------------------------------------------------------------------------- registry

MERGES: dict[str, Callable[..., Tensor]] = {
    "task_arithmetic": task_arithmetic,
    "average": average,
    "ties": ties,
    "dare": dare,
}
"""Static merges by config name; each maps a stack ``[K, *shape]`` to a merged delta ``shape``."""

TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "none": identity,
    "ties": ties_transform,
    "dare": dare_transform,
}
"""Task-vector transforms by config name; each maps a stack ``[K, *shape]`` to a stack of the same shape."""


def _lookup(table: dict[str, Callable[..., Tensor]], name: str, what: str, key: str) -> Callable[..., Tensor]:
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown {what} {name!r}; choose one of: {', '.join(sorted(table))} (config key: {key})"
        ) from None


def get_merge(name: str) -> Callable[..., Tensor]:
    """Return the merge function registered as ``name`` in :data:`MERGES`.

    Args:
        name: method name, e.g. ``"ties"``.
    """
    return _lookup(MERGES, name, "merge method", "method")


def get_transform(name: str) -> Callable[..., Tensor]:
    """Return the task-vector transform registered as ``name`` in :data:`TRANSFORMS`.

    Args:
        name: transform name, e.g. ``"ties"``; ``"none"`` for the identity.
    """
    return _lookup(TRANSFORMS, name, "task-vector transform", "transform")
