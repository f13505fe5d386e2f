"""Activation checkpointing for the functional merged forward: store each block's input, recompute it in the backward.

Why a module of our own: ``functional_call`` swaps the merged tensors into the base only while the forward runs, and
a checkpointed block is recomputed later, in the backward, when the base's own weights are back. The recompute must
therefore re-install the tensors its forward used; here it does, through non-reentrant ``torch.utils.checkpoint``'s
``context_fn``. Hugging Face's ``gradient_checkpointing_enable`` recomputes with the base's frozen weights (with
tiny BERT under ``functional_call`` the backward fails: ``CheckpointError``, 28 tensors saved in the forward, 22 in
the recompute), and it checkpoints only modules in train mode, while the frozen base runs in eval mode.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call itself swaps with
from torch.utils.checkpoint import checkpoint


def block_names(tensor_names: Sequence[str], pattern: str) -> list[str]:
    """The transformer blocks (``pattern``'s first group, e.g. ``bert.encoder.layer.3``) holding merged tensors."""
    matches = (re.match(pattern, n) for n in tensor_names)
    return list(dict.fromkeys(m.group(1) for m in matches if m))


@contextmanager
def checkpointed_blocks(model: nn.Module, blocks: Sequence[str], params: Mapping[str, Tensor]) -> Iterator[None]:
    """While open, each of ``blocks`` keeps only its inputs and is recomputed in the backward with ``params``."""
    params = dict(params)

    def contexts():  # (around the forward, around the recompute)
        return nullcontext(), _reparametrize_module(model, params, strict=False)

    modules = [model.get_submodule(name) for name in blocks]
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = partial(checkpoint, module.forward, use_reentrant=False, context_fn=contexts)
    try:
        yield
    finally:
        for module, previous in zip(modules, saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
