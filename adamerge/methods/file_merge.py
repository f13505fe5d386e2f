"""Static merges straight from the experts' safetensors, one tensor at a time: out-of-core.

A 7B model with 8 experts is 9 x 14 GB in bf16; a pool holds them all. A training-free merge whose result for one
tensor depends on that tensor only (task arithmetic, TIES, DARE, TSV-M ... : methods with ``merge_tensor``) needs
none of that: read tensor ``n`` of the base and of each expert (safetensors are memory-mapped, so a read touches one
tensor), stack the K task vectors in fp32, merge, write. Peak host memory is about one tensor's ``[K, ...]`` stack
plus the output shard being filled (``shard_bytes``), whatever the model size.

``adamerge merge-files`` (``adamerge.cli``) is the command; the output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from adamerge.atomic import atomic_path
from adamerge.core.readers import SafetensorsReader, weight_files
from adamerge.core.weight_files import PoolError
from adamerge.progress import progress

log = logging.getLogger(__name__)

MergeTensor = Callable[[str, Tensor], Tensor]
"""(tensor name, task-vector stack [K, *shape] in fp32) -> merged delta [*shape]."""

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def open_safetensors(path: str | Path, who: str) -> SafetensorsReader:
    """A lazy reader of a safetensors file or model folder; other formats would be read whole, which defeats the point."""
    path = Path(path)
    if not path.exists():
        raise PoolError(f"{who}: {path} does not exist")
    fmt, files = weight_files(path, who)
    if fmt != "safetensors":
        found = f"{fmt} weights" if fmt else "no weights file"
        raise PoolError(
            f"{who}: {path} holds {found}; merge-files reads safetensors only (one tensor at a time). Re-save it with "
            "save_pretrained(..., safe_serialization=True), or merge it in memory with `adamerge method=...`"
        )
    return SafetensorsReader(files, who)


def check_keys(base: SafetensorsReader, experts: Mapping[str, SafetensorsReader]) -> list[str]:
    """The base's tensors, each present in every expert with the base's shape (read from the headers, before any
    work); tensors only an expert has (a new head) are reported and left out."""
    names = sorted(base.keys())
    for expert, reader in experts.items():
        missing = sorted(set(names) - reader.keys())
        if missing:
            raise PoolError(
                f"expert {expert!r} lacks {len(missing)} of the base's tensors, e.g. {missing[:3]}: is it a "
                "fine-tune of this base? (merge-files --expert NAME=PATH)"
            )
        for name in names:
            if reader.shape(name) != base.shape(name):
                raise PoolError(
                    f"expert {expert!r}: tensor {name!r} has shape {reader.shape(name)}, the base's is "
                    f"{base.shape(name)} (an expert with an added vocabulary or another architecture cannot be merged "
                    "tensor by tensor)"
                )
        extra = sorted(reader.keys() - set(names))
        if extra:
            log.warning(
                "expert %r has %d tensors the base lacks (e.g. %s): left out of the merge",
                expert,
                len(extra),
                extra[:3],
            )
    return names


def task_vector_stack(name: str, theta0: Tensor, experts: Mapping[str, SafetensorsReader]) -> Tensor:
    """``[K, *shape]`` fp32 stack of ``theta_k - theta_0`` for one tensor, read one expert at a time."""
    base = theta0.float()
    stack = torch.empty((len(experts), *theta0.shape), dtype=torch.float32)  # filled in place: no second copy
    for k, reader in enumerate(experts.values()):
        stack[k] = reader.get(name)
        stack[k] -= base
    return stack


def merge_files(
    base: str | Path,
    experts: Mapping[str, str | Path],
    merge_tensor: MergeTensor,
    out: str | Path,
    shard_bytes: int = 2**30,
) -> Path:
    """Write ``theta_0 + merge_tensor(name, tau)`` for every tensor of ``base`` into ``out`` (safetensors shards, an
    index when there are several, and the base's config and tokenizer files).

    Args:
        base: the pretrained model's folder or safetensors file.
        experts: expert name -> its folder or safetensors file (full fine-tunes of ``base``).
        merge_tensor: the method's per-tensor merge (``method.merge_tensor``).
        out: the output folder; replaced atomically.
        shard_bytes: an output shard is written once it holds this many bytes (bounds the memory of the output).
    """
    from safetensors.torch import save_file

    if not experts:
        raise PoolError("no experts to merge: give at least one --expert NAME=PATH")
    base_reader = open_safetensors(base, "the base (--base)")
    readers = {name: open_safetensors(path, f"expert {name!r}") for name, path in experts.items()}
    names = check_keys(base_reader, readers)
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        shards: list[list[str]] = []
        pending: dict[str, Tensor] = {}
        size = 0
        for name in progress(names, "merging tensors", log, unit="tensor", total=len(names)):
            theta0 = base_reader.get(name)
            if theta0.is_floating_point():
                merged = theta0.float() + merge_tensor(name, task_vector_stack(name, theta0, readers))
                pending[name] = merged.to(theta0.dtype).contiguous()
            else:  # integer buffers (position ids): the base's
                pending[name] = theta0.contiguous()
            size += pending[name].numel() * pending[name].element_size()
            if size >= shard_bytes:
                shards.append(write_shard(pending, tmp, len(shards), save_file))
                pending, size = {}, 0
        if pending or not shards:
            shards.append(write_shard(pending, tmp, len(shards), save_file))
        name_shards(tmp, shards)
        copy_model_files(Path(base), tmp)
    return out


def write_shard(tensors: dict[str, Tensor], folder: Path, index: int, save_file) -> list[str]:
    save_file(tensors, str(folder / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def name_shards(folder: Path, shards: list[list[str]]) -> None:
    """One shard: ``model.safetensors``; several: ``model-0000i-of-0000n.safetensors`` and the index transformers reads."""
    if len(shards) == 1:
        (folder / "shard-00000.safetensors").rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i:05d}.safetensors").rename(folder / file)
        weight_map |= {name: file for name in names}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def copy_model_files(base: Path, out: Path) -> None:
    if base.is_dir():
        for file in COPIED_FILES:
            if (base / file).exists():
                shutil.copy2(base / file, out / file)


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"adamerge merge-files: {flag} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> None:
    """``adamerge merge-files METHOD --base B --expert NAME=PATH ... --out DIR [--set KEY=VALUE ...]``."""
    import argparse

    import yaml

    from adamerge.methods.registry import ConfigError, build_preset, methods

    parser = argparse.ArgumentParser(
        prog="adamerge merge-files",
        description="A training-free merge of full fine-tunes, tensor by tensor from their safetensors (out-of-core).",
    )
    parser.add_argument("method", help="a static method with a per-tensor merge (ties, dare, task_arithmetic ...)")
    parser.add_argument("--base", required=True, help="the pretrained model's folder or .safetensors file")
    parser.add_argument("--expert", action="append", default=[], metavar="NAME=PATH", help="an expert (repeat)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method option (YAML value)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="output shard size in GB (bounds its memory)")
    args = parser.parse_args(argv)
    try:
        options = {k: yaml.safe_load(v) for k, v in parse_assignments(args.set, "--set").items()}
        method = build_preset({"name": args.method, **options}, "merge-files --set")
        if not callable(getattr(method, "tensor_merge", None)):
            usable = sorted(s.name for s in methods() if callable(getattr(s.factory, "tensor_merge", None)))
            raise ConfigError(
                f"method {args.method!r} does not merge tensor by tensor (it needs data, the whole pool or several "
                f"tensors at once): run it in memory with `adamerge method={args.method}`; merge-files takes {usable}"
            )
        experts = parse_assignments(args.expert, "--expert")
        out = merge_files(args.base, experts, method.tensor_merge(), args.out, int(args.shard_gb * 2**30))
    except (ConfigError, PoolError) as err:
        raise SystemExit(f"adamerge merge-files: {err}") from None
    print(f"merged {len(experts)} experts with {args.method} into {out}")
