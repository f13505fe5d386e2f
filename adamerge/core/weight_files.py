"""Reading weight files safely: PyTorch state dicts with ``weights_only=True`` (never an arbitrary pickle), and the
error every unreadable expert file raises (``PoolError``, naming the expert, the file and the config key)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class PoolError(ValueError):
    """Bad experts: the message names the expert, the tensor or file, and the config key to fix."""


def expert_key(name: str) -> str:
    """The config key that gives an expert's source."""
    return f"experts.experts.{name}"


def load_torch_state(file: Path, expert: str) -> dict[str, Tensor]:
    """A ``torch.save``'d state dict, loaded with ``weights_only=True``: pickled code is refused, not run."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (pre-zip) format: no mmap
    except Exception as err:
        raise PoolError(
            f"expert {expert!r}: cannot read {file} as a PyTorch state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); it is corrupt, or holds more than tensors (only "
            f"weights_only loading is allowed): save model.state_dict() or safetensors, or fix {expert_key(expert)}"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PoolError(
            f"expert {expert!r}: {file} holds a {type(state).__name__} that is not a state dict (name -> tensor); "
            f"save model.state_dict() into it, or fix {expert_key(expert)}"
        )
    return dict(state)
