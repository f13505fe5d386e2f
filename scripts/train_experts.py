"""Train (or reuse from the cache) MiniLM experts on the shipped text tasks; prints {task: folder}.

python scripts/train_experts.py                                  # the 4-task default set
python scripts/train_experts.py --tasks all --multitask          # every task + the multi-task reference
python scripts/train_experts.py --heads cotrained                # heads trained with the backbone (bad for merging)
python scripts/train_experts.py --preset hard                    # the hard benchmark's 7 experts (conf/experts)
python scripts/train_experts.py --data-dir my_tasks --tasks all  # your own tasks (scripts/build_text_tasks.py --out)

Each expert's recipe.json keeps its learning curve (calib accuracy during fine-tuning) and its training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time


def parse_args(argv=None) -> argparse.Namespace:
    from adamerge.testbeds.minilm import HEAD_MODES, PRESETS, Recipe

    default = Recipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=None, help="comma-separated task names, or 'all' (default: the preset's)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="recipe and tasks to start from")
    p.add_argument("--data-dir", default=None, help="folder of your own tasks (default: the shipped ones)")
    p.add_argument("--base", default=None, help="hub id or folder of the base (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $ADAMERGE_CACHE or ~/.cache/adamerge)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--multitask", action="store_true", help="also train the multi-task reference model")
    p.add_argument("--heads", default=None, choices=HEAD_MODES)
    for field in ("steps", "lr", "batch_size", "max_length", "probe_steps", "max_train", "num_hidden_layers", "seed"):
        value = getattr(default, field)
        kind = float if isinstance(value, float) else int
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None, help=f"recipe.{field} ({value})")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    from adamerge.testbeds.minilm import Recipe, build_experts, build_multitask, preset_experts
    from adamerge.testbeds.text_tasks import available_tasks

    transformers.logging.set_verbosity_error()
    args = parse_args(argv)
    experts = preset_experts(args.preset)
    tasks = experts["tasks"] if args.tasks is None else args.tasks.split(",")
    tasks = available_tasks(args.data_dir) if tasks == ["all"] else tasks
    fields = {f.name for f in dataclasses.fields(Recipe)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    recipe = Recipe(**(experts["recipe"] | given))
    where = (args.base, args.cache_dir, args.device, args.data_dir)
    start = time.perf_counter()
    folders = {t: str(f) for t, f in build_experts(tasks, recipe, *where).items()}
    if args.multitask:
        folders["_multitask"] = str(build_multitask(tasks, recipe, *where))
    print(json.dumps({"recipe": dataclasses.asdict(recipe), "experts": folders}, indent=1))
    print(f"wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
