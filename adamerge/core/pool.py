"""Expert pool: a base model plus named experts, turned into stacked task vectors.

An expert is a Hugging Face id or folder (safetensors or ``pytorch_model.bin``, sharded or not), a weights file
(``.safetensors``, or a ``.bin``/``.pt`` state dict of the base architecture), a PEFT LoRA adapter folder on top of the
base, or (in Python) an ``nn.Module`` / state dict; see ``adamerge.core.readers``. Expert tensors are read one at a
time, so only the base model and the task-vector stacks are ever resident.

Task vectors are stored per tensor as one contiguous ``[K, *shape]`` stack (``tau[k] = theta_k - theta_0``) in the
chosen dtype and device: the merge of a tensor is then a single fused op over that buffer. Task-specific tensors
(classification heads) are never merged; they are kept per expert in ``ExpertPool.heads``.

Dtypes: experts may be stored in another dtype than the base (an fp16 fine-tune of an fp32 base). Task vectors are
formed in float32 and stored in ``experts.dtype``; heads are cast to the base model's dtype, so a forward with any
expert's head runs in the base's dtype.

Every task-vector row and head is checked finite as it is built (``experts.check_finite``; turn it off only to save
the pass on huge models): a NaN in one expert is reported by name there, not as a diverged loss or a NaN export later.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.core.readers import (  # noqa: F401 (re-exported: the pool's public surface)
    LoraReader,
    PoolError,
    SafetensorsReader,
    StateDictReader,
    TensorReader,
    TorchStateReader,
    align_key,
    expert_key,
    local_path,
    open_reader,
)
from adamerge.core.vocab import VocabUnion, extend_vocabulary, row_extensions, vocab_tensor_names
from adamerge.progress import progress

log = logging.getLogger(__name__)

DEFAULT_HEAD_PATTERNS = ("classifier.*", "score.*")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class ExpertPool:
    """What to merge: the base model (theta_0 lives inside it), expert names, task-vector stacks and heads."""

    model: nn.Module
    experts: list[str]
    task_vectors: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    base_source: str | None = None
    vocab: VocabUnion | None = None  # experts added tokens: the union vocabulary (``adamerge.core.vocab``)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def base_tensors(self) -> dict[str, Tensor]:
        """The base values of the merged tensors (views into the model, not copies)."""
        state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return {name: state[name] for name in self.task_vectors}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} (config key: experts.dtype)")
    return DTYPES[dtype]


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_merged_names(
    state: Mapping[str, Tensor],
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    head_patterns: Iterable[str] = DEFAULT_HEAD_PATTERNS,
) -> list[str]:
    """Names of the tensors to merge: floating, matched by ``include``, not by ``exclude`` nor a head pattern."""
    include, exclude, head_patterns = list(include), list(exclude), list(head_patterns)
    names = [
        n
        for n, t in state.items()
        if t.is_floating_point() and matches(n, include) and not matches(n, exclude) and not matches(n, head_patterns)
    ]
    if not names:
        raise PoolError(
            f"no tensor of the base model matches include={include} minus exclude={exclude} and heads={head_patterns}; "
            "fix the patterns (config keys: experts.include / experts.exclude)"
        )
    return names


# --------------------------------------------------------------------------------------------------------------
# Building the pool.
# --------------------------------------------------------------------------------------------------------------


def build_task_vectors(
    base_state: Mapping[str, Tensor],
    readers: Mapping[str, TensorReader],
    names: list[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prefix: str = "",
    check_finite: bool = True,
) -> dict[str, Tensor]:
    """Stack ``theta_k - theta_0`` per tensor into ``[K, *shape]`` buffers, one expert tensor read at a time.

    Each row is formed in float32 and stored in ``dtype``; with ``check_finite`` the stored row is checked for
    NaN/inf right after it is written (one pass over memory that is hot), and the error names the culprit.
    """
    experts = list(readers)
    keys = {e: r.keys() for e, r in readers.items()}
    stacks = {}
    for name in progress(names, "task vectors", unit="tensor", log=log):
        base = base_state[name]
        stack = torch.empty((len(experts), *base.shape), dtype=dtype, device=device)
        for k, expert in enumerate(experts):
            key = align_key(name, keys[expert], prefix)
            if key is None:
                raise PoolError(
                    f"expert {expert!r} has no tensor {name!r}, which the base has; it is not a fine-tune of this "
                    "base, or the tensor should not be merged: add it to experts.exclude"
                )
            value = readers[expert].get(key)
            if not value.is_floating_point():
                raise PoolError(
                    f"expert {expert!r}: tensor {name!r} is {value.dtype}, not floating point; "
                    "exclude it (experts.exclude)"
                )
            if value.shape != base.shape:
                raise PoolError(
                    f"expert {expert!r}: tensor {name!r} has shape {tuple(value.shape)} but the base has "
                    f"{tuple(base.shape)}; the expert's architecture differs from the base (check experts.base)"
                )
            stack[k] = (value.to(device=device, dtype=torch.float32) - base.to(device, torch.float32)).to(dtype)
            if check_finite and not torch.isfinite(stack[k]).all():
                raise not_finite_error(expert, name, stack[k], value, base)
        stacks[name] = stack
    return stacks


def not_finite_error(expert: str, name: str, row: Tensor, value: Tensor, base: Tensor) -> PoolError:
    """Why a task-vector row holds NaN/inf: the base, the expert, or the storage dtype's range (checked in that order)."""
    count = f"{int((~torch.isfinite(row)).sum())} NaN/inf value(s) out of {row.numel()}"
    skip = "or skip this check with experts.check_finite=false"
    if not torch.isfinite(base).all():
        return PoolError(
            f"the base model's tensor {name!r} holds NaN/inf values (every expert's task vector inherits them); "
            f"fix experts.base, {skip}"
        )
    if torch.isfinite(value).all():
        return PoolError(
            f"expert {expert!r}: the task vector of tensor {name!r} has {count}: it overflows the storage dtype "
            f"{row.dtype}; store task vectors in float32 or bfloat16 (experts.dtype), {skip}"
        )
    return PoolError(
        f"expert {expert!r}: tensor {name!r} has {count} (a diverged fine-tune or a broken conversion); fix the "
        f"expert or drop it from experts.experts ({expert_key(expert)}), {skip}"
    )


def collect_heads(
    readers: Mapping[str, TensorReader],
    head_patterns: Iterable[str],
    prefix: str,
    dtypes: Mapping[str, torch.dtype] | None = None,
    default_dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Each expert's task-specific tensors, keyed by the base model's naming (prefix normalised).

    Floating heads are cast to ``dtypes[name]`` (the base's tensor of that name) or ``default_dtype`` (the base's
    dtype), so that an fp16 expert's head runs in an fp32 base; with ``check_finite`` they are checked for NaN/inf.
    """
    dtypes = dtypes or {}
    heads = {}
    for expert, reader in readers.items():
        tensors = {}
        for key in sorted(reader.keys()):
            base_name = key.removeprefix(f"{prefix}.") if prefix else key
            if not matches(base_name, head_patterns):
                continue
            value = reader.get(key)
            if value.is_floating_point():
                if check_finite and not torch.isfinite(value).all():
                    raise PoolError(
                        f"expert {expert!r}: head tensor {base_name!r} has {int((~torch.isfinite(value)).sum())} "
                        f"NaN/inf value(s); fix the expert or drop it from experts.experts ({expert_key(expert)}), or "
                        "skip this check with experts.check_finite=false"
                    )
                value = value.to(dtype=dtypes.get(base_name, default_dtype or value.dtype), copy=True)
            else:
                value = value.clone()
            tensors[base_name] = value
        heads[expert] = tensors
    return heads


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters (the first one's; float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_no_extra_tensors(
    readers: Mapping[str, TensorReader], known: set[str], allowed: Iterable[str], prefix: str
) -> None:
    """Refuse experts with tensors the base lacks: a sign of a different architecture."""
    allowed = list(allowed)
    for expert, reader in readers.items():
        extra = [
            k
            for k in reader.keys()
            if align_key(k, known, prefix) is None
            and not matches(k.removeprefix(f"{prefix}.") if prefix else k, allowed)
        ]
        if extra:
            raise PoolError(
                f"expert {expert!r} has {len(extra)} tensor(s) the base lacks, e.g. {sorted(extra)[:3]}; is it a "
                "different architecture? If they are task-specific heads, add their pattern to experts.head_patterns"
            )


def make_pool(
    model: nn.Module,
    experts: Mapping[str, str | Path | nn.Module | Mapping[str, Tensor]],
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    head_patterns: Iterable[str] = DEFAULT_HEAD_PATTERNS,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    base_source: str | None = None,
    check_finite: bool = True,
    base_tokenizer=None,
    tokenizers: Mapping | None = None,
) -> ExpertPool:
    """A pool from an instantiated base model and expert sources (folders, files, adapters, modules, state dicts).

    Args:
        model: the base model (theta_0); frozen, moved to ``device``.
        experts: expert name -> source (config key ``experts.experts``).
        include / exclude: globs of the tensors to merge (``experts.include`` / ``experts.exclude``).
        head_patterns: globs of task-specific tensors, kept per expert, never merged (``experts.head_patterns``).
        dtype: task-vector storage (``experts.dtype``); rows are formed in float32 first.
        device: where the base and the task vectors live.
        base_source: the base's id/folder (``experts.base``), recorded for exports and checked against adapters.
        check_finite: refuse NaN/inf in task vectors and heads, naming expert and tensor (``experts.check_finite``).
        base_tokenizer / tokenizers: only read when experts added tokens (more embedding rows than the base): the
            base's and expert -> tokenizer or folder (``experts.base_tokenizer`` / ``experts.tokenizers``); default:
            read from ``base_source`` and each expert's folder. See ``adamerge.core.vocab``.
    """
    if not experts:
        raise PoolError("no experts given; list at least one under experts.experts")
    head_patterns = list(head_patterns)
    model.requires_grad_(False)
    base_state = dict(model.named_parameters())  # tied weights once; buffers are not learned, never merged
    prefix = getattr(model, "base_model_prefix", "") or ""
    config = getattr(model, "config", None)
    readers = {}
    for name, source in progress(experts.items(), "experts", unit="expert", log=log):
        readers[name] = open_reader(name, source, base_state, config, prefix)
        if isinstance(readers[name], LoraReader):
            readers[name].adapter.check_base(base_source or getattr(model, "name_or_path", None))
    known = set(model.state_dict()) | set(base_state)
    check_no_extra_tensors(readers, known, list(exclude) + head_patterns, prefix)
    vocab, vocab_names = None, vocab_tensor_names(model)
    grown = row_extensions(base_state, readers, vocab_names, prefix)
    if grown:  # experts added tokens: the base grows to the union vocabulary, added rows never merge
        vocab, readers = extend_vocabulary(
            model, readers, grown, vocab_names, prefix, base_tokenizer or base_source, experts, tokenizers or {}
        )
        base_state = dict(model.named_parameters())
    names = select_merged_names(base_state, include, exclude, head_patterns)
    task_vectors = build_task_vectors(
        base_state, readers, names, resolve_dtype(dtype), device, prefix, check_finite=check_finite
    )
    dtypes = {n: t.dtype for n, t in model.state_dict().items()}
    heads = collect_heads(readers, head_patterns, prefix, dtypes, model_dtype(model), check_finite)
    log.info(
        "pool: %d experts, %d merged tensors (%.1fM parameters each)",
        len(readers),
        len(names),
        sum(t[0].numel() for t in task_vectors.values()) / 1e6,
    )
    return ExpertPool(model.to(device), list(readers), task_vectors, heads, base_source, vocab)


def load_pool(
    base: str,
    experts: Mapping[str, str],
    model_class: str | Callable[..., nn.Module] = "transformers.AutoModel",
    model_kwargs: Mapping | None = None,
    **pool_kwargs,
) -> ExpertPool:
    """Load the base with ``from_pretrained`` (hub id or folder) and build the pool from expert sources."""
    cls = import_object(model_class) if isinstance(model_class, str) else model_class
    loader = getattr(cls, "from_pretrained", cls)
    model = loader(str(local_path(str(base), "experts.base", "the base")), **dict(model_kwargs or {}))
    return make_pool(model, experts, base_source=base, **pool_kwargs)


def import_object(path: str):
    """``'package.module.Name'`` -> the object."""
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot import {path!r} ({err}); fix the class path (config key: experts.model_class)"
        ) from err
