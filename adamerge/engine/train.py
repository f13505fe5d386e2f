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
from adamerge.engine.module import MergeModule

log = logging.getLogger(__name__)


def learn(cfg: DictConfig, merged, datamodule, steps: int | None = None, quiet: bool = False):
    """Fit the coefficients with Lightning; resumes from ``cfg.ckpt_path`` (``last`` = the newest checkpoint).

    ``quiet``: a first pass of ``steps`` steps without checkpoints or loggers (Expert Merging++'s layer-wise pass).
    """
    import lightning as L

    method = cfg.method
    objective = instantiate(cfg.objective)
    if hasattr(objective, "bind"):  # objectives that need the model and the calibration data (Expert Merging)
        objective.bind(merged, datamodule)
    module = MergeModule(
        merged,
        objective,
        instantiate(method.optimizer),
        instantiate(method.scheduler) if method.get("scheduler") else None,
        backward=method.backward,
    )
    if quiet:
        trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=[], logger=False, enable_checkpointing=False)
        with expected_lightning_warnings():
            trainer.fit(module, datamodule=datamodule)
        return trainer
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None] if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last" and not Path(cfg.paths.output_dir, "checkpoints", "last.ckpt").exists():
        log.warning("ckpt_path=last but no checkpoint in %s/checkpoints: starting fresh", cfg.paths.output_dir)
        ckpt_path = None
    with expected_lightning_warnings():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@contextmanager
def expected_lightning_warnings() -> Iterator[None]:
    """Silence Lightning's warnings about what adamerge does on purpose, so the ones left mean something.

    The frozen base runs in eval mode (no dropout while coefficients train), and checkpoints are taken after the
    optimizer step, which is what resuming needs (the step counter and the coefficients agree).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
        yield


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
