"""The coefficient table lam [K, G]: which merged tensors share a column (granularity) and how raw values map to
coefficients (identity + clamp, or sigmoid). Shared by the dense and the LoRA merged models.

Granularity decides which tensors share a coefficient column ``g``:

- ``task``: one coefficient per expert;
- ``layer``: one per expert per merged tensor (AdaMerging's layer-wise);
- ``block``: one per expert per transformer block (tensors outside blocks: one per parent module);
- ``chunk``: each tensor split into contiguous chunks with one coefficient each (Expert Merging++).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

GRANULARITIES = ("task", "layer", "block", "chunk")
PARAMETRIZATIONS = ("identity", "sigmoid")
# A transformer block: "...layers.3.", "...layer.3.", "...h.3.", "...blocks.3.", "...block.3.".
DEFAULT_BLOCK_PATTERN = r"^(.*?(?:layers?|h|blocks?)\.\d+)\."


def group_layout(
    names: Sequence[str],
    granularity: str,
    block_pattern: str = DEFAULT_BLOCK_PATTERN,
    chunks: int | Mapping[str, int] = 1,
) -> tuple[list[str], list[list[int]]]:
    """Coefficient columns: their names, and for each merged tensor the list of columns it uses (one per chunk)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {GRANULARITIES} (config key: method.granularity)"
        )
    if granularity == "task":
        return ["all"], [[0] for _ in names]
    if granularity == "layer":
        return list(names), [[i] for i in range(len(names))]
    if granularity == "block":
        keys = [block_key(n, block_pattern) for n in names]
        groups = list(dict.fromkeys(keys))
        return groups, [[groups.index(k)] for k in keys]
    columns, layout = [], []
    for name in names:
        n = chunks.get(name, 1) if isinstance(chunks, Mapping) else chunks
        if n < 1:
            raise ValueError(f"chunk count for {name!r} is {n}; it must be >= 1 (config key: method.chunks)")
        layout.append(list(range(len(columns), len(columns) + n)))
        columns += [f"{name}#{c}" for c in range(n)] if n > 1 else [name]
    return columns, layout


def block_key(name: str, pattern: str = DEFAULT_BLOCK_PATTERN) -> str:
    match = re.match(pattern, name)
    return match.group(1) if match else name.rpartition(".")[0] or name


class Coefficients(nn.Module):
    """The only trainable tensor: raw values [K, G] and their parametrisation (identity + clamp, or sigmoid)."""

    def __init__(
        self,
        num_experts: int,
        num_groups: int,
        init: float | Sequence[float] | Tensor = 0.3,
        parametrization: str = "identity",
        clamp: tuple[float, float] | None = (0.0, 1.0),
    ):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {parametrization!r}; choose one of {PARAMETRIZATIONS} "
                "(config key: method.parametrization)"
            )
        self.parametrization = parametrization
        self.clamp = tuple(clamp) if clamp is not None else None
        values = expand_init(init, num_experts, num_groups)
        if parametrization == "sigmoid":
            if not ((values > 0) & (values < 1)).all():
                raise ValueError("sigmoid coefficients need an init strictly inside (0, 1) (config key: method.init)")
            values = torch.logit(values)
        self.raw = nn.Parameter(values)

    def forward(self) -> Tensor:
        if self.parametrization == "sigmoid":
            return torch.sigmoid(self.raw)
        if self.clamp is not None:
            # Clamp in the forward (the AdaMerging recipe): the gradient is zero for a coefficient held at a bound.
            return self.raw.clamp(*self.clamp)
        return self.raw

    def assign(self, values: Tensor) -> None:
        """Set the coefficients (not the raw values) in place, e.g. to reproduce a run."""
        values = torch.as_tensor(values, dtype=self.raw.dtype)
        if values.shape != self.raw.shape:
            raise ValueError(
                f"coefficient tensor has shape {tuple(values.shape)}, expected {tuple(self.raw.shape)} "
                "(experts x groups)"
            )
        check_finite(values, "coefficients")
        with torch.no_grad():
            self.raw.copy_(torch.logit(values) if self.parametrization == "sigmoid" else values)


def expand_init(init: float | Sequence[float] | Tensor, num_experts: int, num_groups: int) -> Tensor:
    """A scalar, a per-expert vector [K] or a full [K, G] table -> a float32 [K, G] tensor."""
    values = torch.as_tensor(init, dtype=torch.float32)
    if values.dim() == 0:
        return values.expand(num_experts, num_groups).clone()
    if values.dim() == 1 and values.numel() == num_experts:
        return values[:, None].expand(num_experts, num_groups).clone()
    if values.shape == (num_experts, num_groups):
        return values.clone()
    raise ValueError(
        f"coefficient init has shape {tuple(values.shape)}; give a scalar, one value per expert ({num_experts}) or "
        f"a table of {num_experts} x {num_groups} (config key: method.init)"
    )


def check_finite(values: Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero()[:3].tolist()
        raise FloatingPointError(f"{what} contain NaN/inf at indices {bad}; lower the learning rate or check the data")
