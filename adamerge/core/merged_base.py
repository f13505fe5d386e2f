"""What every merged model shares: the coefficient table, per-task heads, and the protocol the engine relies on.

A merged model runs the frozen base architecture on ``params``, the model's own description of a merge:

- ``MergedModel`` (dense, streamed or low-rank task vectors): ``params`` is ``{tensor name: merged tensor}``, also
  what a static method returns, so a static merge is judged and exported by the same code as a learned one;
- ``LoraMergedModel`` (LoRA experts, never densified): ``params`` is a ``LoraParams`` (the coefficient table, plus
  optional dense overrides), since there are no dense merged tensors to hand around.

The engine and the pipeline only call the protocol: ``merged_tensors(lam)`` (params for a coefficient table,
differentiable), ``expert_params(task)`` (an expert on its own), ``forward(..., task=, params=)``,
``training_leaves`` / ``coefficient_grad`` (the fast exact backward, ``two_stage_backward``), ``merge_and_unload``
and ``export``. Nothing outside a model looks inside its ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.coefficients import Coefficients
from adamerge.core.export import export_model


class TensorBank(nn.Module):
    """Named tensors (dots allowed) held as non-persistent buffers: they follow ``.to()``, stay out of checkpoints."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        self.names = list(tensors)
        for i, t in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", t, persistent=False)

    def __len__(self) -> int:
        return len(self.names)

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f"t{i}") for i in range(len(self.names))]

    def items(self) -> list[tuple[str, Tensor]]:
        return list(zip(self.names, self.tensors()))


class MergedModelBase(nn.Module):
    """The frozen base, the experts' heads and the coefficient table [K, G]; subclasses say how a table merges.

    Args:
        model: the frozen base architecture (theta_0).
        experts: expert names, in coefficient-row order.
        heads: expert -> its task-specific tensors (never merged).
        group_names: the coefficient columns (granularity).
        granularity: how the columns were formed (recorded in exports).
        init, parametrization, clamp: the coefficient table's start and form (``adamerge.core.coefficients``).
    """

    vocab = None  # a VocabUnion when experts added tokens: the export then carries the union tokenizer

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[str],
        heads: Mapping[str, Mapping[str, Tensor]],
        group_names: Sequence[str],
        granularity: str,
        init: float | Sequence[float] | Tensor = 0.3,
        parametrization: str = "identity",
        clamp: tuple[float, float] | None = (0.0, 1.0),
    ):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.experts = list(experts)
        self.group_names = list(group_names)
        self.granularity = granularity
        self.heads = nn.ModuleDict({str(i): TensorBank(heads.get(e, {})) for i, e in enumerate(self.experts)})
        self.coefficients = Coefficients(len(self.experts), len(self.group_names), init, parametrization, clamp)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def device(self) -> torch.device:
        return self.coefficients.raw.device

    def train(self, mode: bool = True) -> MergedModelBase:
        """Only the coefficients train: the frozen base stays in eval mode (no dropout), so steps are deterministic."""
        super().train(mode)
        self.model.eval()
        return self

    def head(self, task: str) -> dict[str, Tensor]:
        if task not in self.experts:
            raise KeyError(f"no expert/head named {task!r}; tasks are {self.experts}")
        return dict(self.heads[str(self.experts.index(task))].items())

    # ------------------------------------------------------------------------------------- merges of a table

    def merged_tensors(self, lam: Tensor | None = None) -> Any:
        """The params of theta(lam) (default: the current coefficients), differentiable w.r.t. ``lam``."""
        raise NotImplementedError

    def constant_params(self, value: float | Tensor) -> Any:
        """Params for a coefficient table filled with ``value`` (0: the base; 0.3: task arithmetic at 0.3; a [K, 1]
        column: one value per expert), without a graph."""
        lam = torch.as_tensor(value, dtype=torch.float32).expand(self.num_experts, len(self.group_names))
        with torch.no_grad():
            return self.merged_tensors(lam.to(self.device))

    def expert_params(self, task: str) -> Any:
        """Params of one expert on its own: theta_0 + tau_task (the one-hot coefficient table)."""
        if task not in self.experts:
            raise KeyError(f"no expert named {task!r}; experts are {self.experts}")
        one_hot = torch.zeros(self.num_experts, 1)
        one_hot[self.experts.index(task)] = 1.0
        return self.constant_params(one_hot)

    # ------------------------------------------------------------------------------------- training contract

    def training_leaves(self, lam: Tensor) -> Any:
        """Params of theta(lam) whose tensors are autograd leaves: the task losses backpropagate into them."""
        raise NotImplementedError

    def coefficient_grad(self, leaves: Any) -> Tensor:
        """d L / d lam [K, G] from the gradients accumulated in ``training_leaves``' leaves (which it clears)."""
        raise NotImplementedError

    def release_training_leaves(self) -> None:
        """Free what ``training_leaves`` keeps between steps, once training is over."""

    # ------------------------------------------------------------------------------------- outputs

    def merge_and_unload(self, task: str | None = None, params: Any = None) -> nn.Module:
        """A plain copy of the base architecture holding the merge (and ``task``'s head): no adamerge needed."""
        raise NotImplementedError

    def export(self, out_dir: str | Path, params: Any = None, record: dict | None = None, source: str | None = None):
        """Write the merge (default: the current coefficients) as a Hugging Face folder with the per-task heads."""
        heads = {task: self.head(task) for task in self.experts}
        return export_model(self.merge_and_unload(params=params), out_dir, heads, record, source, self.vocab)

    # ------------------------------------------------------------------------------------- the table as data

    def coefficient_table(self) -> dict[str, dict[str, float]]:
        """expert -> group -> coefficient, for JSON export and plots."""
        lam = self.coefficients().detach().cpu().tolist()
        return {e: dict(zip(self.group_names, row)) for e, row in zip(self.experts, lam)}

    def load_coefficient_table(self, table: Mapping[str, Mapping[str, float]]) -> None:
        """Inverse of ``coefficient_table``; refuses tables for other experts or groups."""
        if list(table) != self.experts:
            raise ValueError(f"coefficients are for experts {list(table)}, this model merges {self.experts}")
        rows = []
        for expert in self.experts:
            missing = set(self.group_names) - set(table[expert])
            if missing:
                raise ValueError(
                    f"coefficients of {expert!r} lack {len(missing)} group(s), e.g. "
                    f"{sorted(missing)[:3]}; was the run made with another granularity?"
                )
            rows.append([table[expert][g] for g in self.group_names])
        self.coefficients.assign(torch.tensor(rows))


def two_stage_backward(
    model: MergedModelBase,
    run: Callable[[Any], Iterable[Tensor]],
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> list[Tensor]:
    """Backpropagate task losses into ``model.coefficients`` with the merge done once, outside autograd.

    ``run(params)`` yields one loss per task batch, computed on ``params`` (``model.training_leaves``); each is
    backpropagated at once, so only one task's activations live at a time, and the gradients of the leaves
    accumulate over the tasks. Then ``model.coefficient_grad`` turns them into d L / d lam, which goes back through
    the coefficients' parametrisation (clamp or sigmoid). Exact: the merge is linear in lam. Returns the detached
    task losses.
    """
    lam = model.coefficients()
    leaves = model.training_leaves(lam.detach())
    losses = []
    for loss in run(leaves):
        backward(loss)
        losses.append(loss.detach())
    lam.backward(model.coefficient_grad(leaves))
    return losses
