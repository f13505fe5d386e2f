"""Pictures of a run, and the readers they need.

- ``coefficients.png``: the learned lambdas by transformer block (embeddings, layer 0 ... layer N, head/other) and
  tensor kind (attention q/k/v/out, mlp in/out, norms; weight or bias), one panel per expert. Block and kind come
  from the tensor names (``block_label``, ``tensor_kind``), for BERT, Llama, GPT-2, CLIP and similar names.
- ``training.png``: the objective (``train/loss`` and per task) and the coefficient statistics against the step,
  read from whichever logger ran: Lightning's CSV, TensorBoard event files, or an offline W&B run.
- ``results.png``: the primary metric per task of every row of the results table (the floor, the experts, task
  arithmetic, the method); the axis names the metric and its direction.

``write_run_plots`` writes the three (atomically) and ``log_images`` sends them to the run's Lightning loggers.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no backend switch), so the same functions draw
inline in ``notebooks/explore_run.ipynb``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from adamerge.artifacts.atomic import write_atomic

log = logging.getLogger(__name__)

Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)

# The first "<layers|layer|h|blocks|block>.<index>" in a name: the transformer block it belongs to.
LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?=\.|$|#)")
TOWERS = {"vision_model": "vision", "visual": "vision", "vision_tower": "vision", "text_model": "text"}
NORM_BEFORE_ATTN = {"ln_1", "layer_norm1", "input_layernorm", "layernorm_before", "norm1", "attention_norm"}
NORM_BEFORE_MLP = {"ln_2", "layer_norm2", "post_attention_layernorm", "layernorm_after", "norm2", "ffn_norm"}
ATTN_PARTS = {
    "attn q": {"query", "q_proj", "q", "q_lin"},
    "attn k": {"key", "k_proj", "k", "k_lin"},
    "attn v": {"value", "v_proj", "v", "v_lin"},
    "attn qkv": {"c_attn", "qkv", "query_key_value", "in_proj", "qkv_proj", "wqkv"},
    "attn out": {"o_proj", "out_proj", "c_proj", "o", "dense", "out_lin", "wo"},
}
MLP_PARTS = {
    "mlp gate": {"gate_proj", "wi_0"},
    "mlp in": {"fc1", "c_fc", "up_proj", "wi", "wi_1", "dense_h_to_4h", "lin1"},
    "mlp out": {"fc2", "c_proj", "down_proj", "wo", "dense_4h_to_h", "lin2"},
}
EMBEDDINGS = {
    "token emb": {"word_embeddings", "embed_tokens", "wte", "token_embedding", "shared"},
    "position emb": {"position_embeddings", "wpe", "position_embedding", "embed_positions"},
    "token type emb": {"token_type_embeddings"},
    "patch emb": {"patch_embedding", "patch_embeddings", "projection"},
    "class emb": {"class_embedding", "cls_token"},
}
PRE_NORMS = {"pre_layrnorm", "pre_layernorm", "ln_pre"}  # CLIP's norm between the embeddings and the first block
HEADS = {"classifier": "classifier", "lm_head": "lm head", "score": "score head", "pooler": "pooler"}


# ---------------------------------------------------------------- names -> block and kind


def split_chunk(name: str) -> tuple[str, int | None]:
    """``"w#3"`` -> ``("w", 3)`` (chunk 3 of tensor w, chunk granularity); other names -> ``(name, None)``."""
    stem, sep, chunk = name.rpartition("#")
    return (stem, int(chunk)) if sep and chunk.isdigit() else (name, None)


def _tower(prefix: str) -> str:
    """``"vision "`` / ``"text "`` / ``"decoder "`` when the name sits in one tower of a two-tower model."""
    for part in prefix.split("."):
        if part in TOWERS:
            return TOWERS[part] + " "
        if part == "decoder":
            return "decoder "
    return ""


def _is_embedding(parts: Sequence[str]) -> bool:
    return any("embed" in p or p in ("wte", "wpe", "shared", "cls_token") or p in PRE_NORMS for p in parts)


def block_label(name: str) -> str:
    """The block a coefficient group belongs to: ``embeddings``, ``layer N``, ``head/other`` or ``all tensors``.

    Works on tensor names (``bert.encoder.layer.3.attention.self.query.weight``, ``model.layers.3.mlp.up_proj.weight``,
    ``transformer.h.3.attn.c_attn.weight``, ``vision_model.encoder.layers.3.mlp.fc1.weight``), chunk names
    (``<tensor>#c``), block keys (``bert.encoder.layer.3``) and ``all`` (task-wise). Two-tower and encoder-decoder
    models get a ``vision`` / ``text`` / ``decoder`` prefix.
    """
    name, _ = split_chunk(name)
    if name == "all":
        return "all tensors"
    match = LAYER.search(name)
    if match:
        return f"{_tower(name[: match.start()])}layer {match.group(1)}"
    parts = name.split(".")
    return _tower(name) + ("embeddings" if _is_embedding(parts) else "head/other")


def _param(name: str) -> tuple[list[str], str]:
    """Module path parts and the parameter (``weight`` / ``bias``, or ``""`` for a block or module key)."""
    parts = name.split(".")
    last = parts[-1]
    if last in ("weight", "bias"):
        return parts[:-1], last
    for suffix in ("_weight", "_bias"):  # nn.MultiheadAttention's in_proj_weight
        if last.endswith(suffix):
            return parts[:-1] + [last[: -len(suffix)]], suffix[1:]
    return parts, ""


def _is_norm(part: str) -> bool:
    return "norm" in part or re.fullmatch(r"ln(_\w+)?", part) is not None


def _layer_kind(parts: Sequence[str]) -> str:
    """Kind of a tensor inside a transformer block, from its module path below the block."""
    if not parts:
        return ""
    last, low = parts[-1], [p.lower() for p in parts]
    in_attn = any("attn" in p or "attention" in p for p in low[:-1])
    if _is_norm(last.lower()):
        if last in NORM_BEFORE_ATTN:
            return "attn norm"
        if last in NORM_BEFORE_MLP:
            return "mlp norm"
        if in_attn:
            return "attn norm"  # BERT: attention.output.LayerNorm
        return "mlp norm" if any(p in ("output", "mlp", "ffn", "feed_forward") for p in low) else "norm"
    if "intermediate" in low:  # BERT's mlp in: intermediate.dense
        return "mlp in"
    if in_attn or last in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj"):
        cross = any("encoder_attn" in p or "cross" in p or "encdec" in p for p in low[:-1])
        for kind, names in ATTN_PARTS.items():
            if last in names:
                return kind.replace("attn", "cross-attn") if cross else kind
    for kind, names in MLP_PARTS.items():
        if last in names:
            return kind
    if low[-2:] == ["output", "dense"]:  # BERT's mlp out: output.dense (attention.output.dense matched above)
        return "mlp out"
    return ".".join(parts)


def _outside_kind(parts: Sequence[str]) -> str:
    """Kind of a tensor outside the transformer blocks (embeddings, final norm, pooler, heads)."""
    if not parts:
        return ""
    for part in parts:
        if part in PRE_NORMS:
            return "pre norm"
    if _is_embedding(parts):
        for kind, names in EMBEDDINGS.items():
            if any(p in names for p in parts):
                return kind
        if parts[-1] in ("embeddings", "embedding"):
            return ""  # the embeddings module itself (a block-granularity group)
        return "norm" if _is_norm(parts[-1].lower()) else parts[-1]
    for part in parts:
        if part in HEADS:
            return HEADS[part]
    if _is_norm(parts[-1].lower()):
        return "final norm"
    return ".".join(parts[-2:]) if len(parts) > 1 else parts[0]


def tensor_kind(name: str) -> str:
    """What a group is inside its block: ``attn q weight``, ``mlp out bias``, ``attn norm weight``, ``token emb
    weight``, ``final norm weight``, ``classifier weight``...; ``""`` for a whole block (``encoder.layer.3``) or ``all``.

    Unknown module names fall back to their path inside the block, so two tensors of one block never share a kind
    unless their names map to the same known role (``coefficient_grid`` separates those by their paths).
    """
    name, _ = split_chunk(name)
    if name == "all":
        return ""
    match = LAYER.search(name)
    if match:
        rest = name[match.end() :].lstrip(".")
        parts, param = _param(rest) if rest else ([], "")
        kind = _layer_kind(parts)
    else:
        parts, param = _param(name)
        kind = _outside_kind(parts)
    return " ".join(x for x in (kind, param) if x)


def coefficient_grid(groups: Sequence[str]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Rows (tensor kinds), columns (blocks) and each group's (row, column) cell, in the model's order.

    Chunks of one tensor share a cell. Two different tensors of one block with the same kind are told apart by
    their path inside the block. Blocks and kinds appear in order of first appearance in ``groups``.
    """
    blocks = [block_label(g) for g in groups]
    kinds = [tensor_kind(g) for g in groups]
    tensors = [split_chunk(g)[0] for g in groups]
    owners: dict[tuple[str, str], set[str]] = {}
    for block, kind, tensor in zip(blocks, kinds, tensors):
        owners.setdefault((block, kind), set()).add(tensor)
    for i, (block, kind, tensor) in enumerate(zip(blocks, kinds, tensors)):
        if len(owners[(block, kind)]) > 1:
            match = LAYER.search(tensor)
            kinds[i] = tensor[match.end() :].lstrip(".") if match else tensor
    kinds = [k or "whole block" for k in kinds]
    rows, columns = list(dict.fromkeys(kinds)), list(dict.fromkeys(blocks))
    return rows, columns, [(rows.index(k), columns.index(b)) for k, b in zip(kinds, blocks)]


def column_labels(groups: Sequence[str]) -> list[str]:
    """One readable label per group for a flat axis: ``layer 3``, ``embeddings: token emb weight``, ``all tensors``."""
    labels = []
    for group in groups:
        block, kind = block_label(group), tensor_kind(group)
        _, chunk = split_chunk(group)
        label = f"{block}: {kind}" if kind else block
        labels.append(label if chunk is None else f"{label} #{chunk}")
    return labels


# ---------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _annotate(ax, values: Sequence[Sequence[float]], vmin: float, vmax: float, fontsize: float) -> None:
    middle = (vmin + vmax) / 2
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if not math.isnan(value):
                color = "black" if value > middle else "white"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)


def _limits(values: Iterable[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    return (low - 0.05, high + 0.05) if high - low < 1e-6 else (low, high)


def coefficient_figure(table: Mapping[str, Mapping[str, float]], title: str = ""):
    """Heatmap of ``expert -> group -> lambda``.

    Tensor-level groups (layer or chunk granularity) are drawn as one panel per expert: rows are tensor kinds,
    columns the blocks (embeddings, layer 0 ... N, head/other); chunk coefficients are averaged per tensor. Coarser
    groups (one per block, or ``all``) are one panel: experts x blocks.
    """
    import matplotlib

    experts = list(table)
    if not experts:
        raise ValueError("no coefficients to draw: the table has no experts")
    groups = list(table[experts[0]])
    blocks = [block_label(g) for g in groups]
    per_block = len(groups) > len(set(blocks))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e8e8e8")
    vmin, vmax = _limits(float(table[e][g]) for e in experts for g in groups)
    chunked = any(split_chunk(g)[1] is not None for g in groups)
    heading = title or "learned merging coefficients"

    if not per_block:  # task-wise or one coefficient per block: experts x blocks
        labels = column_labels(groups)
        values = [[float(table[e][g]) for g in groups] for e in experts]
        fig = _figure(min(max(4.5, 0.35 * len(groups) + 3.5), 30.0), 1.6 + 0.4 * len(experts))
        ax = fig.add_subplot()
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(experts)), experts)
        ax.set_xticks(range(len(groups)), labels, rotation=90 if len(groups) > 4 else 0, fontsize=7)
        ax.set_xlabel("coefficient group (block)")
        if len(groups) * len(experts) <= 300:
            _annotate(ax, values, vmin, vmax, 7)
        ax.set_title(heading)
        fig.colorbar(image, ax=ax, label="lambda")
        return fig

    rows, columns, cells = coefficient_grid(groups)
    fig = _figure(min(max(7.0, 0.42 * len(columns) + 3.5), 30.0), 0.9 + len(experts) * (0.55 + 0.2 * len(rows)))
    axes = fig.subplots(len(experts), 1, squeeze=False, sharex=True)[:, 0]
    for ax, expert in zip(axes, experts):
        sums = [[0.0] * len(columns) for _ in rows]
        counts = [[0] * len(columns) for _ in rows]
        for group, (r, c) in zip(groups, cells):
            sums[r][c] += float(table[expert][group])
            counts[r][c] += 1
        values = [[s / n if n else math.nan for s, n in zip(srow, nrow)] for srow, nrow in zip(sums, counts)]
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_ylabel(expert, fontsize=9, fontweight="bold")
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.tick_params(labelbottom=ax is axes[-1])
        if len(rows) * len(columns) <= 250:
            _annotate(ax, values, vmin, vmax, 6)
    axes[0].set_title(heading + (" (chunks averaged per tensor; grey: no tensor)" if chunked else " (grey: no tensor)"))
    axes[-1].set_xlabel("block")
    fig.colorbar(image, ax=list(axes), label="lambda", shrink=min(1.0, 4.0 / len(experts) + 0.2))
    return fig


def training_figure(series: Series, title: str = ""):
    """The objective (``train/loss``, and per task) and the coefficients' mean, +-std and min..max against the step;
    None when ``series`` holds neither."""
    loss_keys = [k for k in series if k == "train/loss" or k.startswith("train/loss/")]
    has_coef = "coef/mean" in series
    if not loss_keys and not has_coef:
        return None
    panels = int(bool(loss_keys)) + int(has_coef)
    fig = _figure(5.0 * panels + 1.0, 3.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if loss_keys:
        ax = axes[0]
        for key in sorted(loss_keys, key=lambda k: (k != "train/loss", k)):
            steps, values = series[key]
            total = key == "train/loss"
            label = "total" if total else key.removeprefix("train/loss/")
            style = dict(color="black", linewidth=2.0) if total else dict(linewidth=1.0, alpha=0.8)
            ax.plot(steps, values, label=label, marker="." if len(steps) <= 30 else None, **style)
        ax.set_xlabel("step")
        ax.set_ylabel("objective (train/loss)")
        ax.set_title("objective per step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if has_coef:
        ax = axes[-1]
        steps, mean = series["coef/mean"]
        if "coef/min" in series and "coef/max" in series:
            ax.fill_between(
                series["coef/min"][0],
                series["coef/min"][1],
                series["coef/max"][1],
                color="C0",
                alpha=0.12,
                label="min..max",
            )
        if "coef/std" in series and len(series["coef/std"][1]) == len(mean):
            std = series["coef/std"][1]
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color="C0",
                alpha=0.3,
                label="mean +- std",
            )
        ax.plot(steps, mean, color="C0", label="mean", marker="." if len(steps) <= 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("lambda")
        ax.set_title("coefficients per step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def result_tasks(table: Sequence[Mapping]) -> list[str]:
    """The task columns of a results table: numeric columns other than ``avg``, ``avg_normalized`` and the secondary
    metrics (``"<task> <metric>"``)."""
    numeric = [
        k for k in dict.fromkeys(k for row in table for k in row) if k not in ("method", "avg", "avg_normalized")
    ]
    numeric = [k for k in numeric if any(isinstance(row.get(k), (int, float)) for row in table)]
    return [k for k in numeric if not any(k.startswith(t + " ") for t in numeric if t != k)]


def results_figure(
    table: Sequence[Mapping],
    metric_name: str = "accuracy",
    higher_is_better: bool = True,
    tasks: Sequence[str] | None = None,
    title: str = "",
):
    """Grouped bars: the primary metric per task (and its average) for every row of the results table.

    Args:
        table: rows ``{"method": ..., <task>: value, ..., "avg": ..., "avg_normalized": ...}``.
        metric_name: the task columns' metric, named on the axis.
        higher_is_better: its direction, also named on the axis.
        tasks: the task columns to draw (default: ``result_tasks(table)``).
        title: the figure's title.
    """
    tasks = list(tasks) if tasks is not None else result_tasks(table)
    columns = tasks + (["avg"] if any("avg" in row for row in table) else [])
    if not table or not columns:
        raise ValueError("the results table has no task columns to draw")
    methods = [str(row["method"]) for row in table]
    fig = _figure(min(max(6.0, 0.28 * len(columns) * len(methods) + 3.0), 30.0), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    values = [[float(row.get(c, math.nan)) for c in columns] for row in table]
    for i, (method, vals) in enumerate(zip(methods, values)):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        bars = ax.bar(xs, vals, width, label=method, color="0.6" if "floor" in method else f"C{i}")
        if len(columns) * len(methods) <= 60:
            ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    low, high = _limits(v for row in values for v in row)
    # Bars start at zero for non-negative metrics (a cut axis exaggerates gaps); the labels give the exact values.
    ax.set_ylim(0.0 if low >= 0 else low - 0.1 * (high - low), high + 0.15 * (high - min(low, 0.0)))
    ax.set_xticks(
        range(len(columns)),
        columns,
        rotation=30 if len(columns) > 6 else 0,
        ha="right" if len(columns) > 6 else "center",
    )
    direction = "higher is better" if higher_is_better else "lower is better"
    ax.set_ylabel(f"{metric_name} ({direction})")
    ax.set_title(title or f"{metric_name} per task")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def coefficient_heatmap(table: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Save ``coefficient_figure(table, title)`` as a PNG."""
    return save_figure(coefficient_figure(table, title), path)


def write_run_plots(
    out_dir: str | Path,
    table: Sequence[Mapping] | None,
    coefficients: Mapping | None = None,
    metric_name: str = "accuracy",
    higher_is_better: bool = True,
    metrics_dir: str | Path | None = None,
    title: str = "",
) -> list[Path]:
    """Write ``coefficients.png`` (if ``coefficients``), ``training.png`` (if a logger left readable training metrics)
    and ``results.png`` (if ``table``) in ``out_dir``; returns the paths written.

    Args:
        out_dir: where the pictures go (the run dir, or the folder staging its outputs).
        table: the results table rows (``summarize``'s output), or None / empty when nothing was evaluated.
        coefficients: the coefficient record (``coefficients_record``: ``{"coefficients": {expert: {group: value}},
            ...}``) or the bare ``{expert: {group: value}}`` table; None for a static merge.
        metric_name: the task columns' metric (e.g. ``accuracy``, ``loss``).
        higher_is_better: the metric's direction.
        metrics_dir: the run dir the loggers write into (default ``out_dir``).
        title: a title prefix, e.g. the method's name.

    Training curves come from the files the loggers have written so far: CSV (after ``logger.save()``) and TensorBoard
    are readable during the run, but an offline W&B run flushes its history only when it finishes, so a W&B-only run
    gets no ``training.png`` from the pipeline (W&B draws those curves itself; the notebook reads them afterwards).
    """
    out_dir = Path(out_dir)
    written = []
    if coefficients:
        values = coefficients.get("coefficients", coefficients)
        granularity = coefficients.get("granularity")
        heading = " ".join(x for x in (title, f"({granularity}-wise)" if isinstance(granularity, str) else "") if x)
        written.append(save_figure(coefficient_figure(values, heading), out_dir / "coefficients.png"))
    found = read_training_metrics(metrics_dir or out_dir)
    fig = training_figure(found[0], title) if found else None
    if fig is not None:
        written.append(save_figure(fig, out_dir / "training.png"))
    if table:
        fig = results_figure(
            table, metric_name, higher_is_better, title=f"{title}: {metric_name} per task" if title else ""
        )
        written.append(save_figure(fig, out_dir / "results.png"))
    return written


def log_images(loggers: Iterable, paths: Iterable[str | Path], step: int | None = None) -> None:
    """Send PNGs to Lightning loggers, keyed by file stem: W&B ``log_image``, TensorBoard ``add_image``; others skip."""
    paths = [Path(p) for p in paths]
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        for path in paths:
            if hasattr(logger, "log_image"):
                logger.log_image(key=path.stem, images=[str(path)], step=step)
            elif hasattr(experiment, "add_image"):
                import matplotlib.image as mpimg

                experiment.add_image(path.stem, mpimg.imread(path)[..., :3], global_step=step, dataformats="HWC")


# ---------------------------------------------------------------- readers


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_results(run_dir: str | Path) -> list[dict] | None:
    """The rows of ``results.csv`` (numbers as floats), or None if the run wrote none."""
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return [
            {k: _number(v) if k != "method" else v for k, v in row.items() if v != ""} for row in csv.DictReader(handle)
        ]


def read_coefficients(run_dir: str | Path) -> dict | None:
    """The run's learned coefficient record (``coefficients.json`` with a ``coefficients`` table), or None: a static
    merge (its ``coefficients.json`` records only the method's options), or a run that stopped before writing it."""
    path = Path(run_dir) / "coefficients.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if isinstance(record, dict) and record.get("coefficients") else None


def _add(series: Series, key: str, step: int, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or key.startswith("results/"):
        return
    steps, values = series.setdefault(key, ([], []))
    steps.append(int(step))
    values.append(float(value))


def _csv_metrics(files: Sequence[Path]) -> Series:
    series: Series = {}
    for path in files:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, text in row.items():
                    if key != "step" and text not in ("", None):
                        _add(series, key, step, _number(text))
    return series


def _tensorboard_metrics(files: Sequence[Path]) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = {}
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for key in events.Tags().get("scalars", []):
            for event in events.Scalars(key):
                _add(series, key, event.step, event.value)
    return series


def _wandb_records(path: Path) -> Iterable[bytes]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-style log blocks
    of 32 KiB, each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a payload."""
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file")
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def _wandb_metrics(files: Sequence[Path]) -> Series:
    from wandb.proto import wandb_internal_pb2

    series: Series = {}
    for path in files:
        for payload in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            media = tuple(k.removesuffix("_type") for k in items if k.endswith("/_type"))  # images, tables
            items = {k: v for k, v in items.items() if not (media and k.startswith(media))}
            step = items.get("trainer/global_step", items.get("_step"))
            if step is not None:
                for key, value in items.items():
                    if not key.startswith(("_", "trainer/")) and key != "epoch":
                        _add(series, key, step, value)
    return series


LOGGER_FILES = {  # logger -> (glob under the run dir, reader)
    "csv": ("csv/version_*/metrics.csv", _csv_metrics),
    "tensorboard": ("tensorboard/version_*/events.out.tfevents.*", _tensorboard_metrics),
    "wandb": ("wandb/offline-run-*/run-*.wandb", _wandb_metrics),
}


def read_training_metrics(run_dir: str | Path) -> tuple[Series, str] | None:
    """The training series of the first logger that left readable metrics with training rows (CSV, then
    TensorBoard, then offline W&B), and a line naming the files; None if none did."""
    run_dir = Path(run_dir)
    for logger, (pattern, reader) in LOGGER_FILES.items():
        files = sorted(run_dir.glob(pattern))
        if not files:
            continue
        try:
            series = reader(files)
        except Exception as err:  # a logger's private format or a missing optional package: say so, try the next
            log.warning("could not read %s metrics from %s: %s", logger, files[0].parent, err)
            continue
        if any(k.startswith(("train/", "coef/")) for k in series):
            return series, f"{logger} logger: {', '.join(str(f.relative_to(run_dir)) for f in files)}"
    return None


# ---------------------------------------------------------------- what a run holds


def _run_config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # an unreadable config only costs the explanations
        return {}


def method_kind(run_dir: str | Path) -> tuple[str, str | None]:
    """The run's method name and kind (``"learned"`` / ``"static"``, None if unknown).

    From ``coefficients.json`` when the run wrote one (a learned merge records its coefficient table, a static one
    only its options), else from the config: the ``learned`` key of older configs, or the method registry.
    """
    run_dir = Path(run_dir)
    method = _run_config(run_dir).get("method") or {}
    path = run_dir / "coefficients.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    name = method.get("name") or (record or {}).get("method") or "the method"
    if isinstance(record, dict):
        return name, "learned" if record.get("coefficients") else "static"
    if isinstance(method.get("learned"), bool):
        return name, "learned" if method["learned"] else "static"
    if method.get("name"):
        try:  # imports the methods (torch): only for runs that stopped before writing coefficients.json
            from adamerge.methods.registry import get_spec

            return name, get_spec(name).kind
        except Exception:  # a method this install does not know
            pass
    return name, None


def primary_metric(run_dir: str | Path) -> tuple[str, bool]:
    """The run's primary metric and whether higher is better, from the first line of ``results.md`` (``Task
    columns: <metric> (<higher|lower> is better)``); ``("accuracy", True)`` for runs written before that line."""
    path = Path(run_dir) / "results.md"
    first = path.read_text().split("\n", 1)[0] if path.is_file() else ""
    match = re.match(r"Task columns: (.+?) \((higher|lower) is better\)", first)
    return (match.group(1), match.group(2) == "higher") if match else ("accuracy", True)


def describe_run(run_dir: str | Path) -> dict[str, str]:
    """What a run dir holds, for a reader: ``{"results" | "coefficients" | "training": sentence}``, each sentence
    saying where the item is, or why it is absent (a static method, no local logger, too few logged steps...)."""
    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    method = config.get("method") or {}
    name, kind = method_kind(run_dir)
    loggers = sorted((config.get("logger") or {}).keys())
    out = {}

    if (run_dir / "results.csv").is_file():
        metric, higher = primary_metric(run_dir)
        out["results"] = (
            f"results.csv: {metric} per task ({'higher' if higher else 'lower'} is better) of the floor, the experts, "
            "task arithmetic and the method"
        )
    elif config.get("evaluate") is False:
        out["results"] = "absent: the run was configured with evaluate=false"
    else:
        out["results"] = "absent: no results.csv (the run stopped before evaluating, or this is not a run dir)"

    if read_coefficients(run_dir) is not None:
        out["coefficients"] = "coefficients.json: the learned lambdas (expert -> group -> value)"
    elif kind == "static":
        out["coefficients"] = f"absent: {name} is a static merge (a fixed formula), it learns no coefficient table"
    else:
        out["coefficients"] = "absent: no coefficients.json (the run stopped before training ended)"

    found = read_training_metrics(run_dir)
    if found:
        out["training"] = f"training curves from the {found[1]}"
    elif kind == "static":
        out["training"] = f"absent: {name} is a static merge, no coefficients were trained"
    else:
        present = [logger for logger, (pattern, _) in LOGGER_FILES.items() if any(run_dir.glob(pattern))]
        if present:
            steps = method.get("steps")
            every = (config.get("trainer") or {}).get("log_every_n_steps")
            hint = f" ({steps} steps, logged every {every})" if steps and every else ""
            out["training"] = (
                f"absent: the {', '.join(present)} logger files hold no training rows{hint}: fewer steps than "
                "trainer.log_every_n_steps, or a W&B run that is still open"
            )
        elif loggers:
            out["training"] = f"absent: no local metrics files of the logger(s) {', '.join(loggers)} in this dir"
        else:
            out["training"] = "absent: the run had no logger (logger=csv, tensorboard or wandb records the curves)"
    return out
