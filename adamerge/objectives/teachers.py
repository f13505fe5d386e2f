"""Expert Merging's teacher targets: each expert's outputs on its own calibration samples, as rows.

Expert k is no model of its own but the merged model at the one-hot coefficient table ``lam = e_k``. This module
turns it into targets, computed once per expert and cached in memory or on disk, for the objective in
``adamerge.objectives.alignment``, which only compares the merged model's outputs with them.

Targets are computed once (``build_teacher_cache``): each expert runs once over its calibration set with no grad,
and its logits (full, or the top-k values and ids for large vocabularies) and the selected hidden states are stored
in ``cache_dtype`` (bf16 by default), in memory or in one safetensors file per task read lazily, row by row. No
expert is resident during training: the training batch carries ``_index`` (its calibration sample indices), which
keys the cached rows. ``teacher="online"`` recomputes the same targets on every step instead (the reference the
cache is tested against).

Rows and positions: a target row is one output position of one sample. Sequence-level outputs (a classifier's
``[B, C]`` logits) have one row per sample. Token-level outputs (a causal LM's ``[B, T, V]``, every hidden state)
have one row per supervised position: the attended tokens, or, when the sample has a ``response_mask`` column,
the positions whose next token is a response token (the logits at ``t`` predict token ``t + 1``), so a causal LM
is aligned on its responses only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adamerge.core.pool import resolve_dtype
from adamerge.engine.datasets import MODEL_INPUTS, collate
from adamerge.objectives.entropy import logits_of

log = logging.getLogger(__name__)

LayerSpec = str | int | Sequence[int] | None


def select_layers(spec: LayerSpec, num_hidden_states: int) -> list[int]:
    """Indices into ``outputs.hidden_states`` (index 0 = embeddings, i = after block i).

    ``spec``: ``"all"`` (every block), ``"middle"``, ``"last"``, an int or a list of ints (negative from the end),
    or ``None``/``[]`` (no hidden-state term).
    """
    blocks = num_hidden_states - 1
    if spec is None:
        return []
    if isinstance(spec, str):
        named = {"all": list(range(1, blocks + 1)), "middle": [max(1, (blocks + 1) // 2)], "last": [blocks]}
        if spec not in named:
            raise ValueError(
                f"unknown layer selection {spec!r}; use 'all', 'middle', 'last' or a list of ints "
                "(config key: objective.layers)"
            )
        return named[spec]
    layers = [int(spec)] if isinstance(spec, int) else [int(i) for i in spec]
    out = []
    for i in layers:
        j = i + num_hidden_states if i < 0 else i
        if not 0 <= j < num_hidden_states:
            raise ValueError(
                f"hidden-state layer {i} out of range: the model returns {num_hidden_states} hidden states "
                "(config key: objective.layers)"
            )
        out.append(j)
    return out


def sample_positions(row: Mapping) -> Tensor:
    """The supervised token positions of one calibration sample (see the module docstring)."""
    if "response_mask" in row:
        response = torch.as_tensor(row["response_mask"]).bool()
        return (response[1:]).nonzero().flatten()  # logits at t predict token t + 1
    if "attention_mask" in row:
        return torch.as_tensor(row["attention_mask"]).bool().nonzero().flatten()
    return torch.arange(len(row["input_ids"]))


def batch_rows(positions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(batch row, position) of every token row, samples in batch order."""
    rows = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)])
    return rows, torch.cat([p.long() for p in positions])


@dataclass
class Targets:
    """One task batch's teacher outputs as rows: ``logits`` [R or B, V] (or top-k ``values`` + ``ids``) and
    ``hidden`` [R, L, H]; ``rows``/``positions`` locate the token rows in the batch."""

    rows: Tensor
    positions: Tensor
    logits: Tensor | None = None
    ids: Tensor | None = None
    hidden: Tensor | None = None
    token_logits: bool = False


def output_rows(outputs, rows: Tensor, positions: Tensor, layers: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """A model output's logits and selected hidden states at the supervised rows: ([R or B, V], [R, L, H])."""
    logits = logits_of(outputs)
    if logits.dim() == 3:  # (B, T, V): token-level
        logits = logits[rows, positions]
    hidden = None
    if layers:
        states = getattr(outputs, "hidden_states", None)
        if states is None:
            raise ValueError(
                "the model output has no hidden_states: the merged model must be called with "
                "output_hidden_states=True (ExpertAlignment.model_kwargs), or set objective.layers=null"
            )
        hidden = torch.stack([states[j][rows, positions] for j in layers], 1)  # (R, L, H)
    return logits, hidden


def top_k_logits(logits: Tensor, top_k: int | None) -> tuple[Tensor, Tensor | None]:
    if top_k is None or top_k >= logits.shape[-1]:
        return logits, None
    values, ids = logits.topk(top_k, dim=-1)
    return values, ids


@torch.no_grad()
def expert_targets(
    merged, task: str, inputs: Mapping[str, Tensor], positions: Sequence[Tensor], layers, top_k: int | None
) -> Targets:
    """Expert ``task`` (= the merged model at the one-hot table for ``task``) on a batch, as target rows."""
    k = merged.experts.index(task)
    one_hot = torch.zeros_like(merged.coefficients())
    one_hot[k] = 1.0
    kwargs = {"output_hidden_states": True} if layers else {}
    model_in = {n: v for n, v in inputs.items() if n in MODEL_INPUTS}
    outputs = merged(**model_in, **kwargs, task=task, params=merged.merged_tensors(one_hot))
    rows, pos = batch_rows(positions)
    rows, pos = rows.to(model_in["input_ids"].device), pos.to(model_in["input_ids"].device)
    logits, hidden = output_rows(outputs, rows, pos, layers)
    values, ids = top_k_logits(logits, top_k)
    return Targets(rows, pos, values, ids, hidden, token_logits=logits_of(outputs).dim() == 3)


class TaskStore:
    """One task's cached rows, in memory (tensors) or on disk (lazy safetensors slices)."""

    def __init__(self, tensors: Mapping, meta: Mapping):
        self.tensors = tensors
        self.offsets = torch.as_tensor(tensors["offsets"][:])
        self.positions = torch.as_tensor(tensors["positions"][:])
        self.token_logits = bool(meta["token_logits"])

    def slice(self, name: str, spans: Sequence[tuple[int, int]]) -> Tensor | None:
        if name not in self.tensors:
            return None
        return torch.cat([self.tensors[name][a:b] for a, b in spans])

    def lookup(self, index: Tensor) -> Targets:
        index = index.tolist()
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in index]
        positions = [self.positions[a:b] for a, b in spans]
        rows, pos = batch_rows(positions)
        logit_spans = spans if self.token_logits else [(i, i + 1) for i in index]
        logits, ids = self.slice("logits", logit_spans), self.slice("ids", logit_spans)
        return Targets(rows, pos, logits, ids, self.slice("hidden", spans), self.token_logits)


class TeacherCache:
    """Teacher targets of every task, keyed by calibration sample index (the batches' ``_index``)."""

    def __init__(self, stores: Mapping[str, TaskStore], layers: Sequence[int], top_k: int | None):
        self.stores, self.layers, self.top_k = dict(stores), list(layers), top_k

    def targets(self, task: str, batch: Mapping[str, Tensor]) -> Targets:
        if "_index" not in batch:
            raise KeyError("the batch has no '_index' metadata: cached targets need the calibration sample indices")
        return self.stores[task].lookup(batch["_index"])

    def nbytes(self) -> int:
        """Bytes held in memory (a disk-backed cache holds only offsets and positions)."""
        total = 0
        for store in self.stores.values():
            for t in store.tensors.values():
                total += t.numel() * t.element_size() if isinstance(t, Tensor) else 0
        return total


class OnlineTeacher:
    """The reference for the cache: the expert runs on every training batch (same targets, recomputed)."""

    def __init__(self, merged, datasets: Mapping, layers: Sequence[int], top_k: int | None):
        self.merged, self.datasets, self.layers, self.top_k = merged, datasets, list(layers), top_k

    def targets(self, task: str, batch: Mapping[str, Tensor]) -> Targets:
        positions = [sample_positions(self.datasets[task][int(i)]) for i in batch["_index"]]
        return expert_targets(self.merged, task, batch, positions, self.layers, self.top_k)


def build_teacher_cache(
    merged,
    datasets: Mapping,
    layers: LayerSpec = "middle",
    top_k: int | None = None,
    dtype: str | torch.dtype = "bfloat16",
    batch_size: int = 8,
    pad_id: int = 0,
    path: str | Path | None = None,
) -> TeacherCache:
    """Run each expert once over its calibration set (no grad) and keep its target rows.

    Args:
        merged: the ``MergedModel``; expert k is run as the merged model at the one-hot table for k.
        datasets: task -> calibration dataset (rows with model inputs; optional ``response_mask``), indexed as the
            training batches' ``_index``.
        layers: hidden states to keep (see ``select_layers``); resolved against the model's output.
        top_k: keep only the top-k logits per row (large vocabularies); ``None`` keeps all.
        dtype: storage dtype of logits and hidden states (config key ``objective.cache_dtype``).
        batch_size: samples per teacher forward.
        pad_id: right-padding id of input_ids.
        path: a folder: write one ``<task>.safetensors`` per task there and read rows from it lazily; ``None``
            keeps everything in memory.
    """
    dtype = resolve_dtype(dtype)
    device = merged.coefficients.raw.device
    was_training = merged.training
    merged.eval()
    resolved: list[int] | None = None
    stores = {}
    try:
        for task, dataset in datasets.items():
            if task not in merged.experts:
                raise KeyError(f"calibration task {task!r} has no expert; experts are {merged.experts}")
            keys = [c for c in dataset.column_names if c in MODEL_INPUTS]
            parts: dict[str, list[Tensor]] = {"logits": [], "ids": [], "hidden": []}
            lengths, all_positions, token_logits = [], [], False
            for start in range(0, len(dataset), batch_size):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                inputs = {k: v.to(device) for k, v in collate(rows, keys, pad_id).items()}
                positions = [sample_positions(r) for r in rows]
                if resolved is None:
                    resolved = probe_layers(merged, task, inputs, layers)
                t = expert_targets(merged, task, inputs, positions, resolved, top_k)
                token_logits = t.token_logits
                parts["logits"].append(t.logits.to(dtype).cpu())
                if t.ids is not None:
                    parts["ids"].append(t.ids.to(torch.int32).cpu())  # vocabularies < 2^31: half the bytes
                if t.hidden is not None:
                    parts["hidden"].append(t.hidden.to(dtype).cpu())
                lengths += [len(p) for p in positions]
                all_positions += positions
            tensors = {name: torch.cat(p) for name, p in parts.items() if p}
            tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])
            tensors["positions"] = torch.cat(all_positions).long()
            meta = {"token_logits": token_logits, "layers": resolved, "top_k": top_k}
            stores[task] = (
                save_store(tensors, meta, Path(path) / f"{task}.safetensors") if path else TaskStore(tensors, meta)
            )
            log.info("teacher cache %s: %d samples, %d token rows", task, len(dataset), int(tensors["offsets"][-1]))
    finally:
        merged.train(was_training)
    return TeacherCache(stores, resolved or [], top_k)


def probe_layers(merged, task: str, inputs: Mapping[str, Tensor], spec: LayerSpec) -> list[int]:
    """Resolve a layer spec against the number of hidden states the model returns."""
    if spec is None or (not isinstance(spec, str | int) and len(spec) == 0):
        return []
    with torch.no_grad():
        model_in = {n: v[:1] for n, v in inputs.items() if n in MODEL_INPUTS}
        states = merged(**model_in, output_hidden_states=True, task=task).hidden_states
    return select_layers(spec, len(states))


def save_store(tensors: Mapping[str, Tensor], meta: Mapping, file: Path) -> TaskStore:
    """Write one task's rows to safetensors and reopen them lazily (rows are read per sample)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"meta": json.dumps(meta)})
    handle = safe_open(str(file), framework="pt")
    return TaskStore({k: handle.get_slice(k) for k in handle.keys()}, json.loads(handle.metadata()["meta"]))
