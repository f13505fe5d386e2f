"""The trainer end to end on the tiny experiment (tiny experts and synthetic data built here)."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from adamerge.cli import config_dir, register_resolvers
from adamerge.pipeline import run


def make_cfg(tmp_path, *overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["experiment=tiny", f"paths.output_dir={tmp_path}", *overrides])


def coefficients(path):
    return json.loads((path / "coefficients.json").read_text())["coefficients"]


def test_tiny_run_writes_every_artifact_and_beats_task_arithmetic(tmp_path, recwarn):
    result = run(make_cfg(tmp_path))
    # what adamerge does on purpose (eval-mode base, checkpoints after the step) does not warn
    assert not [w for w in recwarn if "eval mode" in str(w.message) or "manual optimization" in str(w.message)]
    for name in [
        "results.csv",
        "results.md",
        "coefficients.json",
        "coefficients.png",
        "checkpoints/last.ckpt",
        "merged/model/config.json",
        "merged/model/model.safetensors",
        "merged/heads/marker0.safetensors",
    ]:
        assert (tmp_path / name).exists(), name
    rows = {row["method"]: row for row in result["table"]}
    assert rows["adamerging"]["avg"] >= rows["task arithmetic (lam=0.3)"]["avg"]
    assert rows["adamerging"]["avg"] > rows["base + heads (floor)"]["avg"]
    assert rows["adamerging"]["avg"] > rows["adamerging (init, before training)"]["avg"]
    # the checkpoint holds the coefficients only (kilobytes), not the model
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert list(ckpt["state_dict"]) == ["merged.coefficients.raw"]
    assert (tmp_path / "checkpoints/last.ckpt").stat().st_size < 100_000
    # the entropy objective went down (CSV logger)
    import csv

    with open(next((tmp_path / "csv").glob("version_*/metrics.csv"))) as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses[-1] < losses[0]


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path):
    # backward=split: auto picks its mode by timing, and two runs that pick differently differ by ~1e-9 rounding,
    # which Adam turns into full steps on the zero-gradient key-bias coefficients (see the test below this one).
    common = ["callbacks.checkpoint.every_n_train_steps=10", "export=false", "evaluate=false", "method.backward=split"]
    run(make_cfg(tmp_path / "full", "method.steps=30", *common))
    run(make_cfg(tmp_path / "resumed", "method.steps=20", *common))  # interrupted after 20 steps
    run(make_cfg(tmp_path / "resumed", "method.steps=30", "ckpt_path=last", *common))
    full, resumed = coefficients(tmp_path / "full"), coefficients(tmp_path / "resumed")
    for expert in full:
        for group, value in full[expert].items():
            assert resumed[expert][group] == pytest.approx(value, abs=1e-7), (expert, group)


def test_auto_backward_choice_survives_resume(tmp_path):
    from types import SimpleNamespace

    from adamerge.engine.module import MergeModule

    run(make_cfg(tmp_path, "method.steps=8", "callbacks.checkpoint.every_n_train_steps=4", "export=false"))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    times = checkpoint["backward_step_times"]
    assert [len(t) for t in times.values()] == [3, 3]  # the 6 trial steps, then the choice
    resumed = SimpleNamespace(step_times={"split": [], "concat": []})  # what on_load_checkpoint touches
    MergeModule.on_load_checkpoint(resumed, checkpoint)
    assert resumed.step_times == times


@pytest.mark.parametrize("method", ["task_arithmetic", "average", "ties", "dare"])
def test_static_methods_run(tmp_path, method):
    result = run(make_cfg(tmp_path, f"method={method}"))
    assert {row["method"] for row in result["table"]} >= {method, "base + heads (floor)"}
    assert (tmp_path / "merged/model/model.safetensors").exists()


@pytest.mark.parametrize("method", ["adamerging_task", "adamerging_pp"])
def test_learned_variants_run(tmp_path, method):
    result = run(make_cfg(tmp_path, f"method={method}", "debug=fast"))
    assert result["coefficients"]["granularity"] == ("task" if method == "adamerging_task" else "layer")


def test_task_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tasks in data .* and experts .* differ"):
        run(make_cfg(tmp_path, "data.num_tasks=2", "debug=fast"))


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        run(make_cfg(blocker / "sub", "debug=fast"))


@pytest.mark.slow
def test_cli_multirun_sweep(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adamerge.cli",
            "--multirun",
            "experiment=tiny",
            "debug=fast",
            "method=adamerging,task_arithmetic",
            f"hydra.sweep.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*/results.csv"))) == 2


@pytest.mark.parametrize("fast", ["split", "concat"])
def test_fast_backward_and_plain_autograd_give_the_same_coefficients(tmp_path, fast):
    # SGD, not Adam: a key bias has an exactly-zero gradient (softmax is shift invariant), so both paths give ~1e-9
    # rounding noise there, and Adam's normalisation would turn that noise into full +-lr steps of random sign.
    common = [
        "method.steps=20",
        "export=false",
        "evaluate=false",
        "method.optimizer._target_=torch.optim.SGD",
        "~method.optimizer.betas",
        "method.optimizer.lr=0.5",
    ]
    run(make_cfg(tmp_path / "split", f"method.backward={fast}", *common))
    run(make_cfg(tmp_path / "joint", "method.backward=joint", *common))
    split, joint = coefficients(tmp_path / "split"), coefficients(tmp_path / "joint")
    assert max(abs(v - 0.3) for row in split.values() for v in row.values()) > 1e-3  # the coefficients did move
    for expert in split:
        for group, value in split[expert].items():
            assert joint[expert][group] == pytest.approx(value, abs=1e-6), (expert, group)


CALLS = {"n": 0}


def entropy_then_nan(outputs, task, batch, after_calls=30):
    """The entropy objective until ``after_calls`` task losses were computed (10 steps of 3 tasks), then NaN."""
    from adamerge.objectives.entropy import entropy_objective

    CALLS["n"] += 1
    loss = entropy_objective(outputs, task, batch)
    return loss * float("nan") if CALLS["n"] > after_calls else loss


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    CALLS["n"] = 0
    cfg = make_cfg(
        tmp_path,
        "objective._target_=tests.test_pipeline.entropy_then_nan",
        "method.steps=20",
        "callbacks.checkpoint.every_n_train_steps=5",
        "export=false",
    )
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 10"):
        run(cfg)
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 10 and torch.isfinite(ckpt["state_dict"]["merged.coefficients.raw"]).all()


def test_bf16_mixed_precision_and_bf16_task_vectors(tmp_path):
    result = run(
        make_cfg(tmp_path, "trainer.precision=bf16-mixed", "experts.dtype=bfloat16", "method.steps=10", "export=false")
    )
    rows = {row["method"]: row for row in result["table"]}
    assert rows["adamerging"]["avg"] > rows["base + heads (floor)"]["avg"]
