"""``trainer=ddp``: two CPU processes over gloo learn the coefficients of one process (up to float rounding), each
rank running its own half of every task batch.

This file is also the script of the two-process run (``python tests/test_ddp.py OUT overrides...``): Lightning starts
rank 1 by running it again. It composes the real config and calls ``adamerge.pipeline.run``, the CLI's path without
Hydra's app, as ``tests/test_pipeline.py`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

STEPS = 30
# 2 tasks, experts from 4 fine-tuning steps, 24 calibration rows per task, batch 8: one pass = 3 steps.
ARGS = [
    "experiment=tiny",
    "experts.num_tasks=2",
    "+experts.steps=4",
    "+data.steps=4",
    "data.batch_size=8",
    "+data.max_calib=24",
    f"method.steps={STEPS}",
    "method.backward=split",
    "evaluate=false",
    "export=false",
    "~logger",
    f"callbacks.checkpoint.every_n_train_steps={STEPS}",
    "+callbacks.rows._target_=test_ddp.RowsSeen",
]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
# A coefficient whose gradient RMS stays below Adam's eps moves with rounding noise only (measured on the tiny
# experiment: the 6 attention key-bias coefficients of 117, gradients ~1e-10 against ~3e-4; one process with
# backward=split vs concat differs there by 0.008, as one vs two processes do).
NOISE_FLOOR = 1e-8


class RowsSeen(L.Callback):
    """Writes the calibration rows each rank trained on, step by step, to ``rows.<rank>.json`` in the run dir."""

    def __init__(self):
        self.rows: list[dict[str, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append({task: inputs["_index"].tolist() for task, inputs in batch.items()})

    def on_train_end(self, trainer, pl_module):
        Path(trainer.default_root_dir, f"rows.{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def run_merge(output_dir: Path, *overrides: str) -> None:
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers
    from adamerge.pipeline import run

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*ARGS, f"paths.output_dir={output_dir}", *overrides])
    run(cfg)


def launch_ranks(run_dir: Path, tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Both ranks at once, started as a cluster launcher (torchrun) would: Lightning starts rank 1 only once rank 0
    reaches ``fit``, which doubles the start-up time (the CLI path is the slow test's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"WORLD_SIZE": "2", "NODE_RANK": "0"}
    ranks = []
    for rank in range(2):
        log = tmp_path / f"rank{rank}.log"
        with open(log, "w") as out:
            cmd = [sys.executable, __file__, str(run_dir), *DDP]
            ranks.append((subprocess.Popen(cmd, env=env | {"LOCAL_RANK": str(rank)}, stdout=out, stderr=out), log))
    return ranks


def final_state(run_dir: Path, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw coefficients and the RMS of their gradients (Adam's second moment) at the end of a run."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    (raw,) = [v for k, v in ckpt["state_dict"].items() if k.endswith("coefficients.raw")]
    return raw, ckpt["optimizer_states"][0]["state"][0]["exp_avg_sq"].sqrt()


def merged_logits(raw: torch.Tensor, num_tasks: int, expert_steps: int) -> torch.Tensor:
    """Every task head's logits on its first evaluation batch, through the model merged with ``raw``."""
    from adamerge.core.merged import MergedModel
    from adamerge.testbeds.tiny import tiny_datamodule, tiny_pool

    merged = MergedModel(tiny_pool(num_tasks=num_tasks, seed=0, steps=expert_steps))  # layer-wise, [0, 1]
    data = tiny_datamodule(num_tasks=num_tasks, seed=0, steps=expert_steps)
    data.setup()
    with torch.no_grad():
        merged.coefficients.raw.copy_(raw)
        params = merged.merged_tensors()
        logits = []
        for task, loader in data.eval_dataloaders().items():
            inputs = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
            logits.append(merged(**inputs, task=task, params=params).logits.flatten())
    return torch.cat(logits)


def compare(one: Path, two: Path, steps: int, num_tasks: int, expert_steps: int) -> None:
    """Coefficients with a gradient within 1e-5; those whose gradient is rounding noise (below Adam's eps: the
    attention key biases, which softmax cancels) drift with Adam in either run alike, and change no output."""
    (lam_one, rms), (lam_two, _) = final_state(one, steps), final_state(two, steps)
    learned = rms > NOISE_FLOOR
    delta = (lam_two - lam_one).abs()
    noise = delta[~learned].max().item() if (~learned).any() else 0.0
    n_learned, n_noise = int(learned.sum()), int((~learned).sum())
    print(f"max |2 processes - 1 process|: {delta[learned].max().item():.3g} over {n_learned} learned coefficients")
    print(f"max |2 processes - 1 process|: {noise:.3g} over {n_noise} with a gradient below {NOISE_FLOOR:g}")
    assert learned.float().mean() > 0.9
    assert delta[learned].max() < 1e-5
    torch.testing.assert_close(
        merged_logits(lam_two, num_tasks, expert_steps),
        merged_logits(lam_one, num_tasks, expert_steps),
        atol=1e-5,
        rtol=0,
    )


def rows(run_dir: Path, rank: int) -> list[dict[str, list[int]]]:
    return json.loads((run_dir / f"rows.{rank}.json").read_text())


def test_two_processes_learn_the_coefficients_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ranks = launch_ranks(two, tmp_path)
    run_merge(one)  # while the two ranks run
    for rank, log in ranks:
        assert rank.wait(timeout=900) == 0, log.read_text()[-3000:]
    compare(one, two, STEPS, num_tasks=2, expert_steps=4)
    # each rank ran its own contiguous half of every step's task batches, and together the whole batch
    whole, first, second = rows(one, 0), rows(two, 0), rows(two, 1)
    assert len(whole) == len(first) == len(second) == STEPS
    for step, (w, a, b) in enumerate(zip(whole, first, second)):
        for task, batch in w.items():
            half = len(batch) // 2
            assert (a[task], b[task]) == (batch[:half], batch[half:]), f"step {step} {task}: {a[task]}, {b[task]}"


def test_sharding_strategies_are_refused_with_the_config_key():
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import BertForSequenceClassification

    from adamerge.core.merged import MergedModel
    from adamerge.core.pool import make_pool
    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective
    from adamerge.testbeds.tiny import tiny_config

    base = BertForSequenceClassification(tiny_config()).eval()
    module = MergeModule(MergedModel(make_pool(base, {"a": base.state_dict()})), entropy_objective, torch.optim.Adam)

    class Trainer:  # what setup reads: the strategy Lightning built from trainer.strategy
        strategy = FSDPStrategy()

    module.trainer = Trainer()
    with pytest.raises(ValueError, match=r"trainer.strategy=FSDPStrategy is not supported.*use trainer=ddp"):
        module.setup("fit")


@pytest.mark.slow
def test_cli_ddp_run_equals_one_process(tmp_path):
    """The acceptance: ``adamerge experiment=tiny trainer=ddp trainer.devices=2 trainer.accelerator=cpu``."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "adamerge.cli", "experiment=tiny", "evaluate=false", "export=false"]
    for name, extra in (("one", []), ("two", DDP)):
        done = subprocess.run([*args, *extra, f"hydra.run.dir={tmp_path / name}"], env=env, capture_output=True)
        assert done.returncode == 0, done.stderr[-3000:]
    compare(tmp_path / "one", tmp_path / "two", 100, num_tasks=3, expert_steps=80)  # experiment=tiny: 100 steps


if __name__ == "__main__":
    run_merge(Path(sys.argv[1]), *sys.argv[2:])
