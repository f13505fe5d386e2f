"""Static (training-free) merges and task-vector transforms applied to a whole pool, tensor by tensor."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from adamerge.core.pool import ExpertPool
from adamerge.methods.kernels import get_merge, get_transform


def static_merge(pool: ExpertPool, method: str, seed: int = 0, **kwargs) -> dict[str, Tensor]:
    """theta_0 + merge(tau) for every merged tensor; ``kwargs`` go to the kernel (e.g. ``weights``, ``density``)."""
    merge = get_merge(method)
    kwargs = with_generator(method, seed, kwargs)
    base = pool.base_tensors()
    return {name: base[name] + merge(tau, **kwargs).to(base[name].dtype) for name, tau in pool.task_vectors.items()}


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
