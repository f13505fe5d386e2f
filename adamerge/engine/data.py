"""Calibration and evaluation data: one stream per task, preprocessed once, a batch of every task at each step.

The training stream is indexed by the global step: step ``i`` always sees the same batches (a seeded permutation
per task and pass over the data). It is an endless iterable that starts at the trainer's global step, which every
checkpoint holds, so a resumed run reads exactly the batches an uninterrupted run would: no epoch ever ends (a
map-style dataset ended the resumed epoch early, Lightning restarted it at its first item, and the stream replayed
old steps). Labels are stripped from the training batches: the objective never sees them; they serve evaluation only.

Several processes (``trainer=ddp``): every rank reads the same step and keeps its own contiguous share of each task
batch, so the ranks' per-task mean losses average to the one-process loss (see ``conf/trainer/ddp.yaml``).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adamerge.engine.datasets import MODEL_INPUTS, DataError, collate, featurize, load_split

log = logging.getLogger(__name__)


class StepBatches(IterableDataset):
    """The batches of every task for steps ``start``, ``start + 1``, ... (without labels).

    Args:
        tasks: task name -> featurized calibration dataset.
        batch_size: rows per task per step, over all ranks.
        num_steps: where the stream stops (``None``: endless, what the trainer needs: a stream that ends ends the
            epoch, and Lightning would start the next one at ``start`` again).
        seed: orders each pass over each task's data.
        pad_id: the tokenizer's padding id.
        start: the first step (a resumed run's global step).
        rank / world_size: this process's share of every task batch: rows
            ``[rank * b, (rank + 1) * b)`` with ``b = batch_size // world_size``.
    """

    def __init__(
        self,
        tasks: Mapping,
        batch_size: int,
        num_steps: int | None = None,
        seed: int = 0,
        pad_id: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise DataError(
                f"data.batch_size={batch_size} does not split evenly over {world_size} processes; make it a multiple "
                f"of trainer.devices x trainer.num_nodes ({world_size}), so that every rank's mean counts as much"
            )
        self.tasks, self.batch_size, self.num_steps = tasks, batch_size, num_steps
        self.seed, self.pad_id, self.start = seed, pad_id, start
        self.rank, self.world_size = rank, world_size
        self.keys = {t: [c for c in ds.column_names if c in MODEL_INPUTS] for t, ds in tasks.items()}

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a handful of permutations per run
    def permutation(self, task_index: int, epoch: int) -> torch.Tensor:
        n = len(self.tasks[list(self.tasks)[task_index]])
        return torch.randperm(
            n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + task_index * 7919 + epoch)
        )

    def batch(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's share of step ``step``'s batch of every task; ``_index`` holds the calibration rows."""
        share = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * share
        out = {}
        for t_idx, (task, ds) in enumerate(self.tasks.items()):
            n = len(ds)
            idx = [int(self.permutation(t_idx, p // n)[p % n]) for p in range(first, first + share)]
            out[task] = collate([ds[j] for j in idx], self.keys[task], self.pad_id)
            out[task]["_index"] = torch.tensor(idx)
        return out

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        worker = get_worker_info()  # DataLoader workers take every n-th step; the loader interleaves them in order
        first, stride = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        steps = itertools.count(first, stride) if self.num_steps is None else range(first, self.num_steps, stride)
        return (self.batch(step) for step in steps)


class MergeDataModule(L.LightningDataModule):
    """Per-task unlabeled calibration streams for training and labeled splits for evaluation.

    Args:
        tasks: task name -> dataset source (an in-memory ``DatasetDict``, a ``save_to_disk`` folder, a hub name,
            or a dict with ``path`` and ``load_dataset`` kwargs).
        tokenizer / processor: a name/path (loaded with ``AutoTokenizer``/``AutoProcessor``) or an object.
        calib_split / eval_split: split names for training (unlabeled) and evaluation (labeled).
        batch_size: calibration samples per task per step (AdaMerging: 16).
        num_steps: training steps (the trainer's ``max_steps``); the stream itself is endless and indexed by step.
        max_calib / max_eval: optional caps on the number of examples per task.
        chat_template: calibration texts as user turns through the tokenizer's chat template: ``None`` when the
            tokenizer has one, ``True`` always (an error without one), ``False`` never. Evaluation text stays raw.
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
        chat_template: bool | None = None,
    ):
        super().__init__()
        if not tasks:
            raise DataError("no tasks given; list them under data.tasks")
        self.sources = dict(tasks)
        self.tokenizer = _load(tokenizer, "AutoTokenizer")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise DataError(
                "data.chat_template=true but the tokenizer (data.tokenizer) has no chat template; give a chat "
                "model's tokenizer or set data.chat_template=null"
            )
        self.chat = has_template if chat_template is None else chat_template
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
            calib = self._prepare(load_split(source, self.calib_split, task), task, self.max_calib, self.chat)
            if len(calib) == 0:
                raise DataError(f"task {task!r}: the calibration split {self.calib_split!r} is empty")
            self.calib[task] = calib.remove_columns([c for c in calib.column_names if c == self.label_column])
            # What the evaluation split must hold (labels, response masks) is the evaluator's check.
            # The held-out rows never depend on the seed (cap by seed 0): seeds are compared on the same rows.
            self.eval[task] = self._prepare(load_split(source, self.eval_split, task), task, self.max_eval, seed=0)
        log.info("data: %s", {t: (len(self.calib[t]), len(self.eval[t])) for t in self.calib})

    def _prepare(self, dataset, task: str, cap: int | None, chat: bool = False, seed: int | None = None):
        if cap is not None and len(dataset) > cap:
            dataset = dataset.shuffle(seed=self.seed if seed is None else seed).select(range(cap))
        return featurize(
            dataset, task, self.tokenizer, self.processor, self.text_column, self.image_column, self.max_length, chat
        )

    def train_dataloader(self) -> DataLoader:
        # Resume: the trainer restored global_step before asking for data, so the stream starts there.
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else self.start_step
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = StepBatches(self.calib, self.batch_size, None, self.seed, self.pad_id, start, rank, world)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

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
