"""Reading a finished run directory back: its results table, coefficient record, training metrics (Lightning's CSV,
TensorBoard event files, or an offline W&B run) and what it holds or lacks (``describe_run``, for the notebook)."""

from __future__ import annotations

import csv
import json
import logging
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Series = dict[str, tuple[list[int], list[float]]]  # metric -> (steps, values)


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
