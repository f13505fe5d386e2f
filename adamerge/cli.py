"""The ``adamerge`` command: a Hydra app over ``conf/`` (shipped in the package as ``adamerge.conf``), plus
subcommands that need no config: ``methods`` (the registry), ``estimate`` (a memory plan) and ``merge-files`` (an
out-of-core static merge)."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from adamerge.config_files import config_dir

log = logging.getLogger(__name__)


def auto_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, full precision elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("adamerge_precision"):
        OmegaConf.register_new_resolver("adamerge_precision", auto_precision)


USAGE = """\
usage: adamerge [OVERRIDE ...]            merge as configured (a Hydra app over conf/train.yaml)
       adamerge methods                   list the registered methods: kind, needs, description, paper
       adamerge estimate MODEL --experts K   memory plan of a merge, from the config only (no weights)
       adamerge merge-files METHOD --base B --expert NAME=PATH ... --out DIR
                                          a static merge tensor by tensor from safetensors (out-of-core)

examples:
  adamerge experiment=tiny                             tiny BERT experts + synthetic data, < 1 min on a CPU
  adamerge experiment=tiny method=ties                 a static merge instead
  adamerge experiment=tiny_lm method=expert_merging    causal-LM experts (held-out response loss)
  adamerge --multirun experiment=tiny method=adamerging,adamerging_task
  adamerge experiment=tiny hydra.run.dir=outputs/run1 ckpt_path=last    resume an interrupted run

config groups (choose with group=option): experts, data, method, objective, evaluator, trainer, logger,
callbacks, experiment, debug. Hydra's own help (the composed config, its flags): adamerge --hydra-help;
adamerge --cfg job prints the composed config.
"""


def list_methods() -> str:
    """One line per registered method, read from the registry (so it cannot fall out of date)."""
    from adamerge.methods.registry import composes, methods

    specs = methods()
    width = max(len(s.name) for s in specs)
    lines = [f"{'method':<{width}}  {'kind':<7}  needs / description / paper / composes"]
    learners = [s.name for s in specs if s.kind == "learned"]
    for s in specs:
        lines.append(f"{s.name:<{width}}  {s.kind:<7}  needs {s.needs.describe()}")
        lines.append(f"{'':<{width}}  {'':<7}  {s.description}")
        lines.append(f"{'':<{width}}  {'':<7}  {s.paper}")
        if composes(s):
            lines.append(f"{'':<{width}}  {'':<7}  composes: method.transform={s.name} under every learner")
    usable = ", ".join(s.name for s in specs if composes(s))
    return "\n".join(lines) + (
        "\n\nchoose one with: adamerge method=<name>; its options: conf/method/<name>.yaml"
        f"\nlearn coefficients over a static method's per-task vectors: adamerge method=<learner> method.transform=<name>"
        f"\n  learners: {', '.join(learners)}\n  transforms: {usable}"
    )


def main() -> None:
    import sys

    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return
    if command == "methods":
        print(list_methods())
        return
    if command == "estimate":  # `adamerge estimate MODEL --experts K`: no Hydra, no weights
        from adamerge.estimate import main as estimate

        estimate(sys.argv[2:])
        return
    if command == "merge-files":  # out-of-core static merge: no Hydra, no pool
        from adamerge.methods.file_merge import main as merge_files

        merge_files(sys.argv[2:])
        return
    import hydra

    register_resolvers()

    @hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
    def _main(cfg) -> float | None:
        from hydra.errors import InstantiationException

        from adamerge.pipeline import run

        try:
            # Sweepers (Optuna) minimise what the task returns: the merge's calibration objective.
            return run(cfg)["calibration_loss"]
        except InstantiationException as err:
            # Bad experts or data (PoolError, DataError, AdapterError) name the key to fix: show that, not Hydra's wrap.
            if isinstance(err.__cause__, ValueError):
                raise SystemExit(f"error: {err.__cause__}") from err
            raise

    _main()


if __name__ == "__main__":
    main()
