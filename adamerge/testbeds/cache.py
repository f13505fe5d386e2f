"""Where the testbeds' trained experts and bases live, and the keys that name them.

Shared by every testbed (``minilm``, ``smollm2``): an expert's folder is named by its recipe's hash and its task's
data hash, and its seed comes from its task's name, so the same task with the same recipe and rows is trained once,
whatever list of tasks it is in.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from adamerge.testbeds.text_tasks import task_fingerprint


def task_seed(task: str) -> int:
    """An expert's own seed, from its task's name: the same task trains the same expert whatever list it is in."""
    return int.from_bytes(hashlib.sha256(task.encode()).digest()[:4], "little")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else env ``ADAMERGE_CACHE``, else ``~/.cache/adamerge``."""
    return Path(cache_dir or os.environ.get("ADAMERGE_CACHE") or Path.home() / ".cache" / "adamerge").expanduser()


def data_key(task: str, data_dir: str | Path | None) -> str:
    """``<task>-<hash of its rows>``: a task whose data changed (or another folder's task of the same name) gets its
    own expert instead of a stale one."""
    return f"{task}-{task_fingerprint(task, data_dir)}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
