"""Kill-and-resume: a run killed with SIGKILL mid-run and resumed with ``ckpt_path=last`` ends bitwise equal to an
uninterrupted run, over more steps than one pass of the calibration data.

The default test forks the CLI from this pre-warmed process: each run skips the interpreter start, the imports and
the tiny testbed's training (tens of seconds each on a shared 2-core machine) but still runs ``adamerge.cli.main``
end to end in its own process, and is killed with SIGKILL. The slow test is the acceptance setting (600 steps, kills
at three steps of separate runs) with real ``python -m adamerge.cli`` processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EVERY = 2  # checkpoint interval of the default test
# 2 tasks, experts from 4 fine-tuning steps, 12 calibration rows per task, batch 4: one pass = 3 steps.
SMALL = [
    "experts.num_tasks=2",
    "+experts.steps=4",
    "+data.steps=4",
    "data.batch_size=4",
    "+data.max_calib=12",
]


def cli_args(steps: int, every: int) -> list[str]:
    return [
        "experiment=tiny",
        f"method.steps={steps}",
        "method.backward=split",
        "evaluate=false",
        "export=false",
        "~logger",
        f"callbacks.checkpoint.every_n_train_steps={every}",
        "callbacks.checkpoint.save_top_k=-1",  # a file per checkpoint, step=N.ckpt: the test polls for them
        "++callbacks.checkpoint.filename='{step}'",
    ]


class Forked:
    """``adamerge.cli.main()`` in a forked child of this process (imports and the tiny testbed already in memory)."""

    def __init__(self, args: list[str], log: Path):
        self.process = multiprocessing.get_context("fork").Process(target=self.main, args=(args, str(log)))
        self.process.start()

    @staticmethod
    def main(args: list[str], log: str) -> None:
        out = open(log, "w")  # noqa: SIM115 - the child exits with it open
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        sys.argv = ["adamerge", *args]
        from adamerge.cli import main

        main()

    def running(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


class Spawned:
    """``python -m adamerge.cli`` in a fresh interpreter."""

    def __init__(self, args: list[str], log: Path):
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "adamerge.cli", *args], stdout=out, stderr=out, env=env
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> int:
        return self.process.wait()


def finish(launch, args: list[str], log: Path) -> None:
    run = launch(args, log)
    assert run.wait() == 0, f"adamerge failed; see {log}:\n{log.read_text()[-3000:]}"


def kill_after(launch, args: list[str], run_dir: Path, step: int, log: Path, timeout: float = 600) -> int:
    """Start a run, SIGKILL it as soon as its step-``step`` checkpoint exists; returns the step ``last.ckpt`` holds.

    The kill lands a step or two later, often between the step file and ``last.ckpt``: any step is a fair test.
    """
    for old in run_dir.glob("checkpoints/step=*.ckpt"):  # left by an earlier run in this dir: wait for a new one
        old.unlink()
    run = launch(args, log)
    ckpt, deadline = run_dir / "checkpoints" / f"step={step}.ckpt", time.monotonic() + timeout
    while not ckpt.exists():
        if not run.running() or time.monotonic() > deadline:
            run.kill()
            raise AssertionError(
                f"no {ckpt.name} before the run ended or timed out; see {log}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.005)
    run.kill()
    assert run.wait() == -signal.SIGKILL, f"the run ended before the kill; see {log}"
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def final_state(run_dir: Path) -> tuple[int, torch.Tensor, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (raw,) = [v for k, v in ckpt["state_dict"].items() if k.endswith("coefficients.raw")]
    return ckpt["global_step"], raw, ckpt["optimizer_states"][0]["state"][0]


def assert_bitwise_equal(resumed: Path, reference: Path, steps: int) -> None:
    (step_a, lam_a, adam_a), (step_b, lam_b, adam_b) = final_state(resumed), final_state(reference)
    assert step_a == step_b == steps
    assert torch.equal(lam_a, lam_b), f"coefficients differ by up to {(lam_a - lam_b).abs().max().item():.3g}"
    assert all(torch.equal(adam_a[k], adam_b[k]) for k in adam_b), "Adam's moments differ"


@pytest.fixture(scope="module")
def warm():
    """Import what a run imports and build the small testbed once, so that forked runs start at once."""
    import adamerge.cli  # noqa: F401
    import adamerge.pipeline  # noqa: F401
    from adamerge.testbeds.tiny import tiny_datamodule, tiny_pool

    tiny_pool(num_tasks=2, seed=0, steps=4)
    tiny_datamodule(num_tasks=2, seed=0, steps=4)


def test_killed_three_times_and_resumed_equals_uninterrupted_run(tmp_path, warm):
    """One run SIGKILLed at step 6, resumed, killed at 12, resumed, killed at 18, resumed to step 48 (16 passes over
    the data). The last resume starts before half the run: there a map-style stream ended the resumed epoch early
    and replayed old steps."""
    steps = 48
    args = [*cli_args(steps, EVERY), *SMALL]
    finish(Forked, [*args, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path / "reference.log")
    run_dir = tmp_path / "resumed"
    resumed_from = []
    for i, step in enumerate((6, 12, 18)):
        resume = ["ckpt_path=last"] if i else []
        log = tmp_path / f"killed{i}.log"
        resumed_from.append(kill_after(Forked, [*args, *resume, f"hydra.run.dir={run_dir}"], run_dir, step, log))
    assert len(set(resumed_from)) == 3 and max(resumed_from) < steps // 2, resumed_from
    finish(Forked, [*args, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path / "resumed.log")
    assert_bitwise_equal(run_dir, tmp_path / "reference", steps)


@pytest.mark.slow
def test_600_step_tiny_run_killed_at_three_steps_resumes_bitwise_equal(tmp_path):
    """The acceptance line: kill-and-resume at steps 150, 300 and 450 of a 600-step tiny run (8 steps a pass)."""
    steps = 600
    args = cli_args(steps, 50)
    finish(Spawned, [*args, f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path / "reference.log")
    for step in (150, 300, 450):
        run_dir = tmp_path / f"killed_at_{step}"
        resumed_from = kill_after(Spawned, [*args, f"hydra.run.dir={run_dir}"], run_dir, step, tmp_path / f"{step}.log")
        assert step - 50 <= resumed_from < steps
        finish(Spawned, [*args, "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path / f"{step}.resumed.log")
        assert_bitwise_equal(run_dir, tmp_path / "reference", steps)
