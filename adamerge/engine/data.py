"""Calibration and evaluation data: one stream per task, preprocessed once, a batch of every task at each step.

The training stream is indexed by the global step: step ``i`` always sees the same batches (a seeded permutation
per task and pass), so a run resumed from a checkpoint continues exactly where it stopped. Labels are stripped from
the training batches: the objective never sees them; they serve evaluation only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from adamerge.engine.datasets import MODEL_INPUTS, DataError, collate, featurize, load_split

log = logging.getLogger(__name__)


class StepBatches(Dataset):
    """Item ``i`` = the batches of every task for training step ``i`` (without labels)."""

    def __init__(self, tasks: Mapping, batch_size: int, num_steps: int, seed: int, pad_id: int = 0, start: int = 0):
        self.tasks, self.batch_size, self.num_steps = tasks, batch_size, num_steps
        self.seed, self.pad_id, self.start = seed, pad_id, start
        self.keys = {t: [c for c in ds.column_names if c in MODEL_INPUTS] for t, ds in tasks.items()}

    def __len__(self) -> int:
        return max(self.num_steps - self.start, 0)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a handful of permutations per run
    def permutation(self, task_index: int, epoch: int) -> torch.Tensor:
        n = len(self.tasks[list(self.tasks)[task_index]])
        return torch.randperm(
            n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + task_index * 7919 + epoch)
        )

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        step = self.start + i
        out = {}
        for t_idx, (task, ds) in enumerate(self.tasks.items()):
            n = len(ds)
            positions = range(step * self.batch_size, (step + 1) * self.batch_size)
            idx = [int(self.permutation(t_idx, p // n)[p % n]) for p in positions]
            out[task] = collate([ds[j] for j in idx], self.keys[task], self.pad_id)
            out[task]["_index"] = torch.tensor(idx)
        return out


class MergeDataModule(L.LightningDataModule):
    """Per-task unlabeled calibration streams for training and labeled splits for evaluation.

    Args:
        tasks: task name -> dataset source (an in-memory ``DatasetDict``, a ``save_to_disk`` folder, a hub name,
            or a dict with ``path`` and ``load_dataset`` kwargs).
        tokenizer / processor: a name/path (loaded with ``AutoTokenizer``/``AutoProcessor``) or an object.
        calib_split / eval_split: split names for training (unlabeled) and evaluation (labeled).
        batch_size: calibration samples per task per step (AdaMerging: 16).
        num_steps: training steps; the stream is indexed by step so resuming is exact.
        max_calib / max_eval: optional caps on the number of examples per task.
    """

    def __init__(
        self,
        tasks: Mapping,
        tokenizer=None,
        processor=None,
        calib_split: str = "calib",
        eval_split: str = "test",
        text_column: str = "text",
        image_column: str = "image",
        label_column: str = "label",
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_steps: int = 500,
        max_calib: int | None = None,
        max_eval: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if not tasks:
            raise DataError("no tasks given; list them under data.tasks")
        self.sources = dict(tasks)
        self.tokenizer = _load(tokenizer, "AutoTokenizer")
        self.processor = _load(processor, "AutoProcessor")
        self.calib_split, self.eval_split = calib_split, eval_split
        self.text_column, self.image_column, self.label_column = text_column, image_column, label_column
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_steps, self.max_calib, self.max_eval = num_steps, max_calib, max_eval
        self.num_workers, self.seed = num_workers, seed
        self.calib: dict = {}
        self.eval: dict = {}
        self.start_step = 0

    @property
    def task_names(self) -> list[str]:
        return list(self.sources)

    @property
    def pad_id(self) -> int:
        return getattr(self.tokenizer, "pad_token_id", None) or 0

    def setup(self, stage: str | None = None) -> None:
        if self.calib:
            return
        for task, source in self.sources.items():
            calib = self._prepare(load_split(source, self.calib_split, task), task, self.max_calib)
            if len(calib) == 0:
                raise DataError(f"task {task!r}: the calibration split {self.calib_split!r} is empty")
            self.calib[task] = calib.remove_columns([c for c in calib.column_names if c == self.label_column])
            evaluation = load_split(source, self.eval_split, task)
            if self.label_column not in evaluation.column_names:
                raise DataError(
                    f"task {task!r}: evaluation split {self.eval_split!r} has no label column "
                    f"{self.label_column!r} (columns: {evaluation.column_names}); set data.label_column"
                )
            self.eval[task] = self._prepare(evaluation, task, self.max_eval)
        log.info("data: %s", {t: (len(self.calib[t]), len(self.eval[t])) for t in self.calib})

    def _prepare(self, dataset, task: str, cap: int | None):
        if cap is not None and len(dataset) > cap:
            dataset = dataset.shuffle(seed=self.seed).select(range(cap))
        return featurize(
            dataset, task, self.tokenizer, self.processor, self.text_column, self.image_column, self.max_length
        )

    def train_dataloader(self) -> DataLoader:
        # Resume: the trainer restored global_step before asking for data, so start the stream there.
        start = self.trainer.global_step if self.trainer is not None else self.start_step
        batches = StepBatches(self.calib, self.batch_size, self.num_steps, self.seed, self.pad_id, start)
        return DataLoader(batches, batch_size=None, shuffle=False, num_workers=self.num_workers)

    def eval_dataloaders(self) -> dict[str, DataLoader]:
        """Labeled batches per task: model inputs plus ``labels``."""
        loaders = {}
        for task, ds in self.eval.items():
            keys = [c for c in ds.column_names if c in MODEL_INPUTS]
            fn: Callable = functools.partial(_collate_labeled, keys=keys, label=self.label_column, pad_id=self.pad_id)
            loaders[task] = DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=fn)
        return loaders

    def num_classes(self, task: str) -> int | None:
        feature = self.eval[task].features.get(self.label_column)
        return getattr(feature, "num_classes", None)


def _collate_labeled(rows, keys, label, pad_id):
    out = collate(rows, keys, pad_id)
    out["labels"] = torch.as_tensor([r[label] for r in rows])
    return out


def _load(obj, auto_class: str):
    if obj is None or not isinstance(obj, str):
        return obj
    import transformers

    return getattr(transformers, auto_class).from_pretrained(obj)
