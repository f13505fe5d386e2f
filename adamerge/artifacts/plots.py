"""Pictures of learned coefficients: a tasks x groups heatmap and per-group curves per task."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from adamerge.artifacts.atomic import write_atomic


def coefficient_heatmap(table: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Save a heatmap of ``expert -> group -> lambda`` (rows: tasks, columns: layers/blocks) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = list(table)
    groups = list(next(iter(table.values())))
    values = [[table[e][g] for g in groups] for e in experts]
    width = min(max(6.0, 0.12 * len(groups) + 3), 30.0)
    fig, ax = plt.subplots(figsize=(width, 2.8 + 0.4 * len(experts)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(experts)), experts)
    step = max(1, len(groups) // 40)
    ax.set_xticks(range(0, len(groups), step), [short(g) for g in groups[::step]], rotation=90, fontsize=6)
    ax.set_xlabel("coefficient group (layer / block)")
    ax.set_title(title or "learned merging coefficients")
    fig.colorbar(image, ax=ax, label="lambda")
    fig.tight_layout()
    out = write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


def short(name: str, keep: int = 3) -> str:
    """The last ``keep`` dotted parts of a tensor/group name, enough to read an axis."""
    return ".".join(name.split(".")[-keep:])
