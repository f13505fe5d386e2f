"""Expert pool: a base model plus named experts, turned into stacked task vectors.

An expert is a Hugging Face id or folder, a safetensors file (a state dict of the base architecture), a PEFT LoRA
adapter folder on top of the base, or (in Python) an ``nn.Module`` / state dict. Expert tensors are read one at a
time (``safetensors.safe_open``), so only the base model and the task-vector stacks are ever resident.

Task vectors are stored per tensor as one contiguous ``[K, *shape]`` stack (``tau[k] = theta_k - theta_0``) in the
chosen dtype and device: the merge of a tensor is then a single fused op over that buffer. Task-specific tensors
(classification heads) are never merged; they are kept per expert in ``ExpertPool.heads``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.core.adapters import LoraAdapter

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


class PoolError(ValueError):
    """Bad experts: the message names the expert, the tensor and the fix."""


@dataclass
class ExpertPool:
    """What to merge: the base model (theta_0 lives inside it), expert names, task-vector stacks and heads."""

    model: nn.Module
    experts: list[str]
    task_vectors: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    base_source: str | None = None

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
# Readers: one expert's tensors, read lazily by name.
# --------------------------------------------------------------------------------------------------------------


class TensorReader:
    """Lazy name -> tensor access to one expert's weights."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        raise NotImplementedError


class StateDictReader(TensorReader):
    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state

    def keys(self) -> set[str]:
        return set(self.state)

    def get(self, name: str) -> Tensor:
        return self.state[name]


class SafetensorsReader(TensorReader):
    """A safetensors file, or a folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        files = safetensors_files(self.path)
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> Tensor:
        return self._handles[self._where[name]].get_tensor(name)


class LoraReader(TensorReader):
    """A LoRA expert seen as dense weights: base + scale * B @ A for adapted tensors, the base elsewhere."""

    def __init__(self, adapter: LoraAdapter, base_state: Mapping[str, Tensor], prefix: str = ""):
        keys = set(base_state)
        # An adapter trained on a head-carrying class (bert.encoder...) fits a bare base (encoder...) and back.
        adapter.modules = {align_key(n, keys, prefix) or n: f for n, f in adapter.modules.items()}
        adapter.extra_tensors = {
            n.removeprefix(f"{prefix}.") if prefix else n: t for n, t in adapter.extra_tensors.items()
        }
        adapter.check_against(base_state)
        self.adapter = adapter
        self.base_state = base_state

    def keys(self) -> set[str]:
        return set(self.base_state) | set(self.adapter.extra_tensors)

    def get(self, name: str) -> Tensor:
        if name in self.adapter.extra_tensors:
            return self.adapter.extra_tensors[name]
        base = self.base_state[name]
        if name in self.adapter.modules:
            return base + self.adapter.delta(name).to(base.dtype)
        return base


def safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    return []


def local_path(source: str) -> Path:
    """A local folder/file as is; a Hugging Face hub id downloaded (weights and configs only)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")):
        raise PoolError(f"expert path {source!r} does not exist; fix the path in the experts config")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    snapshot = Path(snapshot_download(source, allow_patterns=patterns))
    if not any(snapshot.glob("*.safetensors")):  # a legacy repo with .bin weights only: fetch those too
        snapshot = Path(snapshot_download(source, allow_patterns=[*patterns, "*.bin"]))
    return snapshot


def open_reader(
    name: str,
    source: str | Path | nn.Module | Mapping[str, Tensor],
    base_state: Mapping[str, Tensor],
    base_config: object | None = None,
    prefix: str = "",
) -> TensorReader:
    """Pick a reader for an expert source; checks the architecture against the base where a config says it."""
    if isinstance(source, nn.Module):
        return StateDictReader(source.state_dict())
    if isinstance(source, Mapping):
        return StateDictReader(source)
    path = local_path(str(source))
    if (path / "adapter_config.json").exists():
        return LoraReader(LoraAdapter.from_folder(path, expert=name), base_state, prefix)
    check_architecture(name, path, base_config)
    if safetensors_files(path):
        return SafetensorsReader(path)
    if path.is_dir():
        # No safetensors (a legacy .bin checkpoint): the one case where the expert is materialised whole.
        from transformers import AutoModel

        log.warning("expert %r has no safetensors weights; loading it whole with from_pretrained", name)
        return StateDictReader(AutoModel.from_pretrained(path).state_dict())
    raise PoolError(
        f"expert {name!r}: cannot read weights from {path}; give a model folder, a .safetensors file "
        "or a PEFT adapter folder"
    )


def check_architecture(name: str, path: Path, base_config: object | None) -> None:
    config_file = path / "config.json" if path.is_dir() else None
    if base_config is None or config_file is None or not config_file.exists():
        return
    expert_type = json.loads(config_file.read_text()).get("model_type")
    base_type = getattr(base_config, "model_type", None)
    if expert_type and base_type and expert_type != base_type:
        raise PoolError(
            f"expert {name!r} is a {expert_type!r} model but the base is {base_type!r}: experts must be fine-tunes "
            "of the base; fix experts.models or experts.base"
        )


def align_key(name: str, expert_keys: set[str], prefix: str) -> str | None:
    """The expert's key for a base tensor name, allowing for a ``base_model_prefix`` added or dropped."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in expert_keys), None)


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
) -> dict[str, Tensor]:
    """Stack ``theta_k - theta_0`` per tensor into ``[K, *shape]`` buffers, one expert tensor read at a time."""
    experts = list(readers)
    keys = {e: r.keys() for e, r in readers.items()}
    stacks = {}
    for name in names:
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
        stacks[name] = stack
    return stacks


def collect_heads(
    readers: Mapping[str, TensorReader], head_patterns: Iterable[str], prefix: str
) -> dict[str, dict[str, Tensor]]:
    """Each expert's task-specific tensors, keyed by the base model's naming (prefix normalised)."""
    heads = {}
    for expert, reader in readers.items():
        tensors = {}
        for key in sorted(reader.keys()):
            base_name = key.removeprefix(f"{prefix}.") if prefix else key
            if matches(base_name, head_patterns):
                tensors[base_name] = reader.get(key).clone()
        heads[expert] = tensors
    return heads


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
) -> ExpertPool:
    """A pool from an instantiated base model and expert sources (folders, files, adapters, modules, state dicts)."""
    if not experts:
        raise PoolError("no experts given; list at least one under experts.models")
    head_patterns = list(head_patterns)
    model.requires_grad_(False)
    base_state = dict(model.named_parameters())  # tied weights once; buffers are not learned, never merged
    prefix = getattr(model, "base_model_prefix", "") or ""
    config = getattr(model, "config", None)
    readers = {name: open_reader(name, src, base_state, config, prefix) for name, src in experts.items()}
    known = set(model.state_dict()) | set(base_state)
    check_no_extra_tensors(readers, known, list(exclude) + head_patterns, prefix)
    names = select_merged_names(base_state, include, exclude, head_patterns)
    task_vectors = build_task_vectors(base_state, readers, names, resolve_dtype(dtype), device, prefix)
    heads = collect_heads(readers, head_patterns, prefix)
    log.info(
        "pool: %d experts, %d merged tensors (%.1fM parameters each)",
        len(readers),
        len(names),
        sum(t[0].numel() for t in task_vectors.values()) / 1e6,
    )
    return ExpertPool(model.to(device), list(readers), task_vectors, heads, base_source)


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
    model = loader(str(local_path(base)), **dict(model_kwargs or {}))
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
