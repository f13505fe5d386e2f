"""Readers: one expert's tensors, read lazily by name, whatever the source (folder, file, hub id, adapter, memory).

Formats: safetensors (a file, ``model.safetensors`` or a sharded index) read tensor by tensor with ``safe_open``;
PyTorch state dicts (``pytorch_model.bin``, its sharded index, or a bare ``.bin``/``.pt``/``.pth`` file) read with
``torch.load(weights_only=True)`` (never a bare pickle load) and memory-mapped when the file's format allows; a PEFT
LoRA adapter folder seen as dense weights on top of the base. A folder is read as a state dict, never through a model
class, so task-specific heads (``classifier.*``) come with it whatever the format.

Every failure names the expert (or the base), the file and the config key that gave the source.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from adamerge.core.adapters import LoraAdapter
from adamerge.core.weight_files import TORCH_SUFFIXES, PoolError, expert_key, load_torch_state

log = logging.getLogger(__name__)


class TensorReader:
    """Lazy name -> tensor access to one expert's weights."""

    def keys(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        raise NotImplementedError


class StateDictReader(TensorReader):
    def __init__(self, state: Mapping[str, Tensor]):
        self.state = state

    def keys(self) -> set[str]:
        return set(self.state)

    def get(self, name: str) -> Tensor:
        return self.state[name]


class SafetensorsReader(TensorReader):
    """A safetensors file, or a folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, files: list[Path], expert: str):
        from safetensors import safe_open

        self._handles = {}
        for file in files:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # SafetensorError (bad header), OSError: the library names neither file nor expert
                raise PoolError(
                    f"expert {expert!r}: cannot read {file} as safetensors ({type(err).__name__}: {err}); the file is "
                    f"corrupt, truncated or not safetensors: re-save or re-download it, or fix {expert_key(expert)}"
                ) from err
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        """From the header: no tensor data is read."""
        return list(self._handles[self._where[name]].get_slice(name).get_shape())


class TorchStateReader(TensorReader):
    """PyTorch state-dict files (one, or the shards of an index); memory-mapped, so tensors are paged in on use."""

    def __init__(self, files: list[Path], expert: str):
        self._states = {file: load_torch_state(file, expert) for file in files}
        self._where = {k: f for f, s in self._states.items() for k in s}

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> Tensor:
        return self._states[self._where[name]][name]


class LoraReader(TensorReader):
    """A LoRA expert seen as dense weights: base + scale * B @ A for adapted tensors, the base elsewhere."""

    def __init__(self, adapter: LoraAdapter, base_state: Mapping[str, Tensor], prefix: str = ""):
        keys = set(base_state)
        # An adapter trained on a head-carrying class (bert.encoder...) fits a bare base (encoder...) and back.
        adapter.modules = {align_key(n, keys, prefix) or n: f for n, f in adapter.modules.items()}
        adapter.extra_tensors = {
            n.removeprefix(f"{prefix}.") if prefix else n: t for n, t in adapter.extra_tensors.items()
        }
        adapter.check_against(base_state)
        self.adapter = adapter
        self.base_state = base_state

    def keys(self) -> set[str]:
        return set(self.base_state) | set(self.adapter.extra_tensors)

    def get(self, name: str) -> Tensor:
        if name in self.adapter.extra_tensors:
            return self.adapter.extra_tensors[name]
        base = self.base_state[name]
        if name in self.adapter.modules:
            return base + self.adapter.delta(name).to(base.dtype)
        return base


def weight_files(path: Path, expert: str) -> tuple[str, list[Path]]:
    """(format, files) of a weights file or model folder; safetensors preferred when a folder holds both."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix in TORCH_SUFFIXES:
            return "torch", [path]
        raise PoolError(
            f"expert {expert!r}: {path} is neither a .safetensors file nor a PyTorch state dict "
            f"({'/'.join(TORCH_SUFFIXES)}); fix {expert_key(expert)}"
        )
    for fmt, index, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("torch", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index).exists():
            return fmt, shard_files(path, index, expert)
        if (path / single).exists():
            return fmt, [path / single]
    return "", []


def shard_files(folder: Path, index: str, expert: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
    except (ValueError, KeyError) as err:
        raise PoolError(
            f"expert {expert!r}: {folder / index} is not a shard index (no weight_map: {err}); re-save the model"
        ) from err
    shards = [folder / s for s in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise PoolError(
            f"expert {expert!r}: {folder / index} names shards that are missing: {missing[:3]}; the download or "
            f"copy is incomplete: fetch the missing files, or fix {expert_key(expert)}"
        )
    return shards


def local_path(source: str, key: str, who: str | None = None) -> Path:
    """A local folder/file as is (relative paths against the working directory); else a hub id, downloaded.

    Args:
        source: the path or hub id.
        key: the config key that gave it (``experts.base``, ``experts.experts.<name>``), named in errors.
        who: how errors name the source's owner (default: the key).
    """
    who = who or key
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")):
        raise PoolError(f"{who}: path {source!r} does not exist (from {Path.cwd()}); fix {key}")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        snapshot = Path(snapshot_download(source, allow_patterns=patterns))
        if not any(snapshot.glob("*.safetensors")):  # a legacy repo with .bin weights only: fetch those too
            snapshot = Path(snapshot_download(source, allow_patterns=[*patterns, "*.bin"]))
    except Exception as err:  # offline, no such repo, gated, bad id, network: all mean this source cannot be had
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise PoolError(
            f"{who}: {source!r} is not a local path (from {Path.cwd()}) and could not be fetched from the Hugging "
            f"Face hub ({type(err).__name__}: {first_line}); fix {key} (a folder, a weights file or a hub id)"
        ) from err
    return snapshot


def open_reader(
    name: str,
    source: str | Path | nn.Module | Mapping[str, Tensor],
    base_state: Mapping[str, Tensor],
    base_config: object | None = None,
    prefix: str = "",
) -> TensorReader:
    """Pick a reader for an expert source; checks the architecture against the base where a config says it."""
    if isinstance(source, nn.Module):
        return StateDictReader(source.state_dict())
    if isinstance(source, Mapping):
        return StateDictReader(source)
    path = local_path(str(source), expert_key(name), f"expert {name!r}")
    if (path / "adapter_config.json").exists():
        return LoraReader(LoraAdapter.from_folder(path, expert=name), base_state, prefix)
    check_architecture(name, path, base_config)
    fmt, files = weight_files(path, name)
    if fmt == "safetensors":
        return SafetensorsReader(files, name)
    if fmt == "torch":
        return TorchStateReader(files, name)
    raise PoolError(
        f"expert {name!r}: no weights in {path} (model.safetensors, pytorch_model.bin or their sharded index); give "
        f"a model folder, a .safetensors or .bin file, or a PEFT adapter folder (fix {expert_key(name)})"
    )


def check_architecture(name: str, path: Path, base_config: object | None) -> None:
    config_file = path / "config.json" if path.is_dir() else None
    if base_config is None or config_file is None or not config_file.exists():
        return
    expert_type = json.loads(config_file.read_text()).get("model_type")
    base_type = getattr(base_config, "model_type", None)
    if expert_type and base_type and expert_type != base_type:
        raise PoolError(
            f"expert {name!r} is a {expert_type!r} model but the base is {base_type!r}: experts must be fine-tunes "
            f"of the base; fix {expert_key(name)} or experts.base"
        )


def align_key(name: str, expert_keys: set[str], prefix: str) -> str | None:
    """The expert's key for a base tensor name, allowing for a ``base_model_prefix`` added or dropped."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in expert_keys), None)
