"""PEFT LoRA adapters read as factors: delta W = s * B @ A per adapted module, with s = alpha / r (or alpha / sqrt(r)
with rsLoRA), per-module rank/alpha patterns and ``fan_in_fan_out`` (GPT-2's Conv1D) honoured.

The product is formed per adapter before anything is combined: merging A's and B's separately (as some fixed-weight
merges do) adds wrong cross terms B_i A_j.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from adamerge.core.weight_files import load_torch_state

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A LoRA adapter that does not fit its base: the message names the expert, the module and the fix."""


@dataclass
class LoraFactors:
    """One adapted weight: W' = W + scale * B @ A (transposed when ``fan_in_fan_out``)."""

    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool = False

    def delta(self) -> Tensor:
        delta = self.scale * (self.B.float() @ self.A.float())  # (out, in)
        return delta.T if self.fan_in_fan_out else delta


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: factors keyed by the base tensor name they modify (``...query.weight``)."""

    expert: str
    modules: dict[str, LoraFactors]
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)  # modules_to_save (e.g. heads), base naming
    base_name_or_path: str | None = None

    @classmethod
    def from_folder(cls, path: str | Path, expert: str = "adapter") -> LoraAdapter:
        path = Path(path)
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"expert {expert!r}: adapter type {config.get('peft_type')!r} is not LoRA")
        if config.get("use_dora"):
            raise AdapterError(
                f"expert {expert!r}: DoRA adapters are not linear in (A, B); merge_and_unload() "
                "the adapter and give the resulting folder as the expert"
            )
        return cls.from_state_dict(read_adapter_weights(path, expert), config, expert)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: dict, expert: str = "adapter") -> LoraAdapter:
        factors: dict[str, dict[str, Tensor]] = {}
        extra = {}
        for key, value in state.items():
            name = key.removeprefix(PEFT_PREFIX)
            match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
            if match:
                factors.setdefault(match.group(1), {})[match.group(2)] = value
            elif ".lora_" in name:
                raise AdapterError(f"expert {expert!r}: unsupported LoRA tensor {key!r} (only lora_A/lora_B)")
            else:
                extra[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = value
        modules = {}
        for module, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"expert {expert!r}: module {module!r} lacks lora_A or lora_B")
            rank = ab["A"].shape[0]
            modules[f"{module}.weight"] = LoraFactors(
                ab["A"], ab["B"], lora_scale(module, rank, config), bool(config.get("fan_in_fan_out", False))
            )
        return cls(expert, modules, extra, config.get("base_model_name_or_path"))

    def delta(self, name: str) -> Tensor:
        return self.modules[name].delta()

    def check_base(self, base: str | None) -> None:
        """Warn when ``adapter_config.json`` names another base than ``base`` (``experts.base``) with the same shapes:
        a LoRA delta is only meaningful on the weights it was trained on, which shapes cannot tell."""
        declared = self.base_name_or_path
        if base and declared and not same_source(str(declared), str(base)):
            log.warning(
                "expert %r: the adapter was trained on %r (base_model_name_or_path in its adapter_config.json) but "
                "experts.base is %r; the shapes fit, so it is merged, but if the bases differ its delta is "
                "meaningless: check experts.base or the adapter (experts.experts.%s)",
                self.expert,
                declared,
                base,
                self.expert,
            )

    def check_against(self, base_state: dict[str, Tensor]) -> None:
        """Every adapted module exists in the base with the adapter's shape; otherwise name the first that differs."""
        for name, factors in self.modules.items():
            if name not in base_state:
                raise AdapterError(
                    f"expert {self.expert!r}: the adapter modifies {name!r}, which the base model lacks; the adapter "
                    f"was trained on another base ({self.base_name_or_path!r}); fix experts.base"
                )
            out_dim, in_dim = factors.B.shape[0], factors.A.shape[1]
            expected = (in_dim, out_dim) if factors.fan_in_fan_out else (out_dim, in_dim)
            if tuple(base_state[name].shape) != expected:
                raise AdapterError(
                    f"expert {self.expert!r}: adapter for {name!r} has shape {expected} but the base tensor is "
                    f"{tuple(base_state[name].shape)}; the adapter was trained on another base "
                    f"({self.base_name_or_path!r}); fix experts.base"
                )


def lora_scale(module: str, rank: int, config: dict) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), with PEFT's per-module ``rank_pattern``/``alpha_pattern`` overrides."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def read_adapter_weights(path: Path, expert: str) -> dict[str, Tensor]:
    """``adapter_model.safetensors``, or a legacy ``adapter_model.bin`` read with ``weights_only=True``."""
    weights_file = path / "adapter_model.safetensors"
    if weights_file.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_file))
        except Exception as err:  # SafetensorError: the library names neither the file nor the expert
            raise AdapterError(
                f"expert {expert!r}: cannot read {weights_file} ({type(err).__name__}: {err}); the file is corrupt "
                f"or truncated: re-save the adapter, or fix experts.experts.{expert}"
            ) from err
    if (path / "adapter_model.bin").exists():
        return load_torch_state(path / "adapter_model.bin", expert)
    raise AdapterError(
        f"expert {expert!r}: {path} has adapter_config.json but no adapter_model.safetensors (nor .bin); save the "
        f"adapter with save_pretrained(), or fix experts.experts.{expert}"
    )


def same_source(a: str, b: str) -> bool:
    """Whether two model sources name the same model: equal ids, the same local folder, or a hub id with and without
    its organisation (``bert-base-uncased`` and ``google-bert/bert-base-uncased``)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return ("/" not in a or "/" not in b) and a.split("/")[-1] == b.split("/")[-1]
