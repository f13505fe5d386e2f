"""Atomic outputs: everything is written to a temporary sibling and renamed, so a crash leaves no half-written file."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# The names atomic_path gives its temporaries, next to the target ``<name>``: ``.<name>.<8 chars>`` (a directory from
# mkdtemp), ``.<name>.<pid>.tmp`` (a file) and ``.<name>.old.<pid>`` (the replaced directory, between two renames).
TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<old>old\.\d+)|(?P<file>\d+\.tmp)|(?P<dir>[a-z0-9_]{8}))$")


def check_writable(directory: str | Path) -> Path:
    """Fail before any long work if ``directory`` cannot be created or written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise PermissionError(
            f"output directory {directory} is not writable ({err.strerror}); choose another one "
            "(config key: hydra.run.dir or paths.output_dir)"
        ) from err
    return directory


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it into place (replacing an old one).

    A process killed inside the block leaves its temporary behind (no ``finally`` runs on SIGKILL or OOM):
    ``recover_temporaries`` removes those once no other process can be writing them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) if directory else None
    target = tmp if directory else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield target
        if directory and path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            path.rename(old)
            target.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(target, path)
    finally:
        if directory and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        elif not directory and target.exists():
            target.unlink()


def recover_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries ``atomic_path`` left in ``directory`` (not below it); returns what was removed.

    Only call this while no other process writes into ``directory`` (``claim_run_dir`` holds its lock). A replaced
    directory whose successor never arrived (``.<name>.old.<pid>`` without ``<name>``: killed between the two renames)
    is the last complete version, so it is renamed back instead of removed.
    """
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        match = TEMPORARY.match(entry.name)
        if match is None or (match["dir"] and not entry.is_dir()) or (match["file"] and entry.is_dir()):
            continue  # not a shape atomic_path creates (e.g. a user's ``.config.settings`` file)
        target = entry.with_name(match["name"])
        if match["old"] and not target.exists():
            entry.rename(target)
            log.warning("restored %s from %s (an interrupted replace)", target, entry.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    if removed:
        log.warning("removed %d stale temporaries from %s: %s", len(removed), directory, [p.name for p in removed])
    return removed


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")
