"""Pictures of a run.

- ``coefficients.png``: the learned lambdas by transformer block (embeddings, layer 0 ... layer N, head/other) and
  tensor kind (attention q/k/v/out, mlp in/out, norms; weight or bias), one panel per expert
  (``adamerge.artifacts.tensor_names``).
- ``training.png``: the objective (``train/loss`` and per task) and the coefficient statistics against the step,
  read from whichever logger ran (``adamerge.artifacts.run_reader``).
- ``results.png``: the primary metric per task of every row of the results table (the floor, the experts, task
  arithmetic, the method); the axis names the metric and its direction.

``write_run_plots`` writes the three (atomically) and ``log_images`` sends them to the run's Lightning loggers.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no backend switch), so the same functions draw
inline in ``notebooks/explore_run.ipynb``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from adamerge.artifacts.run_reader import Series, read_training_metrics
from adamerge.artifacts.tensor_names import block_label, coefficient_grid, column_labels, split_chunk
from adamerge.atomic import write_atomic

log = logging.getLogger(__name__)


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


def method_bars(bars: Mapping[str, Sequence[float]], lines: Mapping[str, float], title: str = ""):
    """One horizontal bar per method (its mean over seeds, the standard deviation as an error bar), best on top, and
    reference values (floor, task arithmetic, experts) as labelled vertical lines."""
    import statistics

    names = sorted(bars, key=lambda n: statistics.mean(bars[n]))
    means = [statistics.mean(bars[n]) for n in names]
    errors = [statistics.stdev(bars[n]) if len(bars[n]) > 1 else 0.0 for n in names]
    fig = _figure(7.5, 1.2 + 0.28 * len(names))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), means, xerr=errors, color="#4c72b0", ecolor="black", capsize=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for k, (label, value) in enumerate(lines.items()):
        ax.axvline(value, color=f"C{k + 1}", linestyle=styles[k % len(styles)], label=f"{label} {value:.3f}")
    everything = means + list(lines.values())
    low, high = min(everything), max(everything)
    ax.set_xlim(low - 0.1 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    ax.set_xlabel("average normalized accuracy (higher is better)")
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title)
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
