"""Fitting the coefficients with Lightning: a configured run (``learn``) or a plain call over datasets (scripts, tests)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from adamerge.engine.data import StepBatches
from adamerge.engine.datasets import model_inputs
from adamerge.engine.module import MergeModule

log = logging.getLogger(__name__)


def learn(cfg: DictConfig, merged, datamodule, method, steps: int | None = None, quiet: bool = False, experts=None):
    """Fit ``merged``'s coefficients with Lightning; resumes from ``cfg.ckpt_path`` (``last`` = the newest checkpoint).

    Args:
        cfg: the run's config: ``objective``, ``trainer``, ``callbacks``, ``logger``, ``ckpt_path``, ``paths``.
        merged: the merged model whose coefficient table trains.
        datamodule: the calibration data.
        method: the learned method's options (``optimizer``, ``scheduler``, ``backward``; ``LearnedMethod``).
        steps: a first pass of this many steps without checkpoints or loggers (``quiet``; Expert Merging++'s
            layer-wise pass); the main pass runs ``trainer.max_steps`` (default: ``method.steps``).
        experts: the merged model whose one-hot tables are the real experts, when ``merged`` runs over transformed
            task vectors (objectives that align with the experts read their outputs from it).
    """
    objective = instantiate(cfg.objective)
    if hasattr(objective, "bind"):  # objectives that need the model and the calibration data (Expert Merging)
        objective.bind(merged, datamodule, experts=experts)
    scheduler = instantiate(method.scheduler) if method.scheduler is not None else None
    module = MergeModule(merged, objective, instantiate(method.optimizer), scheduler, backward=method.backward)
    if quiet:
        trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=[], logger=False, enable_checkpointing=False)
        with expected_lightning_warnings():
            trainer.fit(module, datamodule=datamodule)
        return trainer
    # A group removed on the command line (~logger, ~callbacks) has no key: it means none.
    callbacks = [instantiate(c) for c in group(cfg, "callbacks").values() if c is not None]
    loggers = [instantiate(c) for c in group(cfg, "logger").values() if c is not None] or False
    with expected_lightning_warnings():
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last" and not Path(cfg.paths.output_dir, "checkpoints", "last.ckpt").exists():
        log.warning("ckpt_path=last but no checkpoint in %s/checkpoints: starting fresh", cfg.paths.output_dir)
        ckpt_path = None
    with expected_lightning_warnings():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def group(cfg: DictConfig, name: str) -> Mapping:
    """A config group of named entries; a group removed on the command line (``~logger``) or set to null is empty."""
    return (cfg[name] if name in cfg else None) or {}


@contextmanager
def expected_lightning_warnings() -> Iterator[None]:
    """Silence Lightning's warnings about what adamerge does on purpose, so the ones left mean something.

    The frozen base runs in eval mode (no dropout while coefficients train), and checkpoints are taken after the
    optimizer step, which is what resuming needs (the step counter and the coefficients agree).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
        # Lightning's own internals on torch 2.13, nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        yield


class NoPromotionTips(logging.Filter):
    """Drop Lightning's advertisements for its cloud products (litlogger, litmodels) from the run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(NoPromotionTips())


def fit_coefficients(
    merged,
    objective,
    datasets: Mapping,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    pad_id: int = 0,
    optimizer=torch.optim.Adam,
    backward: str = "auto",
):
    """Learn ``merged``'s coefficients on calibration ``datasets`` without a datamodule (scripts, tests).

    The same path as a configured run: ``StepBatches`` (batches carry ``_index``), ``MergeModule`` and a Lightning
    trainer on the CPU or the model's device; ``objective`` is bound here when it has ``bind``. Returns the module.
    """
    import functools

    import lightning as L
    from torch.utils.data import DataLoader

    if hasattr(objective, "bind"):
        objective.bind(merged, datasets=datasets, pad_id=pad_id)
        datasets = getattr(objective, "datasets", None) or datasets  # with expert-generated responses
    batches = StepBatches(dict(datasets), batch_size, steps, seed, pad_id)
    module = MergeModule(merged, objective, functools.partial(optimizer, lr=lr), backward=backward)
    device = merged.coefficients.raw.device
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return module


@torch.no_grad()
def calibration_loss(cfg: DictConfig, model, params, datamodule, batches: int) -> float:
    """The training objective (``cfg.objective``, summed over tasks) of the merge ``params``, averaged over the first
    ``batches`` steps of the calibration stream (the batches training sees first): the number a sweep minimises, for
    static and learned merges alike."""
    objective = instantiate(cfg.objective)
    if hasattr(objective, "bind"):
        objective.bind(model, datamodule)
    extra = getattr(objective, "model_kwargs", {})
    stream = StepBatches(datamodule.calib, datamodule.batch_size, batches, datamodule.seed, datamodule.pad_id)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for step in range(batches):
            for task, inputs in stream.batch(step).items():
                inputs = {k: v.to(model.device) for k, v in inputs.items()}  # as the trainer moves a batch
                outputs = model(**model_inputs(inputs), **extra, task=task, params=params)
                total += float(objective(outputs, task, inputs))
    finally:
        model.train(was_training)
    return total / max(batches, 1)
