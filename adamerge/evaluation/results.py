"""The results table: one row per merge, the primary metric per task, its average and the normalized score.

Normalized score per task, by the metric's direction:

- higher is better (accuracy): ``value / expert value`` (normalized accuracy, the field's usual number);
- lower is better (a held-out loss): the fraction of the gap between the floor (the base) and the expert that the
  merge keeps, ``(floor - value) / (floor - expert)``: 1 = as good as the expert, 0 = no better than the base.

Other metrics (e.g. perplexity) go into the CSV as ``<task> <metric>`` columns.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from adamerge.atomic import write_text
from adamerge.evaluation.protocol import EXPERT, FLOOR, Metric, Scores


def normalized(value: float, expert: float | None, floor: float | None, metric: Metric) -> float:
    """One task's normalized score (module docstring); NaN where the reference is missing or degenerate."""
    if expert is None:
        return math.nan
    if metric.higher_is_better:
        return value / expert if expert else math.nan
    if floor is None or floor == expert:
        return math.nan
    return (floor - value) / (floor - expert)


def summarize(rows: Mapping[str, Scores], metrics: Sequence[Metric]) -> list[dict]:
    """Table rows: ``method``, each task's primary metric, ``avg``, ``avg_normalized``, then secondary metrics."""
    primary = metrics[0]
    experts, floor = rows.get(EXPERT, {}), rows.get(FLOOR, {})

    def ref(table: Scores, task: str) -> float | None:
        return table[task][primary.name] if task in table else None

    out = []
    for method, scores in rows.items():
        values = {task: s[primary.name] for task, s in scores.items()}
        # a row with no task (the experts' row when no evaluation task maps to an expert) has no average, not 0
        row = {"method": method, **values, "avg": sum(values.values()) / len(values) if values else math.nan}
        norms = [normalized(v, ref(experts, t), ref(floor, t), primary) for t, v in values.items()]
        norms = [n for n in norms if not math.isnan(n)]
        row["avg_normalized"] = sum(norms) / len(norms) if norms else math.nan
        for metric in metrics[1:]:
            row |= {f"{task} {metric.name}": s[metric.name] for task, s in scores.items() if metric.name in s}
        out.append(row)
    return out


def to_markdown(table: list[dict], metric: Metric | None = None) -> str:
    """A markdown table; with ``metric``, a first line saying what the task columns hold and its direction."""
    columns = list(dict.fromkeys(k for row in table for k in row))
    lines = []
    if metric is not None:
        direction = "higher is better" if metric.higher_is_better else "lower is better"
        lines += [f"Task columns: {metric.name} ({direction}); avg_normalized: see adamerge.evaluation.results.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row.get(c, "") for c in columns]
        lines.append("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def write_results(table: list[dict], out_dir: str | Path, metric: Metric | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return (
        write_text(out_dir / "results.csv", to_csv(table)),
        write_text(out_dir / "results.md", to_markdown(table, metric)),
    )
