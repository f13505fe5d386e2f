"""Sweeps that scale out: Hydra's joblib / submitit launchers and the Optuna sweeper presets (the `sweep` extra).

The config tests compose the presets (seconds). The command-line tests (slow: each starts Python processes that import
torch and build the tiny experts; 75-110 s on the shared 2-core machine) run `adamerge --multirun` on the tiny
experiment, offline, with experts fine-tuned for 5 steps: the plumbing is under test, not the merge's quality.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adamerge.cli import config_dir, register_resolvers
from adamerge.methods.registry import methods

TINY = ["experiment=tiny", "++experts.steps=5", "++data.steps=5", "evaluate=false", "export=false"]
LEARNED = [spec.name for spec in methods() if spec.kind == "learned"]


def hydra_cfg(*overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def multirun(sweep_dir, *overrides, timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "adamerge.cli", "--multirun", *TINY, f"hydra.sweep.dir={sweep_dir}", *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("plugin", ["hydra_joblib_launcher", "hydra_submitit_launcher", "hydra_optuna_sweeper"])
def test_the_sweep_extra_is_installed(plugin):
    assert importlib.util.find_spec(f"hydra_plugins.{plugin}"), "install the sweep extra: pip install -e '.[sweep]'"


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ],
)
def test_launcher_presets_come_from_the_plugins(launcher, target):
    assert hydra_cfg(f"hydra/launcher={launcher}").hydra.launcher._target_ == target


@pytest.mark.parametrize(
    "preset, methods",
    [("optuna_learned", LEARNED), ("optuna_ties", ["ties"]), ("optuna_calibration", ["average"])],
)
def test_optuna_presets_minimise_and_name_existing_method_keys(preset, methods):
    for method in methods:
        cfg = hydra_cfg(f"hydra/sweeper={preset}", f"method={method}")
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
        assert sweeper.sampler.seed == cfg.seed  # reproducible trials
        for key in sweeper.params or {}:  # a renamed method key would make every trial fail
            assert OmegaConf.select(cfg, key, default="missing") != "missing", f"{preset}: {key} not in method={method}"


@pytest.mark.slow
def test_joblib_launcher_runs_two_methods_in_parallel_processes(tmp_path):
    proc = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=ties,average")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    methods = {}
    for job in ("0", "1"):
        assert (tmp_path / job / ".hydra" / "config.yaml").exists(), job
        methods[job] = yaml.safe_load((tmp_path / job / "coefficients.json").read_text())["method"]
    assert methods == {"0": "ties", "1": "average"}


@pytest.mark.slow
def test_optuna_sweep_minimises_the_calibration_objective(tmp_path):
    # Depends on the task function returning run(cfg)["calibration_loss"] (adamerge/cli.py).
    multirun(
        tmp_path,
        "hydra/sweeper=optuna_learned",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "method.steps=3",
        "method.init=interval(0.2,0.4)",  # a command-line range replaces the preset's
    )
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"method.init", "method.optimizer.lr"}
    assert 0.2 <= result["best_params"]["method.init"] <= 0.4
    assert 1e-4 <= result["best_params"]["method.optimizer.lr"] <= 1e-1
    # every trial logs the objective it returned; the best is the smallest (direction: minimize)
    pattern = re.compile(r"calibration objective of the merge: (\S+)")
    values = [float(pattern.search((tmp_path / str(t) / "cli.log").read_text())[1]) for t in range(4)]
    assert all(math.isfinite(v) for v in values)
    assert result["best_value"] == pytest.approx(min(values), rel=1e-5)
