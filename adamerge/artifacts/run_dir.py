"""One run per output directory, and outputs that appear together or not at all.

``claim_run_dir`` locks the Hydra run dir for the whole run: a second live run into it, or a fresh run over an
earlier run's checkpoints and results, is refused with the config key to change. ``staged_outputs`` collects the
results, coefficients and merged model in a hidden folder and moves them into the run dir only when the block ends
without error, so a run killed midway never leaves a ``coefficients.json`` that disagrees with
``merged/coefficients.json``.

Guarantees are against a process dying (kill, OOM, preemption), not a power loss: nothing is fsync'ed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adamerge.atomic import TEMPORARY, check_writable, recover_temporaries, write_json

try:  # POSIX (Linux, macOS); Windows has no flock and runs unlocked (see claim_run_dir)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".adamerge.lock"
STAGE_PREFIX = ".staged."
COMMIT_MARKER = ".commit.json"
# What a run writes into its directory; any of them means an earlier run started training or finished.
RUN_OUTPUTS = (
    "checkpoints",
    "coefficients.json",
    "coefficients.png",
    "results.csv",
    "results.md",
    "results.png",
    "training.png",
    "merged",
)


class RunDirError(RuntimeError):
    """The output directory cannot take this run; the message names the config key to change."""


@contextmanager
def claim_run_dir(out_dir: str | Path, resume: bool) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` for the block; refuse a second live run or a fresh run over an old one.

    On entry, with the lock held: an interrupted ``staged_outputs`` commit is finished, temporaries that killed runs
    left (``.<name>.*`` from ``atomic_path``, uncommitted stages) are removed, and unless ``resume`` the directory
    must hold none of ``RUN_OUTPUTS`` (Hydra's ``.hydra/`` and log, which exist before the task runs, are fine).

    The lock is ``fcntl.flock`` on ``out_dir/.adamerge.lock``: the kernel drops it when the process dies, so a killed
    run never blocks the next one. The lock file stays (removing it would let two runs lock two different files).
    flock works on local disks and NFSv4; where the file system refuses it (some Lustre mounts) or on Windows the run
    goes on unlocked with a warning.

    Args:
        out_dir: the run's output directory (``cfg.paths.output_dir``, the Hydra run dir); created if missing.
        resume: the run continues an earlier one (``ckpt_path`` set), so its checkpoints and outputs are expected.
    """
    out_dir = check_writable(out_dir)
    with open(out_dir / LOCK_NAME, "a+") as handle:
        locked = _lock(handle, out_dir)
        try:
            finish_interrupted_commits(out_dir)
            recover_temporaries(out_dir)
            if not resume:
                check_fresh(out_dir)
            yield out_dir
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _lock(handle, out_dir: Path) -> bool:
    """Take the lock without waiting and record who holds it; False where locks are unsupported."""
    if fcntl is None:  # pragma: no cover
        log.warning("no fcntl on this platform: %s is not locked against a second run", out_dir)
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        raise RunDirError(
            f"output directory {out_dir} is in use by another adamerge run ({holder}). Give this run its own "
            "directory (hydra.run.dir=..., or hydra.sweep.dir=... with --multirun), or wait until the other run "
            "ends and resume it with ckpt_path=last"
        ) from None
    except OSError as err:
        log.warning("cannot lock %s (%s): not protected against a second run", out_dir, err.strerror)
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return True


def check_fresh(out_dir: str | Path) -> None:
    """Refuse a fresh run in a directory where an earlier run left checkpoints or outputs."""
    out_dir = Path(out_dir)
    found = [name for name in RUN_OUTPUTS if _nonempty(out_dir / name)]
    if found:
        raise RunDirError(
            f"output directory {out_dir} already holds a run ({', '.join(found)}); use ckpt_path=last to resume "
            "or choose another hydra.run.dir (hydra.sweep.dir with --multirun)"
        )


def _nonempty(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


@contextmanager
def staged_outputs(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out_dir``; move its entries into ``out_dir`` only if the block succeeds.

    Write every final output (results, coefficients, plots, the merged model) under the yielded folder. On error the
    folder is dropped and ``out_dir`` keeps what it had. On success a commit marker is written first, then each
    entry replaces its namesake in ``out_dir``; a process killed during those renames leaves the marker behind and
    the next ``claim_run_dir`` of this directory finishes the commit, so the outputs are always all old or all new.

    Args:
        out_dir: the run directory, already claimed with ``claim_run_dir`` by this process.
    """
    out_dir = Path(out_dir)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGE_PREFIX))
    try:
        yield stage
        write_json(stage / COMMIT_MARKER, {"entries": sorted(p.name for p in stage.iterdir())})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # Interrupted from here on, the marker stays and the next claim_run_dir of out_dir finishes the commit.
    _roll_forward(stage, out_dir)


def _roll_forward(stage: Path, out_dir: Path) -> None:
    """Move a committed stage's entries into ``out_dir``; safe to run again after a crash at any point."""
    replaced = stage / ".replaced"
    for name in json.loads((stage / COMMIT_MARKER).read_text())["entries"]:
        source, target = stage / name, out_dir / name
        if not source.exists():  # moved before the crash
            continue
        if target.exists() or target.is_symlink():
            replaced.mkdir(exist_ok=True)
            target.rename(replaced / name)
        source.rename(target)
    shutil.rmtree(stage)


def finish_interrupted_commits(out_dir: str | Path) -> list[Path]:
    """Finish the ``staged_outputs`` commits a killed run left half done; returns their stages.

    Stages without a commit marker were never complete: ``recover_temporaries`` removes them with the rest.
    """
    finished = []
    for stage in sorted(Path(out_dir).glob(f"{STAGE_PREFIX}*")):
        match = TEMPORARY.match(stage.name)
        if stage.is_dir() and match and match["dir"] and (stage / COMMIT_MARKER).is_file():
            _roll_forward(stage, Path(out_dir))
            log.warning("finished moving the outputs of an interrupted run into %s", out_dir)
            finished.append(stage)
    return finished
