"""Where the Hydra configuration lives: read by the CLI and by the registry (a method's preset)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """``conf/`` beside the package (editable install) or inside it (wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"adamerge's conf/ not found next to {here}; reinstall the package")
