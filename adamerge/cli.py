"""The ``adamerge`` command: a Hydra app over ``conf/`` (shipped in the package as ``adamerge.conf``).

adamerge experiment=tiny                       # tiny experts + synthetic data, < 1 min on CPU
adamerge experiment=tiny method=ties           # a static merge
adamerge --multirun experiment=tiny method=adamerging,adamerging_task
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def config_dir() -> str:
    """``conf/`` beside the package (editable install) or inside it (wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"adamerge's conf/ not found next to {here}; reinstall the package")


def auto_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, full precision elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("adamerge_precision"):
        OmegaConf.register_new_resolver("adamerge_precision", auto_precision)


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "estimate":  # `adamerge estimate MODEL --experts K`: no Hydra, no weights
        from adamerge.estimate import main as estimate

        estimate(sys.argv[2:])
        return
    import hydra

    register_resolvers()

    @hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
    def _main(cfg) -> None:
        from adamerge.pipeline import run

        run(cfg)

    _main()


if __name__ == "__main__":
    main()
