"""Memory plan of a merge, from a model config and the number of experts, before any weight is loaded.

The model is built on the ``meta`` device (shapes only). What a learned merge holds on the training device:

- the frozen base (``base_dtype``);
- the task-vector stacks, K x the merged tensors (``tau_dtype``), unless streamed from host memory;
- at each step the merged tensors theta(lambda) and, with the split backward, their gradients (``base_dtype``);
- activations, which depend on the batch and are not counted here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

from adamerge.core.pool import DEFAULT_HEAD_PATTERNS, import_object, resolve_dtype, select_merged_names

GIB = 1024**3


def meta_model(source: str, model_class: str = "transformers.AutoModel"):
    """The architecture of ``source`` (hub id, folder or config.json) with no weights allocated."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
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
) -> dict[str, float]:
    """Bytes per component (device and host), for a model whose parameters may live on the meta device."""
    params = dict(model.named_parameters())
    names = select_merged_names(params, include, exclude, head_patterns)
    base_bytes = resolve_dtype(base_dtype).itemsize
    merged_numel = sum(params[n].numel() for n in names)
    total_numel = sum(p.numel() for p in params.values())
    task_vectors = num_experts * merged_numel * resolve_dtype(tau_dtype).itemsize
    device = {
        "base": total_numel * base_bytes,
        "task_vectors": task_vectors if storage == "resident" else 0,
        "merged_tensors": merged_numel * base_bytes,
        "merged_grads": merged_numel * base_bytes,
    }
    plan = {f"device/{k}": v for k, v in device.items()}
    plan["device/total"] = sum(device.values())
    plan["host/task_vectors"] = task_vectors if storage == "streamed" else 0
    plan["merged_parameters"] = merged_numel
    plan["total_parameters"] = total_numel
    return plan


def format_plan(plan: dict[str, float], title: str) -> str:
    lines = [title, f"{'component':<28}{'GiB':>10}"]
    for key, value in plan.items():
        if key.startswith(("device/", "host/")):
            lines.append(f"{key:<28}{value / GIB:>10.2f}")
    lines.append(
        f"merged parameters: {plan['merged_parameters'] / 1e6:.1f}M of {plan['total_parameters'] / 1e6:.1f}M "
        "(activations not included)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adamerge estimate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="hub id, model folder or config.json of the base")
    parser.add_argument("--experts", type=int, required=True, help="number of experts K")
    parser.add_argument("--model-class", default="transformers.AutoModel")
    parser.add_argument("--tau-dtype", default="bfloat16")
    parser.add_argument("--base-dtype", default="bfloat16")
    parser.add_argument("--storage", choices=["resident", "streamed"], default="resident")
    parser.add_argument("--exclude", nargs="*", default=[], help="globs of tensors not merged")
    args = parser.parse_args(argv)
    model = meta_model(args.model, args.model_class)
    plan = memory_plan(model, args.experts, args.tau_dtype, args.base_dtype, args.storage, exclude=args.exclude)
    print(
        format_plan(
            plan,
            f"{args.model}: K={args.experts}, task vectors {args.tau_dtype} ({args.storage}), base {args.base_dtype}",
        )
    )
