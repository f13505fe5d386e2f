"""Quality of every merging method on real MiniLM text experts, in one table (markdown to stdout and --out, + JSON).

    python scripts/bench_quality.py                                   # 4 tasks, 3 seeds for the learned methods
    python scripts/bench_quality.py --multitask --seeds 0,1,2 --out bench_quality.md
    python scripts/bench_quality.py --steps 30 --seeds 0 --max-eval 200   # quicker

The pool (experts built or reused from the cache) is loaded once and shared by all methods. Rows: the floor (base
backbone read through the probe heads: no merging), each expert on its own task (the ceiling of normalized
accuracy = acc / expert acc), the multi-task model (--multitask), weight averaging, task arithmetic (lambda chosen on
the calibration split's labels, and at 0.3), every other static method of conf/method, and the learned methods
(mean over seeds; the spread is the standard deviation of the average normalized accuracy over seeds). Each method
is configured by its conf/method/<name>.yaml composed over ``experiment=minilm_text``, as ``adamerge`` would run it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

# Run order: the cheap static merges, the learned methods, then DOGE (its data-free solve is the slowest merge).
ORDER = [
    "average",
    "ties",
    "dare",
    "adamerging_task",
    "adamerging",
    "adamerging_pp",
    "expert_merging",
    "doge",
    "doge_adamerging",
]
TA_GRID = [round(0.1 * i, 1) for i in range(1, 11)]

log = logging.getLogger("bench_quality")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="minilm_text", help="the experiment config to start from")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the experiment's)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the learned methods")
    p.add_argument("--steps", type=int, default=None, help="learned methods' steps (default: the experiment's)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods to run")
    p.add_argument("--max-eval", type=int, default=None, help="cap on test examples per task")
    p.add_argument("--multitask", action="store_true", help="also build and judge the multi-task model")
    p.add_argument("--out", default="bench_quality.md", help="markdown table (JSON beside it)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. experts.recipe.steps=50")
    return p.parse_args(argv)


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


def method_exists(name: str) -> bool:
    from adamerge.cli import config_dir

    return (Path(config_dir()) / "method" / f"{name}.yaml").exists()


def task_arithmetic_grid(merged, calib_loaders, grid=TA_GRID) -> tuple[float, dict]:
    """The lambda of task arithmetic with the best mean accuracy on the labelled calibration split."""
    from adamerge.evaluation.classification import constant_params, evaluate

    scores = {lam: evaluate(merged, constant_params(merged, lam), calib_loaders) for lam in grid}
    means = {lam: statistics.mean(accs.values()) for lam, accs in scores.items()}
    return max(means, key=means.get), means


def multitask_params(folder: Path, names) -> dict:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return {n: state[n] for n in names}


def run_bench(args) -> dict:
    from hydra.utils import instantiate

    from adamerge.core.merged import MergedModel
    from adamerge.evaluation.classification import EXPERT, FLOOR, constant_params, evaluate, reference_rows
    from adamerge.pipeline import check_tasks

    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    base = [f"experiment={args.experiment}", f"paths.output_dir={work}", "~logger", "export=false"]
    if args.tasks:
        base.append(f"experts.tasks=[{args.tasks}]")
    if args.max_eval:
        base.append(f"data.max_eval={args.max_eval}")
    # method.* overrides may name keys of one method only (method.merge.eta): they join each method's own compose
    cfg = compose_cfg(base + [o for o in args.overrides if not o.lstrip("+~").startswith("method.")])
    base += args.overrides
    wanted = set(args.methods.split(",")) if args.methods else None

    def selected(name: str) -> bool:
        return (wanted is None or name in wanted) and method_exists(name)

    results: dict[str, dict] = {}

    partial = Path(args.out).with_suffix(".partial.json")

    def record(name, accs_per_seed, seeds, steps, wall, **extra):
        results[name] = {"accs": accs_per_seed, "seeds": seeds, "steps": steps, "wall_s": wall, **extra}
        partial.write_text(json.dumps(results, indent=1, default=str))  # an interrupted run keeps what it measured

    start = time.perf_counter()
    pool = instantiate(cfg.experts)
    pool_s = time.perf_counter() - start
    tasks = list(pool.experts)
    datamodule = instantiate(cfg.data, num_steps=0)
    check_tasks(pool.experts, datamodule.task_names)
    datamodule.setup("fit")
    loaders = datamodule.eval_dataloaders()
    calib = instantiate(cfg.data, num_steps=0, eval_split="calib")
    calib.setup("fit")
    calib_loaders = calib.eval_dataloaders()

    merged = MergedModel(pool, granularity="task")
    t = time.perf_counter()
    refs = reference_rows(merged, loaders, 0.3)
    ref_s = time.perf_counter() - t
    record(FLOOR, [refs[FLOOR]], [], 0, 0.0)
    record(EXPERT, [refs[EXPERT]], [], cfg.experts.recipe.steps, pool_s, note="wall = building/loading the pool")

    if args.multitask:
        from adamerge.testbeds.minilm import Recipe, build_multitask

        t = time.perf_counter()
        folder = build_multitask(tasks, Recipe(**cfg.experts.recipe), cfg.experts.base, cfg.experts.cache_dir)
        wall = time.perf_counter() - t
        params = multitask_params(folder, merged.names)
        record("multi-task model", [evaluate(merged, params, loaders)], [], cfg.experts.recipe.steps, wall)

    if selected("task_arithmetic"):
        t = time.perf_counter()
        best, grid = task_arithmetic_grid(merged, calib_loaders)
        wall = time.perf_counter() - t
        accs = evaluate(merged, constant_params(merged, best), loaders)
        record(f"task arithmetic (lam={best:g}, grid on calib labels)", [accs], [], 0, wall, grid=grid)
        record("task arithmetic (lam=0.3)", [refs["task arithmetic (lam=0.3)"]], [], 0, 0.0)

    seeds = [int(s) for s in args.seeds.split(",")]
    for name in ORDER:
        if not selected(name):
            continue
        mcfg = compose_cfg(base + [f"method={name}"])
        if mcfg.method.learned:
            learn_method(name, seeds, args, base, work, pool, loaders, record)
            continue
        t = time.perf_counter()
        params = instantiate(mcfg.method.merge)(pool)
        wall = time.perf_counter() - t
        record(name, [evaluate(merged, params, loaders)], [mcfg.seed], 0, wall)
    return {"tasks": tasks, "results": results, "reference_s": ref_s, "config": str(cfg.experts.recipe)}


def learn_method(name, seeds, args, base, work, pool, loaders, record) -> None:
    """One learned method over seeds (the seed orders the calibration stream); the pool is shared."""
    import torch
    from hydra.utils import instantiate

    from adamerge.engine.train import learn
    from adamerge.evaluation.classification import evaluate
    from adamerge.pipeline import build_merged

    accs, walls, coefs, steps, transformed = [], [], [], 0, None
    for seed in seeds:
        over = base + [f"method={name}", f"seed={seed}", f"paths.output_dir={work / name / str(seed)}"]
        if args.steps is not None:
            over.append(f"method.steps={args.steps}")
        mcfg = compose_cfg(over)
        steps = mcfg.method.steps
        t = time.perf_counter()
        if transformed is None:  # the transforms here (TIES, DOGE) do not depend on the seed
            transformed = instantiate(mcfg.method.transform)(pool) if mcfg.method.get("transform") else pool
        torch.manual_seed(seed)
        learned = build_merged(mcfg.method, transformed)
        learn(mcfg, learned, instantiate(mcfg.data, num_steps=steps))
        walls.append(time.perf_counter() - t)
        with torch.no_grad():
            params = learned.merged_tensors()
        accs.append(evaluate(learned, params, loaders))
        coefs.append(learned.coefficient_table())
        log.info("%s seed %d: %s (%.0f s)", name, seed, accs[-1], walls[-1])
    record(name, accs, seeds, steps, statistics.mean(walls), lr=mcfg.method.optimizer.lr, coefficients=coefs)


def table(bench: dict) -> list[dict]:
    """One row per method: per-task 'acc / normalized', averages, spread over seeds, seeds, steps, wall time."""
    from adamerge.evaluation.classification import EXPERT

    tasks, results = bench["tasks"], bench["results"]
    expert = results[EXPERT]["accs"][0]
    rows = []
    for name, res in results.items():
        per_seed_norm = [statistics.mean(a[t] / expert[t] for t in tasks) for a in res["accs"]]
        mean = {t: statistics.mean(a[t] for a in res["accs"]) for t in tasks}
        row = {"method": name}
        row |= {t: f"{mean[t]:.3f} / {mean[t] / expert[t]:.3f}" for t in tasks}
        row["avg acc"] = f"{statistics.mean(mean.values()):.3f}"
        row["avg norm"] = f"{statistics.mean(per_seed_norm):.3f}"
        row["± (std over seeds)"] = f"{statistics.stdev(per_seed_norm):.3f}" if len(per_seed_norm) > 1 else ""
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


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    start = time.perf_counter()
    bench = run_bench(args)
    bench["total_s"] = time.perf_counter() - start
    text = to_markdown(table(bench))
    text += (
        f"\nCells: accuracy / normalized accuracy (acc / expert acc). Learned methods: mean over seeds. "
        f"Total wall time {bench['total_s']:.0f} s.\n"
    )
    print(text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(bench, indent=1, default=str))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
