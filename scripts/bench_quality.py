"""Quality of every registered merging method on real MiniLM text experts, in one table (markdown to stdout and
--out, + JSON).

    python scripts/bench_quality.py                                   # 4 tasks, 3 seeds for the learned methods
    python scripts/bench_quality.py --multitask --seeds 0,1,2 --out bench_quality.md
    python scripts/bench_quality.py --steps 30 --seeds 0 --max-eval 200   # quicker
    python scripts/bench_quality.py --preset hard --multitask             # 7 tasks, converged experts (slow)
    python scripts/bench_quality.py --preset hard --expert-seeds 0,1      # + a second set of experts: the noise

An interrupted run resumes: rows already in ``<out>.partial.json`` from the same setup are kept, not re-run, and a
rerun with more ``--seeds`` runs only the seeds a row lacks.

With ``--expert-seeds`` the whole bench runs once per set of experts (``experts.recipe.seed``; files
``<out stem>.experts<seed>.*``) and ``--out`` gets the table across them: each method's average normalized accuracy
per set of experts, the spread between the sets (the experts' training noise) beside the spread over calibration
seeds, and which methods beat task arithmetic at its best lambda on every set by more than that noise.

The pool (experts built or reused from the cache) is loaded once and shared by all methods. Rows: the floor (base
backbone read through the probe heads: no merging), each expert on its own task (the ceiling of normalized
accuracy = acc / expert acc), the multi-task model (--multitask), task arithmetic with lambda chosen on the
calibration split's labels, and every method of the registry (``adamerge methods``), in its order (learned methods:
mean over seeds; the spread is the standard deviation of the average normalized accuracy over seeds). Each method is
configured by its conf/method/<name>.yaml composed over ``experiment=minilm_text`` (so with that experiment's
conf/tuning/minilm_text/<name>.yaml) and runs through ``method.merge``, exactly as ``adamerge`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

# 0.025 to 0.075: on the hard preset the best lambda was the old grid's edge, 0.1 (interfering task vectors)
TA_GRID = [0.025, 0.05, 0.075] + [round(0.1 * i, 1) for i in range(1, 11)]
TA_BEST = "task arithmetic (lam={lam:g}, grid on calib labels)"
MULTITASK = "multi-task model"
TA_ACROSS = "task arithmetic (best lambda on calib)"

log = logging.getLogger("bench_quality")


def parse_args(argv=None) -> argparse.Namespace:
    from adamerge.testbeds.minilm import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="minilm_text", help="the experiment config to start from")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="experts: quick (4 tasks) or hard")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the experiment's)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the learned methods")
    p.add_argument("--steps", type=int, default=None, help="learned methods' steps (default: the experiment's)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods to run")
    p.add_argument(
        "--compose",
        default="",
        help="learners over static methods' per-task vectors, e.g. adamerging/tsv_m,adamerging/ties "
        "(method.transform; rows named 'adamerging over tsv_m')",
    )
    p.add_argument("--max-eval", type=int, default=None, help="cap on test examples per task")
    p.add_argument("--multitask", action="store_true", help="also build and judge the multi-task model")
    p.add_argument("--out", default="bench_quality.md", help="markdown table (JSON beside it)")
    p.add_argument(
        "--expert-seeds",
        default=None,
        help="comma-separated experts.recipe.seed values: one bench per set of experts, and the table across them",
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. experts.recipe.steps=50")
    return p.parse_args(argv)


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def task_arithmetic_grid(merged, evaluator, calib, grid=TA_GRID) -> tuple[float, dict]:
    """The lambda of task arithmetic with the best mean accuracy on the labelled calibration split."""
    scores = {lam: accuracies(evaluator.evaluate(merged, merged.constant_params(lam), calib)) for lam in grid}
    means = {lam: statistics.mean(accs.values()) for lam, accs in scores.items()}
    best = max(means, key=means.get)
    if best in (min(grid), max(grid)):
        log.warning("task arithmetic's best lambda %g is the grid's edge: the row may understate it", best)
    return best, means


def accuracies(scores: dict) -> dict[str, float]:
    """{task: {metric: value}} -> {task: accuracy}."""
    return {task: metrics["accuracy"] for task, metrics in scores.items()}


def multitask_params(folder: Path, names) -> dict:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return {n: state[n] for n in names}


def run_bench(args) -> dict:
    from hydra.utils import instantiate

    from adamerge.atomic import write_text
    from adamerge.core.factory import merged_model
    from adamerge.evaluation.classification import Classification
    from adamerge.evaluation.protocol import EXPERT, FLOOR, reference_rows
    from adamerge.methods.registry import methods
    from adamerge.pipeline import check_tasks

    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    from adamerge.testbeds.minilm import PRESETS

    base = [f"experiment={args.experiment}", f"experts={PRESETS[args.preset]}", "~logger", "export=false"]
    if args.tasks:
        base.append(f"experts.tasks=[{args.tasks}]")
    if args.max_eval:
        base.append(f"data.max_eval={args.max_eval}")
    # method.* overrides may name keys of one method only (method.eta): they join each method's own compose
    cfg = compose_cfg(base + [f"paths.output_dir={work}"] + [o for o in args.overrides if not _is_method_key(o)])
    base += args.overrides
    wanted = set(args.methods.split(",")) if args.methods else None
    registered = {spec.name: spec for spec in methods()}
    pairs = [pair.split("/") for pair in args.compose.split(",") if pair]
    unknown = sorted((wanted or set()) - set(registered)) + sorted(
        {n for pair in pairs for n in pair} - set(registered)
    )
    if unknown or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"unknown methods {unknown} or malformed --compose {args.compose!r}; see `adamerge methods`")
    partial = Path(args.out).with_suffix(".partial.json")
    setup = {"overrides": base, "steps": args.steps}  # seeds are per row: more seeds later extend a row
    results = resumed(partial, setup)

    def record(name, accs_per_seed, seeds, steps, walls, **extra):
        results[name] = joined_row(results.get(name), accs_per_seed, seeds, steps, walls, **extra)
        write_text(partial, json.dumps({"setup": setup, "results": results}, indent=1, default=str))

    start = time.perf_counter()
    pool = instantiate(cfg.experts)
    pool_s = time.perf_counter() - start
    tasks = list(pool.experts)
    data = instantiate(cfg.data, num_steps=0)
    check_tasks(pool.experts, data.task_names)
    data.setup("fit")
    calib = instantiate(cfg.data, num_steps=0, eval_split="calib")
    calib.setup("fit")
    evaluator = Classification()

    merged = merged_model(pool, granularity="task")
    geometry = task_vector_geometry(pool.task_vectors, tasks)
    t = time.perf_counter()
    if FLOOR not in results or EXPERT not in results:
        refs = {row: accuracies(scores) for row, scores in reference_rows(merged, evaluator, data, 0.3).items()}
        record(FLOOR, [refs[FLOOR]], [], 0, [0.0])
        record(EXPERT, [refs[EXPERT]], [], cfg.experts.recipe.steps, [pool_s], note="wall = building/loading the pool")
    ref_s = time.perf_counter() - t

    if args.multitask and MULTITASK not in results:
        from adamerge.testbeds.minilm import Recipe, build_multitask

        t = time.perf_counter()
        recipe = Recipe(**cfg.experts.recipe)
        folder = build_multitask(
            tasks, recipe, cfg.experts.base, cfg.experts.cache_dir, data_dir=cfg.experts.get("data_dir")
        )
        wall = time.perf_counter() - t
        params = multitask_params(folder, merged.names)
        record(MULTITASK, [accuracies(evaluator.evaluate(merged, params, data))], [], recipe.steps, [wall])

    if (wanted is None or "task_arithmetic" in wanted) and not any(map(is_best_task_arithmetic, results)):
        t = time.perf_counter()
        best, grid = task_arithmetic_grid(merged, evaluator, calib)
        wall = time.perf_counter() - t
        accs = accuracies(evaluator.evaluate(merged, merged.constant_params(best), data))
        record(TA_BEST.format(lam=best), [accs], [], 0, [wall], grid=grid)

    seeds = [int(s) for s in args.seeds.split(",")]
    for spec in registered.values():
        if wanted is None or spec.name in wanted:
            todo = missing_seeds(results, spec.name, seeds if spec.seeded else [None])
            if todo:
                run_method(spec, todo, args, base, work, pool, evaluator, record)
    for learner, transform in pairs:
        name = f"{learner} over {transform}"
        if todo := missing_seeds(results, name, seeds):
            extra = [f"method.transform={transform}"]
            run_method(registered[learner], todo, args, base, work, pool, evaluator, record, extra, name)
    return {
        "tasks": tasks,
        "results": results,
        "geometry": geometry,
        "reference_s": ref_s,
        "config": str(cfg.experts.recipe),
    }


def _is_method_key(override: str) -> bool:
    return override.lstrip("+~").startswith("method.")


def resumed(partial: Path, setup: dict) -> dict:
    """Rows of an interrupted run with the same setup (overrides, seeds, steps); otherwise none."""
    if not partial.is_file():
        return {}
    saved = json.loads(partial.read_text())
    if saved.get("setup") != setup:
        log.info("%s is from another setup: starting afresh", partial)
        return {}
    log.info("resuming: %d rows from %s (%s)", len(saved["results"]), partial, ", ".join(saved["results"]))
    return saved["results"]


def joined_row(row: dict | None, accs: list, seeds: list, steps: int, walls: list, **extra) -> dict:
    """A table row; seeds run after an interruption (or asked for later) join the row's earlier seeds."""
    row = {"accs": [], "seeds": [], "walls": [], "coefficients": []} | (row or {})
    row = row | {
        "accs": row["accs"] + accs,
        "seeds": row["seeds"] + seeds,
        "walls": row["walls"] + walls,
        "coefficients": row["coefficients"] + extra.pop("coefficients", []),
    }
    return row | {"steps": steps, "wall_s": statistics.mean(row["walls"]), **extra}


def missing_seeds(results: dict, name: str, seeds: list) -> list:
    """The seeds a row still needs: all of them for a new row, none for a finished seedless row ([None])."""
    if name not in results:
        return seeds
    return [s for s in seeds if s is not None and s not in results[name]["seeds"]]


def task_vector_geometry(task_vectors: dict, tasks: list[str]) -> dict:
    """Norm of each task vector over every merged tensor, and the pairwise cosine similarities: interference."""
    import torch

    dots = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
    for stack in task_vectors.values():
        flat = stack.reshape(len(tasks), -1).double()
        dots += flat @ flat.T
    norms = dots.diagonal().sqrt()
    cosines = dots / norms.outer(norms)
    return {"norms": dict(zip(tasks, norms.tolist())), "cosines": cosines.tolist()}


def run_method(spec, seeds, args, base, work, pool, evaluator, record, extra=(), name=None) -> None:
    """One registered method through ``method.merge``, over seeds for learned methods (the seed orders the
    calibration stream); the pool is shared. A first pass over the task vectors (AdaMerging++'s TIES, DOGE's delta)
    does not depend on the seed: it runs once and the seeds learn over its result."""
    import torch
    from hydra.utils import instantiate

    from adamerge.methods.registry import Run, build_method

    name = name or spec.name
    accs, per_task, walls, coefs, steps, learned_pool = [], [], [], [], 0, None
    for seed in seeds:
        over = base + [f"method={spec.name}", *extra, f"paths.output_dir={work / name / str(seed)}"]
        over += [f"seed={seed}"] if seed is not None else []
        if args.steps is not None and spec.kind == "learned":
            over.append(f"method.steps={args.steps}")
        mcfg = compose_cfg(over)
        method = build_method(mcfg.method)
        steps = method.calibration_steps
        data = instantiate(mcfg.data, num_steps=steps)
        data.setup("fit")
        t = time.perf_counter()
        if spec.kind == "learned" and method.transform is not None:  # a static method's transform is its protocol
            learned_pool = learned_pool or method.pool_for_learning(Run(mcfg, pool, data))
            method = dataclasses.replace(method, transform=None)
        torch.manual_seed(mcfg.seed)
        result = method.merge(Run(mcfg, learned_pool or pool, data))
        walls.append(time.perf_counter() - t)
        accs.append(accuracies(evaluator.evaluate(result.model, result.params, data)))
        if result.task_params is not None:  # each task through its own merge (TALL masks)
            own = {t: evaluator.evaluate(result.model, p, data, [t])[t] for t, p in result.task_params.items()}
            per_task.append(accuracies(own))
        coefs.append(result.coefficients)
        log.info("%s seed %s: %s (%.0f s)", name, seed, accs[-1], walls[-1])
    lr = method.optimizer["lr"] if spec.kind == "learned" else None
    used = [mcfg.seed] if seeds == [None] else seeds
    record(name, accs, used, steps, walls, lr=lr, coefficients=coefs)
    if per_task:
        record(f"{name} (per-task)", per_task, used, steps, walls)


def normalized(bench: dict) -> dict[str, list[float]]:
    """Row -> average normalized accuracy (acc / expert acc, mean over tasks) of each seed."""
    from adamerge.evaluation.protocol import EXPERT

    tasks, results = bench["tasks"], bench["results"]
    expert = results[EXPERT]["accs"][0]
    return {
        name: [statistics.mean(a[t] / expert[t] for t in tasks) for a in res["accs"]] for name, res in results.items()
    }


def is_best_task_arithmetic(name: str) -> bool:
    """Task arithmetic's grid row, named by the lambda it picked."""
    return name.startswith(TA_BEST[:20])


def best_task_arithmetic(results: dict) -> str | None:
    return next(filter(is_best_task_arithmetic, results), None)


def gap_closed(score: float, task_arithmetic: float) -> float:
    """How much of the way from task arithmetic (at its best lambda) to the experts (normalized 1.0) a row goes."""
    if task_arithmetic >= 1.0:  # nothing left to close (experts that barely train)
        return float("nan")
    return (score - task_arithmetic) / (1.0 - task_arithmetic)


def table(bench: dict) -> list[dict]:
    """One row per method: per-task 'acc / normalized', averages, spread over seeds, the gap closed over task
    arithmetic at its best lambda, seeds, steps, wall time."""
    from adamerge.evaluation.protocol import EXPERT

    tasks, results = bench["tasks"], bench["results"]
    expert = results[EXPERT]["accs"][0]
    norms = normalized(bench)
    ta = best_task_arithmetic(results)
    rows = []
    for name, res in results.items():
        per_seed_norm = norms[name]
        mean = {t: statistics.mean(a[t] for a in res["accs"]) for t in tasks}
        row = {"method": name}
        row |= {t: f"{mean[t]:.3f} / {mean[t] / expert[t]:.3f}" for t in tasks}
        row["avg acc"] = f"{statistics.mean(mean.values()):.3f}"
        row["avg norm"] = f"{statistics.mean(per_seed_norm):.3f}"
        row["± (std over seeds)"] = f"{statistics.stdev(per_seed_norm):.3f}" if len(per_seed_norm) > 1 else ""
        if ta is not None:
            row["gap closed"] = f"{gap_closed(statistics.mean(per_seed_norm), statistics.mean(norms[ta])):+.2f}"
        row["seeds"] = ",".join(map(str, res["seeds"])) or "-"
        row["steps"] = res["steps"] or "-"
        row["wall s"] = f"{res['wall_s']:.0f}"
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def geometry_markdown(bench: dict) -> str:
    """The task vectors' norms and pairwise cosines, as a table."""
    tasks, geometry = bench["tasks"], bench["geometry"]
    lines = ["| task | norm of tau | " + " | ".join(f"cos({t})" for t in tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
    for t, row in zip(tasks, geometry["cosines"]):
        lines.append(f"| {t} | {geometry['norms'][t]:.3f} | " + " | ".join(f"{c:.3f}" for c in row) + " |")
    return "\n".join(lines) + "\n"


def figure(bench: dict, path: Path) -> Path:
    """Methods as bars (mean and std over seeds of the average normalized accuracy); the floor, task arithmetic,
    the multi-task model and the experts as lines."""
    from adamerge.artifacts.plots import method_bars, save_figure
    from adamerge.evaluation.protocol import EXPERT, FLOOR

    norms = normalized(bench)
    ta = best_task_arithmetic(bench["results"])
    references = {FLOOR: "floor (base + heads)", EXPERT: "experts", MULTITASK: "multi-task model"}
    if ta is not None:
        references[ta] = ta.split(",")[0] + ")"
    lines = {label: statistics.mean(norms[row]) for row, label in references.items() if row in norms}
    bars = {name: values for name, values in norms.items() if name not in references}
    return save_figure(method_bars(bars, lines, f"{len(bench['tasks'])} tasks: average normalized accuracy"), path)


def canonical(name: str) -> str:
    """Task arithmetic's row is named by its lambda, which each set of experts picks for itself."""
    return TA_ACROSS if is_best_task_arithmetic(name) else name


def across_experts(benches: dict[int, dict]) -> dict:
    """{expert seed: bench} -> per method: the average normalized accuracy per set of experts that ran it (mean over
    calibration seeds), the calibration-seed std (largest over sets), the spread between the sets, and whether it
    beats task arithmetic at its best lambda on every set by more than both rows' expert spreads. A method that
    ran on one set only has no spread and no verdict."""
    per_set = {seed: {canonical(n): v for n, v in normalized(b).items()} for seed, b in benches.items()}
    names = list(dict.fromkeys(n for rows_ in per_set.values() for n in rows_))
    rows = {}
    for name in names:
        values = {seed: rows_[name] for seed, rows_ in per_set.items() if name in rows_}
        means = {seed: statistics.mean(v) for seed, v in values.items()}
        rows[name] = {
            "per_set": means,
            "mean": statistics.mean(means.values()),
            "expert_spread": max(means.values()) - min(means.values()) if len(means) > 1 else None,
            "seed_std": max((statistics.stdev(v) for v in values.values() if len(v) > 1), default=None),
        }
    ta = rows.get(TA_ACROSS)
    for name, row in rows.items():
        if ta is None or name == TA_ACROSS or row["expert_spread"] is None or ta["expert_spread"] is None:
            continue
        margins = [row["per_set"][s] - ta["per_set"][s] for s in row["per_set"]]
        noise = row["expert_spread"] + ta["expert_spread"]
        row["vs_ta"] = "above" if min(margins) > noise else "below" if max(margins) < -noise else "within noise"
    return rows


def across_markdown(rows: dict, seeds: list[int]) -> str:
    header = [f"experts seed {s}" for s in seeds] + ["mean", "expert spread", "calib-seed std", "vs task arithmetic"]
    lines = ["| method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]

    def number(x):
        return "-" if x is None else f"{x:.3f}"

    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["mean"]):
        cells = [number(row["per_set"].get(s)) for s in seeds]
        cells += [number(row["mean"]), number(row["expert_spread"]), number(row["seed_std"]), row.get("vs_ta", "")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def across_figure(rows: dict, path: Path) -> Path:
    """Methods as bars over the sets of experts (error bar: their std); floor, task arithmetic, multi-task model and
    experts as lines."""
    from adamerge.artifacts.plots import method_bars, save_figure
    from adamerge.evaluation.protocol import EXPERT, FLOOR

    labels = {FLOOR: "floor (base + heads)", EXPERT: "experts", MULTITASK: "multi-task model", TA_ACROSS: TA_ACROSS}
    lines = {label: rows[name]["mean"] for name, label in labels.items() if name in rows}
    # a method run on one set of experts gets a bar without an error bar
    bars = {name: list(row["per_set"].values()) for name, row in rows.items() if name not in labels}
    title = f"{len(next(iter(rows.values()))['per_set'])} sets of experts: average normalized accuracy"
    return save_figure(method_bars(bars, lines, title), path)


def write_bench(bench: dict, out: Path) -> str:
    """The table of one bench (markdown at ``out``, JSON and figure beside it); returns the markdown."""
    from adamerge.atomic import write_text

    text = to_markdown(table(bench))
    text += (
        "\nCells: accuracy / normalized accuracy (acc / expert acc). Learned methods: mean over seeds. Gap closed: "
        "(row - task arithmetic at its best lambda) / (experts - task arithmetic), on the average normalized "
        f"accuracy. Wall time of this process {bench['total_s']:.0f} s (rows resumed from a partial file not counted).\n\nTask vectors (all merged tensors):\n\n"
    )
    text += geometry_markdown(bench)
    write_text(out, text)
    write_text(out.with_suffix(".json"), json.dumps(bench, indent=1, default=str))
    figure(bench, out.with_suffix(".png"))
    return text


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    from adamerge.atomic import write_text

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    out = Path(args.out)
    if args.expert_seeds is None:
        start = time.perf_counter()
        bench = run_bench(args)
        bench["total_s"] = time.perf_counter() - start
        print(write_bench(bench, out))
        print(f"wrote {out} and its .json, .png")
        return
    seeds = [int(s) for s in args.expert_seeds.split(",")]
    benches = {}
    for seed in seeds:  # each set of experts: its own resumable bench and files
        one = argparse.Namespace(**vars(args))
        one.overrides = [*args.overrides, f"experts.recipe.seed={seed}"]
        one.out = str(out.with_name(f"{out.stem}.experts{seed}{out.suffix}"))
        start = time.perf_counter()
        benches[seed] = run_bench(one)
        benches[seed]["total_s"] = time.perf_counter() - start
        write_bench(benches[seed], Path(one.out))
    rows = across_experts(benches)
    text = across_markdown(rows, seeds)
    text += (
        "\nAverage normalized accuracy per set of experts (mean over calibration seeds). Expert spread: max - min "
        "over the sets of experts. vs task arithmetic: above or below its best lambda on every set by more than the "
        "two rows' expert spreads together, else within noise.\n"
    )
    write_text(out, text)
    write_text(out.with_suffix(".json"), json.dumps({"seeds": seeds, "rows": rows}, indent=1))
    across_figure(rows, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out} and its .json, .png; one bench per set of experts beside it")


if __name__ == "__main__":
    main()
