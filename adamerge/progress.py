"""Progress bars for long work (loading the pool, evaluating, static merges): shown on an interactive terminal when
the calling module logs at INFO, silent in logs, CI and pipes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable


def progress(items: Iterable, desc: str, log: logging.Logger, **kwargs):
    """``items`` wrapped in a tqdm bar (left behind only while it runs)."""
    from tqdm import tqdm

    quiet = not (sys.stderr.isatty() and log.isEnabledFor(logging.INFO))
    return tqdm(items, desc=desc, disable=quiet, leave=False, **kwargs)
