"""notebooks/explore_run.ipynb on every kind of run, made by the real CLI in one sweep: a learned merge logged to
CSV, a learned merge logged only to W&B (offline), and a static merge (no coefficients, no training curves).

CI also executes the notebook as shipped (``pytest --nbmake notebooks``), which makes its own tiny run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adamerge.artifacts.run_reader import describe_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``<method>-<logger>`` run dirs for adamerging and ties, each logged to CSV or to offline W&B."""
    root = tmp_path_factory.mktemp("runs")
    wandb_home = root / "wandb-home"  # keep W&B's settings and cache out of the user's home
    env = os.environ | {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(wandb_home),
        "WANDB_CACHE_DIR": str(wandb_home),
        "WANDB_DATA_DIR": str(wandb_home),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "adamerge.cli",
        "--multirun",
        "experiment=tiny",
        "method=adamerging,ties",
        "logger=csv,wandb",
        "export=false",
        "calibration_batches=0",
        f"hydra.sweep.dir={root}",
        "hydra.sweep.subdir=${method.name}-${hydra:runtime.choices.logger}",
    ]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"the CLI sweep failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return root


def execute(run_dir: Path) -> tuple[str, int]:
    """Run the notebook on ``run_dir``; its text outputs and the number of pictures it drew."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))
    assert "RUN_DIR = None" in parameters.source
    parameters.source = parameters.source.replace("RUN_DIR = None", f"RUN_DIR = {str(run_dir)!r}")
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}
    ).execute()
    texts, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            data = output.get("data", {})
            texts.append(data.get("text/markdown", ""))
            images += "image/png" in data
    return "\n".join(texts), images


def test_notebook_on_a_learned_run_logged_to_csv(runs):
    text, images = execute(runs / "adamerging-csv")
    assert "training curves from the csv logger" in text
    assert "absent" not in text
    assert images == 4  # results, coefficients heatmap, per-block means, training curves


def test_notebook_on_a_learned_run_logged_only_to_wandb(runs):
    run_dir = runs / "adamerging-wandb"
    assert not (run_dir / "csv").exists() and any(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    text, images = execute(run_dir)
    assert "training curves from the wandb logger" in text  # read from the offline run file
    assert images == 4


def test_notebook_on_a_static_run_says_what_is_absent(runs):
    text, images = execute(runs / "ties-csv")
    assert "absent: ties is a static merge (a fixed formula), it learns no coefficient table" in text
    assert "absent: ties is a static merge, no coefficients were trained" in text
    assert images == 1  # the results chart
    # the same static merge under the W&B logger: nothing was logged, and the notebook's summary says the same
    assert describe_run(runs / "ties-wandb") == describe_run(runs / "ties-csv")
