"""`make demo`: real MiniLM experts on real text tasks, merged by layer-wise AdaMerging, on a CPU.

    python scripts/demo.py               # 4 tasks; trains the experts once (cached), then learns the coefficients
    python scripts/demo.py --all-tasks   # all 7 shipped tasks (7 experts: longer)

Prints the results table (floor, experts, task arithmetic at 0.3, AdaMerging) and writes results.md and
coefficients.png into --out-dir. The experts are the benchmark's (same recipe, same cache); the demo shortens only
the merge: fewer AdaMerging steps and a test subset (see the README section on the offline benchmark).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

DEMO_OVERRIDES = ["method.steps=40", "data.max_eval=200", "export=false", "~logger"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all-tasks", action="store_true", help="merge all shipped tasks, not the 4-task default")
    p.add_argument("--out-dir", default="outputs/demo", help="where results.md and coefficients.png go")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. method=ties")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import transformers
    from hydra import compose, initialize_config_dir

    from adamerge.cli import config_dir, register_resolvers
    from adamerge.evaluation.results import to_markdown
    from adamerge.pipeline import run
    from adamerge.testbeds.text_tasks import available_tasks

    transformers.logging.set_verbosity_error()
    register_resolvers()
    out_dir = Path(args.out_dir).resolve()
    overrides = ["experiment=minilm_text", f"paths.output_dir={out_dir}", *DEMO_OVERRIDES]
    if args.all_tasks:
        overrides.append(f"experts.tasks=[{','.join(available_tasks())}]")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides + args.overrides)
    shutil.rmtree(out_dir, ignore_errors=True)  # the demo's own folder: a fresh run, not a resume (one run per dir)
    start = time.perf_counter()
    result = run(cfg)
    print(to_markdown(result["table"]))
    print(f"wall time {time.perf_counter() - start:.0f} s; results and coefficients.png in {out_dir}")


if __name__ == "__main__":
    main()
