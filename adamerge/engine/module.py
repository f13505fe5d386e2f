"""The LightningModule: its only trainable parameters are the merging coefficients.

``training_step`` = objective(model(batch)) per task, summed over tasks; the backward goes through
``two_stage_backward`` (see ``adamerge.core.merged``), so the optimisation is manual: one optimizer step per step.
Checkpoints hold the coefficients and the optimizer state only (kilobytes), never the base or the task vectors.

Several processes (``trainer=ddp``): each rank runs its share of every task batch (``adamerge.engine.data``) and
Lightning's DDP wrapper averages ``coefficients.raw.grad`` when ``two_stage_backward`` ends in ``lam.backward``
(its hook fires on that leaf), so the step equals the one-process step up to float rounding. Objectives that are
per-task means over the rows average exactly over equal shares; a mean over non-padding tokens (the entropy of a
causal LM) does not: it weighs each rank's tokens by ``1 / (world * tokens on that rank)`` instead of
``1 / tokens in the batch``, equal only when the shares hold as many non-padding tokens each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from adamerge.core.coefficients import check_finite
from adamerge.core.merged_base import MergedModelBase, two_stage_backward
from adamerge.engine.concat import concatenable, forward_concatenated
from adamerge.engine.datasets import model_inputs

BACKWARD_MODES = ("auto", "split", "concat", "joint")
AUTO_TRIALS = 3  # timed steps per mode before ``auto`` settles; the first of each warms up
# concat holds every task's activations at once: auto takes it only when it is clearly faster than split.
AUTO_CONCAT_MARGIN = 0.95


class MergeModule(L.LightningModule):
    """Learn ``merged.coefficients`` by minimising ``objective`` over a batch of every task.

    Args:
        merged: the functional merged model (frozen base, task vectors, coefficients).
        objective: ``objective(outputs, task, batch) -> loss`` (config group ``objective``).
        optimizer: a partial ``torch.optim`` constructor taking the parameters (config key ``method.optimizer``).
        scheduler: optional partial LR scheduler taking the optimizer (config key ``method.scheduler``).
        backward: how a step backpropagates (all exact, equal to fp rounding):
            ``split`` merges once outside autograd, runs forward+backward per task batch (one task's activations in
            memory at a time) and maps the merged tensors' gradients to the coefficients in one pass
            (``two_stage_backward``); ``concat`` does the same with one forward+backward over the task batches
            concatenated (each task's head on its rows, ``adamerge.engine.concat``; steps whose batches cannot be joined
            fall back to ``split``; a compiled model refuses it, since the per-step head hooks would change its
            graph); ``joint`` sums the task losses and runs one plain autograd backward through the
            merge (the reference path); ``auto`` times ``split`` and ``concat`` on the first steps and keeps the
            faster (``concat`` only if at least 5% faster, since it holds every task's activations at once;
            ``split`` if ``concat`` runs out of memory).
    """

    def __init__(
        self,
        merged: MergedModelBase,
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
        if backward == "concat" and getattr(merged, "compiled", False):
            raise ValueError(
                "method.backward=concat cannot run a compiled model; use split or auto (or method.compile=false)"
            )
        self.merged = merged
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backward_mode = backward
        self.step_times: dict[str, list[float]] = {"split": [], "concat": []}  # backward=auto's trials
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints carry the coefficients only

    def setup(self, stage: str) -> None:
        """Refuse the strategies that would not train correctly; keep DDP's hands off the frozen tensors."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"trainer.strategy={type(strategy).__name__} is not supported: adamerge's base and task vectors are "
                "frozen buffers merged functionally, so a sharding strategy (FSDP, DeepSpeed) would shard nothing "
                "and keep every weight on every device; use trainer=ddp (each process holds the whole model; see "
                "conf/trainer/ddp.yaml for what sharding would need) or a single device"
            )
        # DDP would broadcast every buffer at wrap time and before each forward (the base and K task vectors): only
        # the coefficients need syncing, and every rank builds the same frozen tensors.
        self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if not p.requires_grad] + [
            n for n, _ in self.named_buffers()
        ]

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

    def concat_losses(self, batch: Mapping[str, Mapping[str, Tensor]], params) -> list[Tensor]:
        """The task losses from one forward over the concatenated task batches (``can_concat`` checked by the caller)."""
        extra = getattr(self.objective, "model_kwargs", {})
        outputs = forward_concatenated(self.merged, batch, params, **extra)
        return [self.objective(outputs[task], task, inputs) for task, inputs in batch.items()]

    def backward_step(self, batch: Mapping[str, Mapping[str, Tensor]], mode: str) -> list[Tensor]:
        """Forward + backward of every task's loss into the coefficients' gradient; returns the detached losses."""
        if mode == "joint":
            losses = list(self.task_losses(batch, self.merged.merged_tensors()))
            self.manual_backward(torch.stack(losses).sum())
            return [loss.detach() for loss in losses]
        if mode == "concat" and self.can_concat(batch):
            losses = []

            def run(params):
                losses.extend(self.concat_losses(batch, params))
                yield torch.stack(losses).sum()

            two_stage_backward(self.merged, run, self.manual_backward)
            return [loss.detach() for loss in losses]
        return two_stage_backward(self.merged, lambda params: self.task_losses(batch, params), self.manual_backward)

    def can_concat(self, batch: Mapping[str, Mapping[str, Tensor]]) -> bool:
        """Task batches of equal shapes, on a model that is not compiled (the head hooks would change its graph)."""
        return concatenable(batch) and not getattr(self.merged, "compiled", False)

    def choose_mode(self, batch: Mapping[str, Mapping[str, Tensor]]) -> str:
        """``backward=auto``: alternate split and concat for the first steps, then keep the faster one."""
        if self.backward_mode != "auto":
            return self.backward_mode
        split, concat = self.step_times["split"], self.step_times["concat"]
        if len(concat) < AUTO_TRIALS and self.can_concat(batch):
            return "split" if len(split) <= len(concat) else "concat"
        return "concat" if concat and split and concat_pays(split, concat) else "split"

    def timed_backward(self, batch: Mapping[str, Mapping[str, Tensor]], mode: str) -> list[Tensor]:
        """``backward_step``, timed while ``auto`` is still choosing; a concat step out of memory settles on split."""
        times = self.step_times.get(mode)
        if self.backward_mode != "auto" or times is None or len(times) >= AUTO_TRIALS:
            return self.backward_step(batch, mode)
        synchronize(self.device)
        start = time.perf_counter()
        try:
            losses = self.backward_step(batch, mode)
        except torch.OutOfMemoryError:
            if mode != "concat":
                raise
            self.step_times["concat"] = [float("inf")] * AUTO_TRIALS
            self.merged.coefficients.raw.grad = None
            torch.cuda.empty_cache()
            rank_zero_info("backward=auto: concatenated task batches ran out of memory; using split")
            return self.backward_step(batch, "split")
        synchronize(self.device)
        times.append(time.perf_counter() - start)
        if len(self.step_times["concat"]) == AUTO_TRIALS and len(self.step_times["split"]) == AUTO_TRIALS:
            split, concat = self.step_times["split"], self.step_times["concat"]
            rank_zero_info(
                f"backward=auto: split {min(split[1:]):.3f} s/step, concat {min(concat[1:]):.3f} s/step; "
                f"using {'concat' if concat_pays(split, concat) else 'split'}"
            )
        return losses

    def training_step(self, batch: Mapping[str, Mapping[str, Tensor]], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        # The ranks' mean losses (DDP: each rank's share of the batch): one collective, and every rank raises alike.
        losses = torch.stack(self.timed_backward(batch, self.choose_mode(batch)))
        losses = self.trainer.strategy.reduce(losses, reduce_op="mean")
        loss = losses.sum()
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
        checkpoint["backward_step_times"] = self.step_times  # a resumed auto run keeps the mode it chose

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.step_times = checkpoint.get("backward_step_times", self.step_times)


def concat_pays(split: list[float], concat: list[float]) -> bool:
    """Concat is taken when its best timed step (the first of each mode warms up) beats split's by the margin."""
    if len(split) < 2 or len(concat) < 2:
        return False
    return min(concat[1:]) < AUTO_CONCAT_MARGIN * min(split[1:])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers the step (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
