"""The LightningModule: its only trainable parameters are the merging coefficients.

``training_step`` = objective(model(batch)) per task, summed over tasks; the backward goes through
``two_stage_backward`` (see ``adamerge.merging``), so the optimisation is manual: one optimizer step per step.
Checkpoints hold the coefficients and the optimizer state only (kilobytes), never the base or the task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import lightning as L
import torch
from torch import Tensor

from adamerge.data import model_inputs
from adamerge.merging import MergedModel, check_finite, two_stage_backward

BACKWARD_MODES = ("auto", "split", "joint")


class MergeModule(L.LightningModule):
    """Learn ``merged.coefficients`` by minimising ``objective`` over a batch of every task.

    Args:
        merged: the functional merged model (frozen base, task vectors, coefficients).
        objective: ``objective(outputs, task, batch) -> loss`` (config group ``objective``).
        optimizer: a partial ``torch.optim`` constructor taking the parameters (config key ``method.optimizer``).
        scheduler: optional partial LR scheduler taking the optimizer (config key ``method.scheduler``).
        backward: ``split`` merges once outside autograd, backpropagates each task batch on its own into the merged
            tensors (one task's activations in memory at a time) and maps their gradients to the coefficients in
            one pass (``two_stage_backward``); ``joint`` sums the task losses and runs one plain autograd backward
            through the merge (the reference path); ``auto`` = ``split``.
    """

    def __init__(
        self,
        merged: MergedModel,
        objective: Callable,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        backward: str = "auto",
    ):
        super().__init__()
        if backward not in BACKWARD_MODES:
            raise ValueError(
                f"unknown backward mode {backward!r}; choose one of {BACKWARD_MODES} (config key: method.backward)"
            )
        self.merged = merged
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backward_mode = "split" if backward == "auto" else backward
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints carry the coefficients only

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([self.merged.coefficients.raw])
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def task_losses(self, batch: Mapping[str, Mapping[str, Tensor]], params) -> Iterator[Tensor]:
        # Objectives that read more than the logits (hidden states) name the forward kwargs they need.
        extra = getattr(self.objective, "model_kwargs", {})
        for task, inputs in batch.items():
            yield self.objective(self.merged(**model_inputs(inputs), **extra, task=task, params=params), task, inputs)

    def training_step(self, batch: Mapping[str, Mapping[str, Tensor]], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.backward_mode == "split":
            run = lambda params: self.task_losses(batch, params)  # noqa: E731
            losses = two_stage_backward(self.merged, run, self.manual_backward)
        else:
            losses = list(self.task_losses(batch, self.merged.merged_tensors()))
            self.manual_backward(torch.stack(losses).sum())
            losses = [loss.detach() for loss in losses]
        loss = torch.stack(losses).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.global_step}; stopped before the update, the last good "
                "checkpoint is kept (lower method.optimizer.lr, or check the data)"
            )
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        lam = self.merged.coefficients().detach()
        check_finite(lam, f"coefficients after step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss/{task}": value for task, value in zip(batch, losses)})
        self.log_dict(
            {
                "coef/mean": lam.mean(),
                "coef/std": lam.std() if lam.numel() > 1 else lam.new_zeros(()),
                "coef/min": lam.min(),
                "coef/max": lam.max(),
            }
        )
        return loss

    def on_train_end(self) -> None:
        self.merged.release_training_leaves()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.endswith("coefficients.raw")}
