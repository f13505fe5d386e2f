"""Datasets of a task: loading a split (hub, folder, dict of load_dataset kwargs), featurizing once, collating.

Batch keys that start with "_" are metadata for the objective (e.g. "_index": the calibration sample indices that key
cached teacher targets), never passed to the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
META_PREFIX = "_"


def model_inputs(batch: Mapping) -> dict:
    """The part of a batch the model takes (metadata keys dropped)."""
    return {k: v for k, v in batch.items() if not k.startswith(META_PREFIX)}


class DataError(ValueError):
    """Bad data configuration: names the task, the column or split, and the config key to fix."""


def load_split(source, split: str, task: str):
    """A ``datasets.Dataset`` split from an in-memory DatasetDict/dict, a local folder, or a hub name."""
    import datasets

    if isinstance(source, str):
        source = datasets.load_from_disk(source) if _is_saved_dataset(source) else datasets.load_dataset(source)
    if isinstance(source, Mapping) and "path" in source:
        spec = dict(source)
        path = spec.pop("path")
        source = datasets.load_from_disk(path) if _is_saved_dataset(path) else datasets.load_dataset(path, **spec)
    if split not in source:
        raise DataError(
            f"task {task!r}: dataset has no split {split!r} (it has {sorted(source)}); "
            "fix data.calib_split / data.eval_split"
        )
    return source[split]


def _is_saved_dataset(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "dataset_dict.json").exists() or (Path(path) / "state.json").exists()


def featurize(
    dataset,
    task: str,
    tokenizer=None,
    processor=None,
    text_column: str = "text",
    image_column: str = "image",
    max_length: int = 128,
):
    """Tokenize text or process images once; datasets that already hold model inputs pass through."""
    columns = set(dataset.column_names)
    if columns & set(MODEL_INPUTS):
        return dataset
    if tokenizer is not None:
        if text_column not in columns:
            raise DataError(
                f"task {task!r}: no text column {text_column!r} (columns: {sorted(columns)}); set data.text_column"
            )
        return dataset.map(
            lambda b: tokenizer(b[text_column], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=[text_column],
        )
    if processor is not None:
        if image_column not in columns:
            raise DataError(
                f"task {task!r}: no image column {image_column!r} (columns: {sorted(columns)}); set data.image_column"
            )
        return dataset.map(
            lambda b: processor(images=b[image_column], return_tensors="np"),
            batched=True,
            remove_columns=[image_column],
        )
    raise DataError(f"task {task!r}: raw data but no tokenizer or processor; set data.tokenizer or data.processor")


def collate(rows: Sequence[Mapping], keys: Sequence[str], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack the given keys; sequences are right-padded to the longest (attention_mask with 0, ids with pad_id)."""
    out = {}
    for key in keys:
        values = [torch.as_tensor(r[key]) for r in rows]
        if values[0].dim() == 1 and len({v.shape[0] for v in values}) > 1:
            fill = 0 if key != "input_ids" else pad_id
            values = [
                torch.nn.functional.pad(v, (0, max(x.shape[0] for x in values) - v.shape[0]), value=fill)
                for v in values
            ]
        out[key] = torch.stack(values)
    return out
