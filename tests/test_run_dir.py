"""One run per output directory (a lock and a freshness check) and outputs that appear together (a staged commit)."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adamerge.artifacts.run_dir import (
    COMMIT_MARKER,
    LOCK_NAME,
    RunDirError,
    claim_run_dir,
    finish_interrupted_commits,
    staged_outputs,
)
from adamerge.atomic import atomic_path, recover_temporaries

# fork: the child inherits the imported modules, so it starts in milliseconds instead of re-importing torch.
FORK = multiprocessing.get_context("fork")


def _hold(out_dir, release, ready):
    with claim_run_dir(out_dir, resume=False):
        ready.set()
        release.wait(60)


def _die_inside_export(out_dir, ready):
    with atomic_path(Path(out_dir) / "merged", directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half written")
        ready.set()
        FORK.Event().wait(60)  # killed here


def _die_inside_stage(out_dir, ready):
    with claim_run_dir(out_dir, resume=True), staged_outputs(out_dir) as stage:
        (stage / "coefficients.json").write_text('{"version": "new"}')
        ready.set()
        FORK.Event().wait(60)  # killed before merged/ is written


def start(target, *args) -> multiprocessing.process.BaseProcess:
    """Run ``target(*args, ready)`` in a forked child and wait until it sets ``ready``."""
    ready = FORK.Event()
    proc = FORK.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    assert ready.wait(60), "the child never got going"
    return proc


def kill(proc) -> None:
    proc.kill()  # SIGKILL: no finally, no atexit, like the OOM killer or a preempted node
    proc.join(10)


def write_run(out_dir: Path, version: str) -> None:
    """What a finished run leaves: a checkpoint, results, and coefficients both at the top and inside merged/."""
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out_dir / "checkpoints" / "last.ckpt").write_text(version)
    (out_dir / "merged").mkdir(exist_ok=True)
    for path in (out_dir / "coefficients.json", out_dir / "merged" / "coefficients.json"):
        path.write_text(json.dumps({"version": version}))


def versions(out_dir: Path) -> tuple:
    read = lambda p: json.loads(p.read_text())["version"] if p.exists() else None  # noqa: E731
    return read(out_dir / "coefficients.json"), read(out_dir / "merged" / "coefficients.json")


def test_a_second_live_run_is_refused_with_the_fix(tmp_path):
    release = FORK.Event()
    holder = start(_hold, tmp_path, release)
    try:
        with pytest.raises(RunDirError) as err, claim_run_dir(tmp_path, resume=True):
            pass
        message = str(err.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message
        assert "hydra.run.dir" in message and "ckpt_path=last" in message
    finally:
        release.set()
        holder.join(10)
    assert holder.exitcode == 0
    with claim_run_dir(tmp_path, resume=True) as out_dir:  # the other run ended: resuming is allowed
        assert out_dir == tmp_path


def test_a_killed_run_does_not_keep_the_lock(tmp_path):
    holder = start(_hold, tmp_path, FORK.Event())
    kill(holder)
    with claim_run_dir(tmp_path, resume=False):
        assert (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_held_only_inside_the_block(tmp_path):
    with claim_run_dir(tmp_path, resume=False):
        with pytest.raises(RunDirError, match="in use by another adamerge run"), claim_run_dir(tmp_path, resume=True):
            pass
    with claim_run_dir(tmp_path, resume=True):
        pass


@pytest.mark.parametrize(
    "leftover", ["checkpoints/last.ckpt", "checkpoints/epoch=0-step=25.ckpt", "results.csv", "merged/x"]
)
def test_a_fresh_run_over_an_earlier_run_is_refused(tmp_path, leftover):
    (tmp_path / leftover).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / leftover).write_text("x")
    with pytest.raises(RunDirError) as err, claim_run_dir(tmp_path, resume=False):
        pass
    assert str(tmp_path) in str(err.value)
    assert "use ckpt_path=last to resume or choose another hydra.run.dir" in str(err.value)
    with claim_run_dir(tmp_path, resume=True):  # a resume expects them
        pass


def test_what_hydra_creates_before_the_task_is_accepted(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "cli.log").write_text("[INFO] starting\n")
    (tmp_path / "checkpoints").mkdir()  # empty: a run that died before its first checkpoint
    with claim_run_dir(tmp_path / "new", resume=False), claim_run_dir(tmp_path, resume=False):
        pass
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "cli.log").exists()


def test_an_export_killed_midway_is_cleaned_by_the_next_run(tmp_path):
    write_run(tmp_path, "old")
    kill(start(_die_inside_export, tmp_path))
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert len(stale) == 1  # what atomic_path leaves on SIGKILL; before claim_run_dir no run ever removed it
    with claim_run_dir(tmp_path, resume=True):
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert versions(tmp_path) == ("old", "old")


def test_recover_temporaries_keeps_what_is_not_its_own_and_restores_an_interrupted_replace(tmp_path):
    (tmp_path / ".results.csv.4242.tmp").write_text("half")
    (tmp_path / ".merged.ab12_x9z").mkdir()
    (tmp_path / "merged").mkdir()
    (tmp_path / ".merged.old.4242").mkdir()  # killed after the new merged/ arrived: the old one is garbage
    (tmp_path / ".export.old.4242").mkdir()  # killed between the renames: the only complete copy
    (tmp_path / ".export.old.4242" / "config.json").write_text("{}")
    keep = [".hydra", ".config.settings", "notes.txt", LOCK_NAME]
    (tmp_path / ".hydra").mkdir()
    for name in keep[1:]:
        (tmp_path / name).write_text("mine")
    removed = recover_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".merged.ab12_x9z", ".merged.old.4242", ".results.csv.4242.tmp"]
    assert (tmp_path / "export" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "export", "merged"])


def test_staged_outputs_replace_the_old_ones_together(tmp_path):
    write_run(tmp_path, "old")
    with staged_outputs(tmp_path) as stage:
        (stage / "merged").mkdir()
        for path in (stage / "coefficients.json", stage / "merged" / "coefficients.json"):
            path.write_text(json.dumps({"version": "new"}))
        assert versions(tmp_path) == ("old", "old")  # nothing visible before the block ends
    assert versions(tmp_path) == ("new", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "coefficients.json", "merged"]


def test_staged_outputs_are_dropped_on_error(tmp_path):
    write_run(tmp_path, "old")
    with pytest.raises(RuntimeError, match="evaluation failed"), staged_outputs(tmp_path) as stage:
        (stage / "coefficients.json").write_text(json.dumps({"version": "new"}))
        raise RuntimeError("evaluation failed")
    assert versions(tmp_path) == ("old", "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "coefficients.json", "merged"]


def test_a_run_killed_while_staging_leaves_the_old_outputs_consistent(tmp_path):
    write_run(tmp_path, "old")
    kill(start(_die_inside_stage, tmp_path))
    assert versions(tmp_path) == ("old", "old")
    with claim_run_dir(tmp_path, resume=True):  # the uncommitted stage is removed
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "checkpoints", "coefficients.json", "merged"]


class Killed(BaseException):
    """Stands in for the process dying between two renames of the commit."""


def test_a_commit_interrupted_between_renames_is_finished_by_the_next_claim(tmp_path, monkeypatch):
    write_run(tmp_path, "old")
    rename, calls = Path.rename, []

    def rename_then_die(self, target):
        calls.append(self.name)
        if len(calls) == 4:  # coefficients.json replaced; merged/ moved aside, the new one not yet in
            raise Killed
        return rename(self, target)

    with pytest.raises(Killed), staged_outputs(tmp_path) as stage:
        (stage / "merged").mkdir()
        for path in (stage / "coefficients.json", stage / "merged" / "coefficients.json"):
            path.write_text(json.dumps({"version": "new"}))
        monkeypatch.setattr(Path, "rename", rename_then_die)
    monkeypatch.undo()
    assert versions(tmp_path) == ("new", None)  # the state a kill at that instant leaves
    with claim_run_dir(tmp_path, resume=True):
        assert versions(tmp_path) == ("new", "new")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staged.")]
    assert finish_interrupted_commits(tmp_path) == []


def test_a_stage_without_commit_marker_is_never_rolled_forward(tmp_path):
    write_run(tmp_path, "old")
    stage = tmp_path / ".staged.abcd1234"
    stage.mkdir()
    (stage / "coefficients.json").write_text(json.dumps({"version": "new"}))
    assert not (stage / COMMIT_MARKER).exists()
    with claim_run_dir(tmp_path, resume=True):
        assert versions(tmp_path) == ("old", "old") and not stage.exists()


# The wiring in adamerge.pipeline.run (claim_run_dir around the run, staged_outputs around the final writes).


def make_cfg(out_dir, *overrides):
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers

    register_resolvers()
    common = ["experiment=tiny", "method.steps=3", "evaluate=false", "export=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*common, f"paths.output_dir={out_dir}", *overrides])


def test_run_refuses_a_fresh_run_over_a_finished_one(tmp_path):
    from adamerge.pipeline import run

    run(make_cfg(tmp_path))
    with pytest.raises(RunDirError, match="use ckpt_path=last to resume or choose another hydra.run.dir"):
        run(make_cfg(tmp_path))
    run(make_cfg(tmp_path, "ckpt_path=last", "method.steps=4"))


def test_run_killed_in_export_keeps_coefficients_and_merged_model_consistent(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from adamerge.pipeline import run

    run(make_cfg(tmp_path, "export=true"))
    before = json.loads((tmp_path / "coefficients.json").read_text())

    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", die)  # the export dies after coefficients were computed
    with pytest.raises(Killed):
        run(make_cfg(tmp_path, "export=true", "ckpt_path=last", "method.steps=6"))
    top = json.loads((tmp_path / "coefficients.json").read_text())
    inside = json.loads((tmp_path / "merged" / "coefficients.json").read_text())
    assert top["coefficients"] == inside["coefficients"] == before["coefficients"]


@pytest.mark.slow
def test_two_cli_runs_into_one_directory_one_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "adamerge.cli", "experiment=tiny", "method.steps=300", "evaluate=false"]
    cmd += ["export=false", f"hydra.run.dir={tmp_path}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(code == 0 for code in codes) == [False, True], [err[-2000:] for _, err in outs]
    refused = next(err for (_, err), code in zip(outs, codes) if code != 0)
    assert str(tmp_path) in refused and "hydra.run.dir" in refused
    assert not list(tmp_path.glob("checkpoints/*-v1.ckpt"))
