"""Small real text-classification tasks shipped with adamerge, for offline demos, benchmarks and slow tests.

Each task is ``<name>.jsonl.gz`` in :data:`TEXT_TASKS_DIR` (rows ``{"text", "label", "split"}``) with its class names
in ``tasks.json``; ``PROVENANCE.md`` beside them gives sources and licences. ``scripts/build_text_tasks.py`` builds
them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import datasets

TEXT_TASKS_DIR = Path(__file__).resolve().parent / "assets" / "text_tasks"
SPLITS = ("train", "calib", "test")


def _index(data_dir: Path) -> dict[str, dict]:
    path = Path(data_dir) / "tasks.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Names of the tasks in ``data_dir`` (default: the shipped ones), sorted."""
    return sorted(_index(Path(data_dir or TEXT_TASKS_DIR)))


def _find(name: str, data_dir: str | Path | None) -> tuple[Path, dict]:
    """The folder and its index, or an error naming the tasks there and the two keys that choose them."""
    data_dir = Path(data_dir or TEXT_TASKS_DIR)
    index = _index(data_dir)
    if name not in index:
        where = "no tasks.json there" if not (data_dir / "tasks.json").is_file() else ", ".join(sorted(index))
        raise ValueError(
            f"unknown text task {name!r} in {data_dir} (available: {where}); fix experts.tasks, or point "
            "experts.data_dir at the folder that holds it (built with scripts/build_text_tasks.py --out)"
        )
    return data_dir, index


def task_fingerprint(name: str, data_dir: str | Path | None = None) -> str:
    """A short hash of a task's rows and class names: the expert cache is keyed on it, so changed data retrains.

    The parsed rows are hashed in a canonical form, not the file's bytes: gzip headers carry a timestamp and JSON
    writers differ in spacing, so the same rows written again keep their hash.
    """
    data_dir, index = _find(name, data_dir)
    digest = hashlib.sha256(json.dumps(index[name]["classes"]).encode())
    with gzip.open(data_dir / f"{name}.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            digest.update(json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:8]


def load_task(name: str, data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """One task as a ``DatasetDict`` with splits train/calib/test and columns ``text`` and ``label`` (ClassLabel).

    Args:
        name: a task from :func:`available_tasks`.
        data_dir: folder holding ``tasks.json`` and the task files; default :data:`TEXT_TASKS_DIR`. Point it at a
            folder built with ``scripts/build_text_tasks.py --out`` for tasks that are not shipped (``bbc_news``).
    """
    data_dir, index = _find(name, data_dir)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=index[name]["classes"])}
    )
    columns: dict[str, dict[str, list]] = {s: {"text": [], "label": []} for s in SPLITS}
    with gzip.open(data_dir / f"{name}.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            columns[row["split"]]["text"].append(row["text"])
            columns[row["split"]]["label"].append(row["label"])
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(columns[s], features=features) for s in SPLITS})


def text_tasks_datamodule(tasks: list[str], tokenizer=None, data_dir: str | Path | None = None, **datamodule_kwargs):
    """A :class:`adamerge.engine.data.MergeDataModule` over shipped tasks: unlabelled ``calib`` to learn, ``test`` to judge.

    Args:
        tasks: task names (each needs an expert of the same name).
        tokenizer: a name/folder or tokenizer object; None = the packaged all-MiniLM-L6-v2's.
        data_dir: where the task files are (default: the shipped ones).
        datamodule_kwargs: the rest of ``MergeDataModule`` (batch_size, max_length, num_steps, eval_split, ...).
    """
    from adamerge.engine.data import MergeDataModule
    from adamerge.testbeds.assets import minilm_path

    if tokenizer is None:
        tokenizer = minilm_path()
    datamodule_kwargs = {"calib_split": "calib", "eval_split": "test", **datamodule_kwargs}
    return MergeDataModule(tasks={t: load_task(t, data_dir) for t in tasks}, tokenizer=tokenizer, **datamodule_kwargs)
