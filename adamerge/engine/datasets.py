"""Datasets of a task: loading a split (hub, folder, dict of load_dataset kwargs), featurizing once, collating.

Batch keys that start with "_" are metadata for the objective (e.g. "_index": the calibration sample indices that key
cached teacher targets), never passed to the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    """A ``datasets.Dataset`` split from an in-memory DatasetDict/dict, a local folder, a hub name, or a dict of
    ``load_dataset`` kwargs (``{path: json, data_files: {validation: a.jsonl}}``).

    Config containers (omegaconf ``DictConfig``/``ListConfig``, as Hydra passes ``data.tasks``) are turned into plain
    Python first: ``datasets`` tells a split -> files mapping from a list of files by its type.
    """
    import datasets

    source = plain(source)
    if isinstance(source, str):
        source = load_saved(source, split, task) if _is_saved_dataset(source) else datasets.load_dataset(source)
    if isinstance(source, Mapping) and "path" in source:
        spec = dict(source)
        path = spec.pop("path")
        if _is_saved_dataset(path):
            source = load_saved(path, split, task)
        else:
            check_data_files(spec.get("data_files"), task)
            try:
                source = datasets.load_dataset(path, **spec)
            except StopIteration as err:  # the json builder's answer to a file with no record
                raise DataError(
                    f"task {task!r}: {path!r} found no record in {spec.get('data_files') or path}; a data file is "
                    f"empty or blank: fill it or fix data.tasks.{task}"
                ) from err
    if split not in source:
        raise DataError(
            f"task {task!r}: dataset has no split {split!r} (it has {sorted(source)}); "
            "fix data.calib_split / data.eval_split"
        )
    return source[split]


def plain(value):
    """omegaconf containers -> dicts and lists, inside plain dicts and lists too; anything else as is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if type(value) is dict:  # not a DatasetDict (a dict subclass): that one is data, not config
        return {k: plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return [plain(v) for v in value]
    return value


def check_data_files(data_files, task: str) -> None:
    """Refuse empty local data files by name: ``datasets`` fails on them with a bare StopIteration or IndexError."""
    if data_files is None:
        return
    by_split = data_files if isinstance(data_files, Mapping) else {"train": data_files}
    for file_split, files in by_split.items():
        for file in [files] if isinstance(files, str) else files:
            path = Path(file).expanduser()
            if path.is_file() and path.stat().st_size == 0:
                raise DataError(
                    f"task {task!r}: data file {file} (split {file_split!r}) is empty; fill it or fix "
                    f"data.tasks.{task}.data_files"
                )


def load_saved(path: str, split: str, task: str):
    """A ``save_to_disk`` folder: only the requested split of a DatasetDict is loaded; an empty one is named."""
    import datasets

    folder = Path(path)
    if not (folder / "dataset_dict.json").exists():
        raise DataError(
            f"task {task!r}: {path} holds a single saved Dataset, not splits; save a DatasetDict with the splits "
            f"data.calib_split and data.eval_split, or fix data.tasks.{task}"
        )
    splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    if split not in splits:
        raise DataError(
            f"task {task!r}: dataset {path} has no split {split!r} (it has {sorted(splits)}); "
            "fix data.calib_split / data.eval_split"
        )
    state = json.loads((folder / split / "state.json").read_text())
    if not state.get("_data_files"):  # saved with no rows: load_from_disk fails with a bare IndexError
        raise DataError(
            f"task {task!r}: split {split!r} saved in {folder / split} is empty (no rows); save it again with data, "
            f"or fix data.tasks.{task}"
        )
    return {split: datasets.load_from_disk(str(folder / split))}


def _is_saved_dataset(path: str) -> bool:
    return (Path(path) / "dataset_dict.json").exists() or (Path(path) / "state.json").exists()


def featurize(
    dataset,
    task: str,
    tokenizer=None,
    processor=None,
    text_column: str = "text",
    image_column: str = "image",
    max_length: int = 128,
    chat: bool = False,
):
    """Tokenize text or process images once; datasets that already hold model inputs pass through.

    With ``chat`` each text is a user turn put through the tokenizer's chat template (``chat_prompts``).
    """
    columns = set(dataset.column_names)
    if columns & set(MODEL_INPUTS):
        return dataset
    if tokenizer is not None:
        if text_column not in columns:
            raise DataError(
                f"task {task!r}: no text column {text_column!r} (columns: {sorted(columns)}); set data.text_column"
            )
        if chat:  # the template writes the special tokens (BOS and turn markers) itself
            return dataset.map(
                lambda b: tokenizer(
                    chat_prompts(tokenizer, b[text_column]),
                    truncation=True,
                    max_length=max_length,
                    add_special_tokens=False,
                ),
                batched=True,
                remove_columns=[text_column],
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


def chat_prompts(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each text as one user turn followed by the assistant's opening: the prompt a chat expert answers."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


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
