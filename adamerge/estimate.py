"""Memory plan of a merge, from a model config and the number of experts, before any weight is loaded.

The model is built on the ``meta`` device (shapes only). What a learned merge holds on the training device:

- the frozen base (``base_dtype``);
- the task-vector stacks, K x the merged tensors (``tau_dtype``), unless streamed from host memory; with
  ``storage="lowrank"`` each 2-D tensor as rank-r factors K x r (m + n) where that is smaller than K x m n (the
  training's rule). The rank is ``rank`` when given; with ``energy`` it depends on the weights, so a plan from shapes
  counts min(rank, m, n): an upper bound;
- at each step the merged tensors theta(lambda) and, with the split backward, their gradients (``base_dtype``);
- activations, which depend on the batch and are not counted here.

The data-driven closed forms hold statistics instead (``statistics_plan``): RegMean one fp32 input Gram ``[d, d]``
per merged linear layer and expert (a 7B Llama's ``down_proj`` reads 11008 features: 11008^2 floats per expert and
layer), all of them at once after the per-expert passes; RegMean++ one stage's (a transformer block's) Grams for the
K experts at a time; Fisher merging one fp32 Fisher per merged parameter and expert.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch

from adamerge.core.lowrank import worth_compressing
from adamerge.core.pool import DEFAULT_HEAD_PATTERNS, import_object, resolve_dtype, select_merged_names

GIB = 1024**3
STORAGES = ("resident", "streamed", "lowrank")


class ModelSourceError(FileNotFoundError):
    """The base model's config cannot be read from the given source (no such folder, no reachable hub id)."""


def read_config(source: str):
    """The ``transformers`` config of ``source``; a ``ModelSourceError`` naming the source if it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        path = Path(source).expanduser()
        if path.exists():
            raise ModelSourceError(f"{source}: cannot read a model config there ({reason})") from err
        raise ModelSourceError(
            f"{source} is neither a local folder nor a reachable hub id (no such path here; the hub said: {reason})"
        ) from err


def meta_model(source: str, model_class: str = "transformers.AutoModel"):
    """The architecture of ``source`` (hub id, folder or config.json) with no weights allocated."""
    config = read_config(source)
    cls = import_object(model_class)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def memory_plan(
    model: torch.nn.Module,
    num_experts: int,
    tau_dtype: str | torch.dtype = "float32",
    base_dtype: str | torch.dtype = "float32",
    storage: str = "resident",
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    head_patterns: Iterable[str] = DEFAULT_HEAD_PATTERNS,
    rank: int | None = None,
    energy: float | None = None,
) -> dict[str, float]:
    """Bytes per component (device and host), for a model whose parameters may live on the meta device.

    Args:
        model: the base architecture (``meta_model``): only shapes are read.
        num_experts: K.
        tau_dtype: task-vector storage dtype (config key ``experts.dtype``).
        base_dtype: dtype of the base and the merged tensors.
        storage: ``resident`` (on the device), ``streamed`` (host memory) or ``lowrank`` (``method.storage``).
        include: globs of the tensors considered for merging.
        exclude: globs of tensors not merged.
        head_patterns: globs of per-task heads (never merged).
        rank: ``lowrank``: the largest rank kept per 2-D tensor (``method.rank``).
        energy: ``lowrank``: the share of each expert's squared norm kept (``method.energy``); the rank it needs
            depends on the weights, so without ``rank`` the plan counts full rank (an upper bound).
    """
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose one of {STORAGES} (method.storage / --storage)")
    if storage == "lowrank" and rank is None and energy is None:
        raise ValueError("storage=lowrank needs a rank or an energy (method.rank / method.energy; --rank / --energy)")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank} (method.rank / --rank)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy} (method.energy / --energy)")
    params = dict(model.named_parameters())
    names = select_merged_names(params, include, exclude, head_patterns)
    base_bytes, tau_bytes = resolve_dtype(base_dtype).itemsize, resolve_dtype(tau_dtype).itemsize
    merged_numel = sum(params[n].numel() for n in names)
    total_numel = sum(p.numel() for p in params.values())
    task_vectors = num_experts * merged_numel * tau_bytes
    low_rank_numel, compressed = 0, 0
    for name in names:
        shape = params[name].shape
        r = min(rank or min(shape), min(shape)) if len(shape) == 2 else 0
        if storage == "lowrank" and len(shape) == 2 and worth_compressing(shape, r):
            low_rank_numel += r * (shape[0] + shape[1])
            compressed += 1
        else:
            low_rank_numel += params[name].numel()
    on_device = {"resident": task_vectors, "streamed": 0, "lowrank": num_experts * low_rank_numel * tau_bytes}
    device = {
        "base": total_numel * base_bytes,
        "task_vectors": on_device[storage],
        "merged_tensors": merged_numel * base_bytes,
        "merged_grads": merged_numel * base_bytes,
    }
    plan = {f"device/{k}": v for k, v in device.items()}
    plan["device/total"] = sum(device.values())
    plan["host/task_vectors"] = task_vectors if storage == "streamed" else 0
    plan["merged_parameters"] = merged_numel
    plan["total_parameters"] = total_numel
    if storage == "lowrank":
        plan["low_rank_tensors"] = compressed
        plan["merged_tensors"] = len(names)
    return plan


STATISTICS = ("regmean", "regmean_pp", "fisher")


def statistics_plan(
    model: torch.nn.Module,
    num_experts: int,
    method: str,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    head_patterns: Iterable[str] = DEFAULT_HEAD_PATTERNS,
) -> dict[str, float]:
    """Bytes of the statistics ``method`` holds at its peak (``statistics/peak``) and in all (``statistics/total``).

    Grams are fp32 ``[d_in, d_in]`` per merged ``nn.Linear`` / ``Conv1D`` and expert. Layers that read one tensor
    (query/key/value, gate/up) share a Gram at run time; from shapes alone that is unknown, so each layer's own Gram
    is counted: an upper bound. The float64 solve adds at most ``adamerge.methods.regmean.SOLVE_BUDGET_BYTES``.
    """
    from adamerge.methods.statistics import linear_sites, stage_of

    if method not in STATISTICS:
        raise ValueError(f"unknown method {method!r} for statistics; choose one of {STATISTICS} (--statistics)")
    params = dict(model.named_parameters())
    names = select_merged_names(params, include, exclude, head_patterns)
    if method == "fisher":
        total = num_experts * sum(params[n].numel() for n in names) * 4
        return {"statistics/peak": total, "statistics/total": total}
    per_stage: dict[str, int] = {}
    for module, site in linear_sites(model, names).items():
        weight = params[site.weight]
        d_in = weight.shape[0] if site.transposed else weight.shape[1]
        per_stage[stage_of(module)] = per_stage.get(stage_of(module), 0) + num_experts * d_in * d_in * 4
    total = sum(per_stage.values())
    peak = max(per_stage.values(), default=0) if method == "regmean_pp" else total
    return {"statistics/peak": peak, "statistics/total": total}


def format_plan(plan: dict[str, float], title: str) -> str:
    lines = [title, f"{'component':<28}{'GiB':>10}"]
    for key, value in plan.items():
        if key.startswith(("device/", "host/")):
            lines.append(f"{key:<28}{value / GIB:>10.2f}")
    lines.append(
        f"merged parameters: {plan['merged_parameters'] / 1e6:.1f}M of {plan['total_parameters'] / 1e6:.1f}M "
        "(activations not included)"
    )
    if "low_rank_tensors" in plan:
        lines.append(
            f"low rank: {plan['low_rank_tensors']} of {plan['merged_tensors']} merged tensors as factors "
            "(the others stay dense: 1-D, or factors no smaller than the matrix)"
        )
    return "\n".join(lines)


def lowrank_note(rank: int | None, energy: float | None) -> str:
    """What the low-rank figure means for the chosen knobs."""
    if energy is None:
        return f"task vectors: rank min({rank}, m, n) per 2-D tensor (exact for this rank)"
    cap = f"min({rank}, m, n)" if rank is not None else "full rank min(m, n)"
    return (
        f"task vectors: UPPER BOUND. energy={energy:g} picks each tensor's rank from the weights, which a plan from "
        f"shapes does not read; counted at {cap}" + ("" if rank is not None else ", i.e. dense: give --rank to cap it")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adamerge estimate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="hub id, model folder or config.json of the base")
    parser.add_argument("--experts", type=int, required=True, help="number of experts K")
    parser.add_argument("--model-class", default="transformers.AutoModel")
    parser.add_argument("--tau-dtype", default="bfloat16")
    parser.add_argument("--base-dtype", default="bfloat16")
    parser.add_argument("--storage", choices=STORAGES, default="resident", help="as method.storage")
    parser.add_argument("--rank", type=int, help="lowrank: largest rank per 2-D tensor (method.rank)")
    parser.add_argument(
        "--energy", type=float, help="lowrank: share of squared norm kept (method.energy); the plan is an upper bound"
    )
    parser.add_argument("--exclude", nargs="*", default=[], help="globs of tensors not merged")
    parser.add_argument("--statistics", choices=STATISTICS, help="also the statistics of this data-driven method")
    args = parser.parse_args(argv)
    if args.storage == "lowrank" and args.rank is None and args.energy is None:
        parser.error("--storage lowrank needs --rank R and/or --energy E (the training's method.rank / method.energy)")
    if args.storage != "lowrank" and (args.rank is not None or args.energy is not None):
        parser.error("--rank and --energy apply to --storage lowrank only")
    try:
        model = meta_model(args.model, args.model_class)
        plan = memory_plan(
            model,
            args.experts,
            args.tau_dtype,
            args.base_dtype,
            args.storage,
            exclude=args.exclude,
            rank=args.rank,
            energy=args.energy,
        )
    except (ModelSourceError, ValueError) as err:
        parser.exit(2, f"adamerge estimate: error: {err}\n")
    storage = args.storage
    if storage == "lowrank":
        storage += ", " + ", ".join(
            f"{k}={v}" for k, v in (("rank", args.rank), ("energy", args.energy)) if v is not None
        )
    print(
        format_plan(
            plan, f"{args.model}: K={args.experts}, task vectors {args.tau_dtype} ({storage}), base {args.base_dtype}"
        )
    )
    if args.storage == "lowrank":
        print(lowrank_note(args.rank, args.energy))
    if args.statistics:
        stats = statistics_plan(model, args.experts, args.statistics, exclude=args.exclude)
        print(
            f"{args.statistics} statistics (fp32): peak {stats['statistics/peak'] / GIB:.2f} GiB, "
            f"{stats['statistics/total'] / GIB:.2f} GiB in all"
        )
