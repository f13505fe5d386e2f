"""The method registry: a merging method is registered under its config name with what it needs and where it comes from.

A method is an options dataclass (its fields are the typed schema of ``conf/method/<name>.yaml``) with a ``merge(run)``
that returns a ``MergeResult``: the pipeline runs every method the same way and never inspects its kind. Several
names may share one class (``adamerging``, ``adamerging_task`` and ``adamerging_pp`` are AdaMerging with other
options), the way one generalized task arithmetic yields several static methods.

``build_method(cfg.method)`` checks the configuration before any work: an unknown method, a misspelled or
inapplicable key, a value of the wrong type or out of its choices fails naming the key and the method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adamerge.core.factory import merged_model

KINDS = ("static", "learned")


class ConfigError(ValueError):
    """A method configuration that cannot run: names the key (``method.<key>``) and the method."""


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run, checked before any work.

    Attributes:
        dense: dense task vectors (a LoRA-native pool, ``experts=lora``, has only factors).
        calibration: unlabeled calibration batches (``data.calib_split``).
        labels: labeled calibration data.
        expert_outputs: each expert's outputs on the calibration data (teacher targets).
        activation_statistics: per-layer input statistics of each expert on the calibration data (RegMean, Fisher).
        first_pass: another method or pass it runs first (e.g. TIES for AdaMerging++), for the listing.
    """

    dense: bool = False
    calibration: bool = False
    labels: bool = False
    expert_outputs: bool = False
    activation_statistics: bool = False
    first_pass: str | None = None

    def describe(self) -> str:
        parts = ["dense task vectors" if self.dense else "task vectors or LoRA factors"]
        data = "labeled calibration data" if self.labels else "unlabeled calibration data"
        parts += [data] if self.calibration or self.labels else ["no data"]
        parts += ["expert outputs"] if self.expert_outputs else []
        parts += ["activation statistics"] if self.activation_statistics else []
        parts += [f"a first pass: {self.first_pass}"] if self.first_pass else []
        return ", ".join(parts)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    factory: type
    kind: str
    description: str
    paper: str
    needs: Needs
    random_masks: bool = False

    @property
    def seeded(self) -> bool:
        """Whether the run's seed changes the result: learned methods (the seed orders the calibration stream) and
        methods that draw random masks (DARE, DELLA). Benchmarks run these over seeds, the rest once."""
        return self.kind == "learned" or self.random_masks


REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str, *, kind: str, description: str, paper: str, needs: Needs = Needs(), random_masks: bool = False
) -> Callable[[type], type]:
    """Class decorator: register the options class under ``name`` (stackable: one class, several names).
    ``random_masks``: the merge draws from the run's seed (``MethodSpec.seeded``)."""
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: kind must be one of {KINDS}, got {kind!r}")

    def add(factory: type) -> type:
        if name in REGISTRY:
            raise ValueError(
                f"method {name!r} is registered twice ({REGISTRY[name].factory.__name__}, {factory.__name__})"
            )
        REGISTRY[name] = MethodSpec(name, factory, kind, description, paper, needs, random_masks)
        return factory

    return add


def methods() -> list[MethodSpec]:
    """Every registered method, in registration order (cheap static merges first)."""
    import adamerge.methods  # noqa: F401 - importing the package registers every method

    return list(REGISTRY.values())


def get_spec(name: str) -> MethodSpec:
    methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; registered: {sorted(REGISTRY)} (config key: method)")
    return REGISTRY[name]


def build_method(config: Mapping[str, Any]) -> Any:
    """The method object for ``config`` (``cfg.method``: a ``name`` plus that method's options), checked."""
    from omegaconf import DictConfig, OmegaConf

    options = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if "name" not in options:
        raise ConfigError("the method configuration has no name; choose a method with method=<name> (adamerge methods)")
    spec = get_spec(options.pop("name"))
    fields = {f.name: f for f in dataclasses.fields(spec.factory) if f.init and f.name != "name"}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"method.{unknown[0]} is not an option of method {spec.name!r}; its options: {sorted(fields)} "
            "(misspelled, or a knob of another method: experiments set method knobs per method in conf/tuning/)"
        )
    hints = typing.get_type_hints(spec.factory)
    for key, value in options.items():
        check_type(value, hints[key], f"method.{key}", spec.name)
    return spec.factory(name=spec.name, **options)


def composes(spec: MethodSpec) -> bool:
    """A static method composes with every learner when it can hand back per-task processed task vectors:
    ``transform(run) -> pool`` on its options class (``method.transform=<name>`` under any learned method). It reads
    ``run.pool`` (and ``run.data``'s calibration sets, for a data-driven method) and returns the pool whose task
    vectors the learner's coefficients multiply."""
    return callable(getattr(spec.factory, "transform", None))


def build_preset(config: str | Mapping[str, Any], where: str, seed: int = 0) -> Any:
    """A method from its preset, ``conf/method/<name>.yaml``, with the given options over it.

    ``config`` is a method name (its preset as is) or a mapping with a ``name`` and options that override the
    preset's (``{name: ties, density: 0.1}``); ``where`` names the config key or flag, for errors; ``seed`` is what
    a preset's ``${seed}`` means (the run's seed: DARE's masks).
    """
    from omegaconf import DictConfig, OmegaConf

    from adamerge.config_files import config_dir

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    options = {"name": config} if isinstance(config, str) else dict(config)
    if "name" not in options:
        raise ConfigError(f"{where} needs a name (a method: adamerge methods), got {config!r}")
    spec = get_spec(options["name"])
    preset = Path(config_dir()) / "method" / f"{spec.name}.yaml"
    values = OmegaConf.create({"seed": seed, "method": OmegaConf.load(preset) if preset.exists() else {}})
    merged = {**OmegaConf.to_container(values.method, resolve=True), **options}
    try:
        return build_method(merged)
    except ConfigError as error:
        raise ConfigError(f"in {where} ({spec.name}): {error}") from None


def build_transform(config: str | Mapping[str, Any], learner: str, seed: int = 0) -> Any:
    """The static method a learner's ``method.transform`` names (``build_preset``), if it composes."""
    name = config if isinstance(config, str) else config.get("name") if isinstance(config, Mapping) else None
    if name is not None and not composes(get_spec(name)):
        usable = sorted(s.name for s in methods() if composes(s))
        raise ConfigError(
            f"method.transform={name!r}: {name} has no per-task transform of the task vectors, so "
            f"{learner!r} cannot learn over it; methods that compose: {usable} (config key: method.transform)"
        )
    return build_preset(config, f"method.transform under {learner!r}", seed)


def check_type(value: Any, hint: Any, key: str, method: str) -> None:
    """Fail naming ``key`` when ``value`` does not fit ``hint`` (plain types, unions, lists, dicts, Any)."""
    if not fits(value, hint):
        raise ConfigError(
            f"{key}={value!r} has the wrong type for method {method!r}: expected {describe(hint)} (config key: {key})"
        )


def fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple, typing.get_origin(typing.Sequence[int])):
        return isinstance(value, list | tuple)
    if origin in (dict, typing.get_origin(typing.Mapping[str, int])):
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    return getattr(origin or hint, "__name__", str(hint))


def check_choice(value: Any, choices: tuple, key: str, method: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {choices} (method {method!r}, config key: {key})")


@dataclass
class MergeResult:
    """What a method hands back; the pipeline evaluates, writes and exports it without asking what made it.

    Attributes:
        model: the merged model that runs ``params`` (``adamerge.core.merged_base`` protocol).
        params: the merge as ``model`` runs it.
        record: JSON-able description of the merge (method, options, coefficients when learned).
        coefficients: expert -> group -> value, when the merge has a coefficient table (plotted).
        trainer: the Lightning trainer of the last training pass (loggers), if any.
        init_coefficients: a learned merge's starting coefficient table, judged beside it ("init, before training").
        task_params: task -> the merge that task is judged with, for methods whose model is task-specific at
            inference (TALL masks); ``params`` is then the one-model merge that is exported.
        write_artifacts: writes method-specific files (e.g. compressed masks and their loader's inputs) into the
            run's output folder, staged with the rest; called with that folder.
    """

    model: Any
    params: Any
    record: dict
    coefficients: dict | None = None
    trainer: Any = None
    init_coefficients: Any = None
    task_params: dict[str, Any] | None = None
    write_artifacts: Callable[[Any], None] | None = None


def static_result(name: str, run, params, options: dict) -> MergeResult:
    """A training-free merge's result: its merged tensors, run by the pool's task-wise merged model."""
    return MergeResult(merged_model(run.pool, granularity="task"), params, {"method": name, "options": options})


@dataclass
class Run:
    """What a method works with: the composed config (trainer, objective, loggers, ``ckpt_path``, ``paths``), the
    expert pool and the datamodule (set up)."""

    cfg: Any
    pool: Any
    data: Any
