"""LoRA-native pools: experts that are PEFT LoRA adapters on one base, read as factors (never densified).

``load_lora_pool`` is the ``experts=lora`` entry point; ``LoraMergedModel`` (``adamerge.core.lora_merged``) merges them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.core.adapters import AdapterError, LoraAdapter
from adamerge.core.pool import (
    DEFAULT_HEAD_PATTERNS,
    LoraReader,
    PoolError,
    align_key,
    expert_key,
    import_object,
    local_path,
    matches,
    model_dtype,
    resolve_dtype,
)
from adamerge.progress import progress

log = logging.getLogger(__name__)


@dataclass
class LoraPool:
    """What to merge, LoRA-native: the base model, expert names, their adapters (aligned to the base's tensor names
    and checked against it) and per-expert heads."""

    model: nn.Module
    experts: list[str]
    adapters: dict[str, LoraAdapter]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    base_source: str | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)


def make_lora_pool(
    model: nn.Module,
    experts: Mapping[str, str | Path | LoraAdapter],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    head_patterns: Sequence[str] = DEFAULT_HEAD_PATTERNS,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    base_source: str | None = None,
    check_finite: bool = True,
) -> LoraPool:
    """A LoRA pool from an instantiated base and PEFT adapter folders (or ``LoraAdapter`` objects).

    Args:
        model: the base model the adapters were trained on; frozen, moved to ``device``.
        experts: expert name -> PEFT LoRA adapter folder (or hub id) or a ``LoraAdapter``.
        include / exclude: globs over the adapted tensors' names in the base's naming (``...query.weight``), as for
            the dense pool: an adapted tensor not included, or excluded, keeps the base's value (its factors are
            dropped); other tensors an adapter trains are dropped too when excluded (config keys ``experts.include``
            / ``experts.exclude``).
        head_patterns: globs of task-specific tensors (``modules_to_save``), kept per expert, never merged.
        dtype: storage dtype of the factors (config key ``experts.dtype``).
        device: where the base and the factors live.
        base_source: the base's id/folder (``experts.base``), recorded for exports; an adapter that declares another
            base is merged with a warning.
        check_finite: refuse NaN/inf in factors and heads, naming expert and tensor (``experts.check_finite``).
    """
    if not experts:
        raise AdapterError("no experts given; list at least one LoRA adapter folder under experts.experts")
    include, exclude, head_patterns = list(include), list(exclude), list(head_patterns)
    dtype = resolve_dtype(dtype)
    model.requires_grad_(False)
    base_state = dict(model.named_parameters())
    dtypes = {n: t.dtype for n, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    adapters, heads = {}, {}
    for name, source in progress(experts.items(), "LoRA experts", log, unit="expert"):
        if isinstance(source, LoraAdapter):
            adapter = replace(source, expert=name)
        else:
            path = local_path(str(source), expert_key(name), f"expert {name!r}")
            if not (path / "adapter_config.json").exists():
                raise AdapterError(
                    f"expert {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json); LoRA-native "
                    "merging needs every expert to be a LoRA adapter; use the dense pool (experts=hf) otherwise"
                )
            adapter = LoraAdapter.from_folder(path, expert=name)
        # LoraReader aligns the adapter's names with the base (base_model_prefix added or dropped) and checks shapes.
        adapter = LoraReader(adapter, base_state, prefix).adapter
        adapter.check_base(base_source or getattr(model, "name_or_path", None))
        check_module_types(adapter, model)
        extra = {n: t for n, t in adapter.extra_tensors.items() if not matches(n, exclude)}
        others = sorted(n for n in extra if not matches(n, head_patterns))
        if others:
            raise AdapterError(
                f"expert {name!r}: the adapter trains {len(others)} tensor(s) besides LoRA factors and heads, e.g. "
                f"{others[:3]} (bias='all' or modules_to_save); LoRA-native merging cannot merge them: add their "
                "pattern to experts.head_patterns if they are task-specific, to experts.exclude to keep the base's "
                "values, or use the dense pool (experts=hf)"
            )
        selected = {n: f for n, f in adapter.modules.items() if matches(n, include) and not matches(n, exclude)}
        if check_finite:
            for module, factors in selected.items():
                for which, factor in (("lora_A", factors.A), ("lora_B", factors.B)):
                    if not torch.isfinite(factor).all():
                        raise factor_not_finite(name, f"{module} ({which})", factor)
        modules = {
            n: replace(f, A=f.A.to(device=device, dtype=dtype), B=f.B.to(device=device, dtype=dtype))
            for n, f in selected.items()
        }
        adapters[name] = replace(adapter, modules=modules, extra_tensors=extra)
        heads[name] = {}
        for head, value in extra.items():
            head = align_key(head, set(base_state), prefix) or head
            if value.is_floating_point():
                if check_finite and not torch.isfinite(value).all():
                    raise factor_not_finite(name, f"{head} (head)", value)
                value = value.to(dtypes.get(head, model_dtype(model)))
            heads[name][head] = value.to(device)
    adapted = {n for a in adapters.values() for n in a.modules}
    if not adapted:
        raise AdapterError(
            f"no adapted tensor matches include={include} minus exclude={exclude} in any adapter; fix the patterns "
            "(config keys: experts.include / experts.exclude)"
        )
    sources = {a.base_name_or_path for a in adapters.values() if a.base_name_or_path}
    if len(sources) > 1:
        log.warning("the adapters name different bases %s; their shapes fit the given base, merging anyway", sources)
    log.info("LoRA pool: %d experts, %d adapted modules", len(adapters), len(adapted))
    return LoraPool(model.to(device), list(adapters), adapters, heads, base_source)


def factor_not_finite(expert: str, tensor: str, value: Tensor) -> PoolError:
    return PoolError(
        f"expert {expert!r}: {tensor!r} has {int((~torch.isfinite(value)).sum())} NaN/inf value(s) out of "
        f"{value.numel()} (a diverged fine-tune or a broken conversion); fix the adapter or drop it from "
        f"experts.experts ({expert_key(expert)}), or skip this check with experts.check_finite=false"
    )


def load_lora_pool(
    base: str,
    experts: Mapping[str, str],
    model_class: str = "transformers.AutoModel",
    model_kwargs: Mapping | None = None,
    **pool_kwargs,
) -> LoraPool:
    """Load the base with ``from_pretrained`` (hub id or folder) and read the LoRA adapters on top of it."""
    loader = import_object(model_class)
    path = local_path(str(base), "experts.base", "the base")
    model = getattr(loader, "from_pretrained", loader)(str(path), **dict(model_kwargs or {}))
    return make_lora_pool(model, experts, base_source=base, **pool_kwargs)


def check_module_types(adapter: LoraAdapter, model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for name in adapter.modules:
        module = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(module, nn.Linear | Conv1D):
            raise AdapterError(
                f"expert {adapter.expert!r}: {name!r} belongs to a {type(module).__name__}; LoRA-native merging "
                "handles nn.Linear and GPT-2 Conv1D only; use the dense pool (experts=hf) for this adapter"
            )
