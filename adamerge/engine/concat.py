"""One forward over every task's batch: the task batches concatenated, each task's own head run on its own rows.

Why: a training step sees one batch per task. On a GPU, K small batches leave it idle between kernels and one batch
K times larger is faster; on a CPU it may be slower (``MergeModule``'s ``backward=auto`` times both and keeps the
faster). The merged body is the same for every task, only the heads differ: a forward hook on each head module
runs it once per task on that task's rows with that task's head tensors, and the outputs are split back per task.
Heads of different widths (8 tasks with their own class counts) are zero-padded to the widest and trimmed again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.engine.datasets import model_inputs


def concatenable(batches: Mapping[str, Mapping]) -> bool:
    """True when every task batch has the same keys and tensor shapes beyond the batch dimension."""
    inputs = [model_inputs(b) for b in batches.values()]
    if len(inputs) < 2 or any(b.keys() != inputs[0].keys() for b in inputs):
        return False
    for key, first in inputs[0].items():
        for other in (b[key] for b in inputs[1:]):
            if isinstance(first, Tensor) != isinstance(other, Tensor):
                return False
            if isinstance(first, Tensor):
                if first.dim() == 0 or first.shape[1:] != other.shape[1:] or first.dtype != other.dtype:
                    return False
            elif first != other:
                return False
    return True


def take_rows(value, start: int, stop: int, total: int):
    """Rows [start, stop) of every tensor (or tuple of tensors) whose first dimension is the joint batch."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() >= 1 and value.shape[0] == total else value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, start, stop, total) for v in value)
    return value


def trim_logits(outputs, width: int):
    """The model output with its logits cut back to the task head's width (undoes the padding of ``task_heads``)."""
    if isinstance(outputs, Tensor):
        return outputs[..., :width]
    if hasattr(outputs, "logits") and outputs.logits is not None:
        outputs["logits"] = outputs.logits[..., :width]
    return outputs


def head_modules(merged: nn.Module, task: str) -> dict[str, dict[str, Tensor]]:
    """module name -> {local tensor name: tensor} of ``task``'s head."""
    modules: dict[str, dict[str, Tensor]] = {}
    for name, tensor in merged.head(task).items():
        module, _, local = name.rpartition(".")
        modules.setdefault(module, {})[local] = tensor
    return modules


@contextmanager
def task_heads(merged: nn.Module, spans: list[tuple[str, int, int]], total: int) -> Iterator[dict[str, int]]:
    """While open, every head module of ``merged.model`` runs per task on that task's rows with its own tensors.

    Yields the output width of each task's head (filled during the forward), for ``trim_logits``.
    """
    per_task = {task: head_modules(merged, task) for task, _, _ in spans}
    names = sorted({m for heads in per_task.values() for m in heads})
    if "" in names:
        raise ValueError("a head tensor sits on the model's root module; task batches cannot share one forward")
    widths: dict[str, int] = {}
    busy = set()

    def make_hook(module_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if module_name in busy:  # the per-task calls below go through this same hook
                return None
            busy.add(module_name)
            try:
                pieces = []
                for task, start, stop in spans:
                    local = per_task[task].get(module_name, {})
                    piece = functional_call(
                        module, local, take_rows(args, start, stop, total), take_rows(kwargs, start, stop, total)
                    )
                    widths[task] = piece.shape[-1]
                    pieces.append(piece)
            finally:
                busy.discard(module_name)
            widest = max(p.shape[-1] for p in pieces)
            return torch.cat([nn.functional.pad(p, (0, widest - p.shape[-1])) for p in pieces])

        return hook

    handles = [
        merged.model.get_submodule(name).register_forward_hook(make_hook(name), with_kwargs=True) for name in names
    ]
    try:
        yield widths
    finally:
        for handle in handles:
            handle.remove()


def forward_concatenated(merged: nn.Module, batches: Mapping[str, Mapping], params, **kwargs) -> dict | None:
    """task -> model output, from one forward over the concatenated task batches; ``None`` if they cannot be joined.

    ``merged`` is a ``MergedModel`` or ``LoraMergedModel`` (anything with ``model``, ``head(task)`` and
    ``forward(*, task, params)``); ``kwargs`` go to every forward (e.g. ``output_hidden_states``).
    """
    if not concatenable(batches):
        return None
    inputs = [model_inputs(b) for b in batches.values()]
    spans, start = [], 0
    for task, b in zip(batches, inputs):
        size = next(v.shape[0] for v in b.values() if isinstance(v, Tensor))
        spans.append((task, start, start + size))
        start += size
    joined = {k: torch.cat([b[k] for b in inputs]) if isinstance(v, Tensor) else v for k, v in inputs[0].items()}
    with task_heads(merged, spans, start) as widths:
        outputs = merged(**joined, **kwargs, task=None, params=params)
    result = {}
    for task, begin, end in spans:
        if isinstance(outputs, Tensor):
            part = outputs[begin:end]
        elif isinstance(outputs, Mapping):  # a Hugging Face ModelOutput
            part = type(outputs)(**{k: take_rows(v, begin, end, start) for k, v in outputs.items()})
        else:
            part = take_rows(outputs, begin, end, start)
        result[task] = trim_logits(part, widths[task]) if task in widths else part
    return result
