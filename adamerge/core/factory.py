"""The merged model for a pool: dense task vectors (``MergedModel``) or LoRA factors never densified
(``LoraMergedModel``). The one place that tells the pool kinds apart; methods and the pipeline call ``merged_model``."""

from __future__ import annotations

import typing

from adamerge.core.lora_merged import LoraMergedModel
from adamerge.core.lora_pool import LoraPool
from adamerge.core.merged import MergedModel
from adamerge.core.pool import ExpertPool, import_object

POOL_KINDS = {ExpertPool: "dense", LoraPool: "lora"}


def merged_model(
    pool: ExpertPool | LoraPool,
    storage: str = "resident",
    rank: int | None = None,
    energy: float | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    **options,
) -> MergedModel | LoraMergedModel:
    """The functional merged model of ``pool``; ``options`` (granularity, init, ...) go to its constructor."""
    if isinstance(pool, LoraPool):
        if storage != "resident":
            raise ValueError("LoRA factors are small and always resident; set method.storage=resident")
        if activation_checkpointing or compile:
            raise ValueError(
                "activation checkpointing and compile are for dense experts; set method.activation_checkpointing=false "
                "and method.compile=false"
            )
        return LoraMergedModel(pool, **options)
    extra = dict(activation_checkpointing=activation_checkpointing, compile=compile)
    return MergedModel(pool, storage=storage, rank=rank, energy=energy, **extra, **options)


def pool_kind(pool_or_target) -> str | None:
    """``dense`` or ``lora`` for a pool, or for a pool factory's import path (from its return annotation, so it is
    known before anything loads); ``None`` when a factory does not say."""
    if isinstance(pool_or_target, str):
        try:
            hint = typing.get_type_hints(import_object(pool_or_target)).get("return")
        except (ValueError, NameError, TypeError):
            return None
        return next((kind for cls, kind in POOL_KINDS.items() if hint is cls), None)
    return next((kind for cls, kind in POOL_KINDS.items() if isinstance(pool_or_target, cls)), None)
