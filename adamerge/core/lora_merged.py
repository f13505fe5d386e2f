"""LoRA-native merging: experts that are LoRA adapters on one base are merged without ever forming a dense delta.

Per adapted module the merged forward is ``W0 x + sum_k lam[k, g] * s_k * B_k (A_k x)`` (AdaMerging,
https://arxiv.org/abs/2310.02575, and Expert Merging alike: only the coefficient granularity differs). The factors of
all experts are concatenated along the rank (``A_cat = [A_1; ...; A_K]``, ``B_cat = [B_1, ..., B_K]``), so the
low-rank term is two skinny matmuls with a per-rank-row weight ``lam[expert(row)] * s_expert(row)`` in between;
ranks may differ per expert and an expert that does not adapt a module simply has no rows there.

The base model stays a plain model: the low-rank terms are added by forward hooks that live only for the duration of
one ``forward``, and heads (``modules_to_save``) are swapped in with ``functional_call`` as in ``MergedModel``.

Contract of ``params`` (what ``merged_tensors`` returns and ``forward``/``merge_and_unload`` take): there are no
dense merged tensors here, so ``params`` is a ``LoraParams``: the [K, G] coefficient table (differentiable),
optionally with dense overrides by tensor name. ``MergeModule`` works unchanged in every backward mode: ``split``
backpropagates each task into a detached leaf copy of ``lam`` and then once through the parametrisation, which is
exact and keeps one task's activations alive at a time.

Exports: ``merge_and_unload`` gives the dense merged model; ``export_peft_adapter`` writes one PEFT LoRA adapter that
reproduces the merge exactly (rank ``r_tot = sum_k r_k``: ``A_cat`` and ``B_cat`` scaled by ``lam_k s_k`` per rank
block, with ``lora_alpha = r`` so PEFT's scale is 1).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from adamerge.atomic import atomic_path
from adamerge.core.adapters import PEFT_PREFIX, AdapterError, LoraAdapter
from adamerge.core.coefficients import DEFAULT_BLOCK_PATTERN, group_layout
from adamerge.core.export import assign_tensor
from adamerge.core.merged_base import MergedModelBase

if TYPE_CHECKING:
    from adamerge.core.lora_pool import LoraPool

log = logging.getLogger(__name__)

LORA_GRANULARITIES = ("task", "layer", "block")


@dataclass(frozen=True)
class LoraParams:
    """A LoRA merge as the model runs it: the coefficient table ``lam`` [K, G] and dense overrides by tensor name."""

    lam: Tensor
    tensors: Mapping[str, Tensor] = field(default_factory=dict)


class LoraStack(nn.Module):
    """One adapted module's factors of all experts, concatenated along the rank.

    ``A`` (R, in), ``B`` (out, R), ``expert`` (R,) the expert owning each rank row, ``scale`` (R,) its LoRA scale;
    R = sum of the ranks of the experts that adapt this module. ``transposed``: the base weight is (in, out) (Conv1D).
    """

    def __init__(self, A: Tensor, B: Tensor, expert: Tensor, scale: Tensor, transposed: bool):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("expert", expert, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.transposed = transposed

    @classmethod
    def from_adapters(cls, name: str, adapters: Sequence[LoraAdapter | None], transposed: bool) -> LoraStack:
        present = [(k, a.modules[name]) for k, a in enumerate(adapters) if a is not None and name in a.modules]
        A = torch.cat([f.A for _, f in present])
        B = torch.cat([f.B for _, f in present], dim=1)
        expert = torch.cat([torch.full((f.A.shape[0],), k, dtype=torch.long) for k, f in present]).to(A.device)
        scale = torch.cat([torch.full((f.A.shape[0],), float(f.scale)) for _, f in present]).to(A.device)
        return cls(A, B, expert, scale, transposed)

    def row_weights(self, lam: Tensor) -> Tensor:
        """lam [K] -> the weight of each rank row, lam[expert(row)] * s(row): (R,)."""
        return lam.index_select(0, self.expert).to(self.scale.dtype) * self.scale

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        h = F.linear(x.to(self.A.dtype), self.A)  # (..., R)
        return F.linear(h * weights.to(h.dtype), self.B)  # (..., out)

    def delta(self, weights: Tensor) -> Tensor:
        """The dense delta sum_k lam_k s_k B_k A_k in the base weight's layout."""
        delta = (self.B.float() * weights.float()) @ self.A.float()  # (out, in)
        return delta.T if self.transposed else delta


class LoraMergedModel(MergedModelBase):
    """Frozen base + per-module stacked LoRA factors + coefficients, under the protocol of ``MergedModelBase``.

    Args:
        pool: a ``LoraPool`` (``make_lora_pool`` / ``load_lora_pool``).
        granularity: ``task`` (one coefficient per expert), ``layer`` (per expert per adapted module) or ``block``
            (per expert per transformer block) (config key ``method.granularity``).
        init, parametrization, clamp: as for ``MergedModel`` (config keys ``method.init`` ...).
        block_pattern: regex whose group 1 names a module's block.
    """

    def __init__(
        self,
        pool: LoraPool,
        granularity: str = "layer",
        init: float | Sequence[float] | Tensor = 0.3,
        parametrization: str = "identity",
        clamp: tuple[float, float] | None = (0.0, 1.0),
        block_pattern: str = DEFAULT_BLOCK_PATTERN,
        chunks: int | Mapping[str, int] = 1,
    ):
        if granularity not in LORA_GRANULARITIES:
            raise ValueError(
                f"granularity {granularity!r} is not available for LoRA experts; choose one of {LORA_GRANULARITIES} "
                "(config key: method.granularity)"
            )
        if chunks != 1:
            raise ValueError("chunks apply to chunk granularity only; leave method.chunks at 1 for LoRA experts")
        from transformers.pytorch_utils import Conv1D

        adapted = {n for a in pool.adapters.values() for n in a.modules}
        names = [n for n, _ in pool.model.named_parameters() if n in adapted]  # the base's order
        if not names:
            raise AdapterError(f"the adapters of {list(pool.experts)} adapt no module of the base; nothing to merge")
        group_names, layout = group_layout(names, granularity, block_pattern)
        super().__init__(pool.model, pool.experts, pool.heads, group_names, granularity, init, parametrization, clamp)
        self.base_source = pool.base_source
        self.names, self.layout = names, layout
        adapters = [pool.adapters[e] for e in self.experts]
        # Conv1D holds its weight as (in, out): its dense delta is the transpose of B @ A.
        transposed = [isinstance(self.model.get_submodule(module_of(n)), Conv1D) for n in self.names]
        self.stacks = nn.ModuleList(LoraStack.from_adapters(n, adapters, t) for n, t in zip(self.names, transposed))

    def merged_tensors(self, lam: Tensor | None = None) -> LoraParams:
        """The coefficient table stands in for merged tensors (see the module docstring)."""
        return LoraParams(self.coefficients() if lam is None else lam)

    def training_leaves(self, lam: Tensor) -> LoraParams:
        """The coefficient table as the one leaf ``two_stage_backward`` backpropagates the task losses into."""
        return LoraParams(lam.detach().requires_grad_())

    def coefficient_grad(self, leaves: LoraParams) -> Tensor:
        grad = leaves.lam.grad
        return self.coefficients.raw.new_zeros(self.coefficients.raw.shape) if grad is None else grad

    def split_params(self, params: LoraParams | None) -> tuple[Tensor, dict[str, Tensor]]:
        params = self.merged_tensors() if params is None else params
        if not isinstance(params, LoraParams):
            raise TypeError(
                f"a LoraMergedModel runs on LoraParams (its merged_tensors(lam)), got {type(params).__name__}: "
                "dense merged tensors need the dense MergedModel"
            )
        expected = (self.num_experts, len(self.group_names))
        if tuple(params.lam.shape) != expected:
            raise ValueError(
                f"coefficient table has shape {tuple(params.lam.shape)}, expected {expected} (experts x groups)"
            )
        return params.lam, dict(params.tensors)

    def row_weights(self, lam: Tensor) -> list[Tensor]:
        return [stack.row_weights(lam[:, cols[0]]) for stack, cols in zip(self.stacks, self.layout)]

    @contextmanager
    def low_rank_terms(self, lam: Tensor) -> Iterator[None]:
        """Add ``sum_k lam_k s_k B_k A_k x`` to every adapted module's output while the context is open."""
        handles = []
        try:
            for name, stack, weights in zip(self.names, self.stacks, self.row_weights(lam)):
                module = self.model.get_submodule(module_of(name))
                handles.append(module.register_forward_hook(low_rank_hook(stack, weights)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, *args, task: str | None = None, params: LoraParams | None = None, **kwargs):
        """Run the base with the lam-weighted low-rank terms (``params``: see the module docstring) and ``task``'s head."""
        lam, tensors = self.split_params(params)
        if task is not None:
            tensors |= self.head(task)
        with self.low_rank_terms(lam):
            return functional_call(self.model, tensors, args, kwargs, strict=False)

    @torch.no_grad()
    def merge_and_unload(self, task: str | None = None, params: LoraParams | None = None) -> nn.Module:
        """A plain copy of the base holding W0 + sum_k lam_k s_k B_k A_k (and ``task``'s head): no adamerge needed."""
        lam, tensors = self.split_params(params)
        model = copy.deepcopy(self.model)
        for name, stack, weights in zip(self.names, self.stacks, self.row_weights(lam)):
            base = model.get_parameter(name)
            assign_tensor(model, name, base + stack.delta(weights).to(base.dtype))
        if task is not None:
            tensors |= self.head(task)
        for name, value in tensors.items():
            assign_tensor(model, name, value.detach())
        return model

    def export(self, out_dir: str | Path, params: LoraParams | None = None, record=None, source=None) -> Path:
        """The dense merged model with its heads (as every merged model), plus ``adapter/``: the exact PEFT adapter."""
        out_dir = super().export(out_dir, params, record, source)
        self.export_peft_adapter(Path(out_dir) / "adapter", params=params)
        return out_dir

    @torch.no_grad()
    def peft_adapter(self, task: str | None = None, params: LoraParams | None = None):
        """The merge as one PEFT LoRA adapter: (``LoraConfig``, state dict in PEFT's saved naming)."""
        from peft import LoraConfig

        lam, tensors = self.split_params(params)
        if tensors:
            raise ValueError(
                f"dense overrides {sorted(tensors)[:3]} cannot go into a LoRA adapter; use merge_and_unload"
            )
        state, ranks = {}, {}
        for name, stack, weights in zip(self.names, self.stacks, self.row_weights(lam)):
            module = module_of(name)
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = stack.A.contiguous().cpu()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (stack.B * weights.to(stack.B.dtype)).contiguous().cpu()
            ranks[module] = stack.A.shape[0]
        head = self.head(task) if task is not None else {}
        for name, value in head.items():
            state[f"{PEFT_PREFIX}{name}"] = value.detach().contiguous().cpu()
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        # lora_alpha = r per module: PEFT's scale alpha / r is exactly 1, the lam_k s_k are folded into B.
        pattern = {re.escape(m): rank for m, rank in ranks.items() if rank != r}
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            target_modules=list(ranks),
            fan_in_fan_out=all(stack.transposed for stack in self.stacks),
            modules_to_save=sorted({module_of(n) for n in head}) or None,
            lora_dropout=0.0,
            base_model_name_or_path=self.base_source,
        )
        return config, state

    def export_peft_adapter(
        self, out_dir: str | Path, task: str | None = None, params: LoraParams | None = None
    ) -> Path:
        """Write the merge as a PEFT LoRA adapter folder; ``PeftModel.from_pretrained(base, out_dir)`` reproduces it.

        Args:
            out_dir: the adapter folder (written atomically).
            task: whose head goes into ``modules_to_save`` (the base must then have that head's number of labels).
            params: the coefficient table to export (default: the current coefficients).
        """
        from safetensors.torch import save_file

        config, state = self.peft_adapter(task, params)
        out_dir = Path(out_dir)
        with atomic_path(out_dir, directory=True) as tmp:
            config.save_pretrained(str(tmp))
            save_file(state, str(tmp / "adapter_model.safetensors"))
        log.info("exported the merge as a rank-%d PEFT LoRA adapter to %s", config.r, out_dir)
        return out_dir


def module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def low_rank_hook(stack: LoraStack, weights: Tensor):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + stack(args[0], weights).to(output.dtype)

    return hook
