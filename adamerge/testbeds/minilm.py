"""Train real text experts from one pretrained encoder (all-MiniLM-L6-v2 by default), cached by recipe.

Default recipe (the one merging papers assume): a linear head is fitted on the *frozen* base first (a probe), then
the backbone is fine-tuned with that head frozen. Every expert's backbone is then read through a head that was
fitted to the base, so a merged backbone stays compatible with all heads and "base + probe heads" is an honest
no-merging floor. ``heads="cotrained"`` trains head and backbone together from a random head instead: the heads then
drift with their own backbone and merging suffers (kept as an option to show it).

Experts are saved with ``save_pretrained`` (safetensors + tokenizer) under
``<cache>/experts/<recipe hash>/<task>-<data hash>/`` (cache: env ``ADAMERGE_CACHE``, default ``~/.cache/adamerge``), so
``adamerge.core.pool.load_pool(base, {task: folder}, model_class="transformers.AutoModelForSequenceClassification")``
reads them; each has its own number of labels, and the pool keeps each ``classifier.*`` apart (never merged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.atomic import atomic_path
from adamerge.core.pool import ExpertPool, load_pool
from adamerge.testbeds.assets import minilm_path
from adamerge.testbeds.cache import cache_root, data_key, default_device, task_seed
from adamerge.testbeds.text_tasks import load_task

log = logging.getLogger(__name__)

HEAD_PREFIX = "classifier."
HEAD_MODES = ("frozen_probe", "cotrained")
MODEL_CLASS = "transformers.AutoModelForSequenceClassification"
RECIPE_VERSION = 2
# The benchmark's presets: conf/experts/<file>.yaml (quick: 4 tasks, 40 steps; hard: 7 tasks trained to convergence)
PRESETS = {"quick": "minilm_text", "hard": "minilm_text_hard"}
"""Bumped when the training code changes what a recipe produces (2: each expert's seed comes from its task name)."""
CURVE_POINTS = 8
"""Held-out (calib split) accuracy is measured this many times during fine-tuning and kept in recipe.json."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an expert is trained; its hash names the cache folder, so changing any field retrains."""

    steps: int = 40
    """Backbone fine-tuning steps (AdamW, linear decay to 0)."""
    lr: float = 1e-4
    """Backbone learning rate."""
    batch_size: int = 32
    max_length: int = 64
    """Tokens per example when training (longer texts are truncated)."""
    probe_steps: int = 300
    """Full-batch Adam steps of the linear probe on frozen pooled features."""
    probe_lr: float = 1e-2
    heads: str = "frozen_probe"
    """``frozen_probe`` (probe first, head frozen while the backbone trains) or ``cotrained`` (harms merging)."""
    max_train: int | None = None
    """Cap on training examples per task (None: the whole train split)."""
    num_hidden_layers: int | None = None
    """Truncate the base to its first N layers (tests); None keeps them all."""
    seed: int = 0

    def __post_init__(self):
        if self.heads not in HEAD_MODES:
            raise ValueError(f"unknown head recipe {self.heads!r}; choose one of {HEAD_MODES} (key: recipe.heads)")
        if self.steps < 0 or self.probe_steps < 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError(f"bad recipe {self}: steps >= 0, probe_steps >= 0, batch_size >= 1, max_length >= 8")

    def key(self, base: str | None) -> str:
        """Short hash of the recipe, the base it starts from and the training code's version."""
        payload = json.dumps({"base": base, "version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_base(base: str, num_labels: int, recipe: Recipe) -> nn.Module:
    """The base with a fresh ``num_labels`` head (dropped layers are simply not loaded when truncating)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels}
    if recipe.num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = recipe.num_hidden_layers
    with torch.random.fork_rng(devices=[]):  # a seeded head init that leaves the caller's RNG alone
        torch.manual_seed(recipe.seed)
        return AutoModelForSequenceClassification.from_pretrained(base, **kwargs)


def encode(tokenizer, split, max_length: int, cap: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """A labelled split as padded tensors ``input_ids / attention_mask / labels`` (first ``cap`` of a shuffle)."""
    if cap is not None and len(split) > cap:
        split = split.shuffle(seed=seed).select(range(cap))
    enc = tokenizer(list(split["text"]), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor(split["label"]),
    }


def head_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIX)]


@torch.no_grad()
def pooled_features(model: nn.Module, data: Mapping[str, Tensor], batch_size: int = 64) -> Tensor:
    """What the classification head sees (the pooler output), for every example; dropout off."""
    model.eval()
    body = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(data["labels"]), batch_size):
        out = body(
            input_ids=data["input_ids"][i : i + batch_size].to(device),
            attention_mask=data["attention_mask"][i : i + batch_size].to(device),
        )
        feats.append(out.pooler_output.float().cpu())
    return torch.cat(feats)


def fit_probe(model: nn.Module, data: Mapping[str, Tensor], recipe: Recipe) -> None:
    """Fit ``model.classifier`` (linear) on frozen pooled features by full-batch Adam: cheap and deterministic."""
    features, labels = pooled_features(model, data), data["labels"]
    head = model.classifier
    weight = head.weight.detach().float().cpu().clone().requires_grad_()
    bias = head.bias.detach().float().cpu().clone().requires_grad_()
    optimizer = torch.optim.Adam([weight, bias], lr=recipe.probe_lr)
    for _ in range(recipe.probe_steps):
        loss = nn.functional.cross_entropy(features @ weight.T + bias, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


def finetune(
    model: nn.Module,
    data: Mapping[str, Tensor],
    recipe: Recipe,
    train_head: bool,
    desc: str = "",
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """``recipe.steps`` AdamW steps of cross-entropy on random batches; the head trains only if ``train_head``.

    ``on_step(step)`` runs after each step (1-based), with the model in train mode (it may switch and restore it).
    """
    from tqdm.auto import tqdm

    params = [p for n, p in model.named_parameters() if train_head or not n.startswith(HEAD_PREFIX)]
    for n, p in model.named_parameters():
        p.requires_grad_(train_head or not n.startswith(HEAD_PREFIX))
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(recipe.steps, 1))
    g = torch.Generator().manual_seed(recipe.seed + seed)
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(recipe.steps), desc=desc, leave=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe.seed + seed)  # dropout's masks: an expert does not depend on what trained before it
        for step in bar:
            idx = torch.randint(0, len(data["labels"]), (recipe.batch_size,), generator=g)
            batch = trim({k: v[idx] for k, v in data.items()})
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(step + 1)
    model.eval()
    model.requires_grad_(True)


def trim(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Cut the padding columns that no example of the batch uses (a batch of short texts runs faster)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: nn.Module, data: Mapping[str, Tensor], batch_size: int = 64) -> float:
    """Accuracy of ``model`` on a labelled encoded split, dropout off (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data["labels"]), batch_size):
        batch = trim({k: v[i : i + batch_size] for k, v in data.items()})
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train(was_training)
    return correct / len(data["labels"])


def train_expert(
    base: str, dataset, recipe: Recipe, device: str | None = None, seed: int = 0
) -> tuple[nn.Module, list[tuple[int, float]]]:
    """One expert from a ``DatasetDict`` with a labelled ``train`` split (``text``, ``label`` ClassLabel).

    Returns the model and its learning curve: ``(step, calib accuracy)`` at step 0 (the probe) and
    :data:`CURVE_POINTS` times during fine-tuning, so a cached expert says whether its recipe had converged.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    num_labels = dataset["train"].features["label"].num_classes
    model = load_base(base, num_labels, recipe).to(device or default_device())
    data = encode(tokenizer, dataset["train"], recipe.max_length, recipe.max_train, recipe.seed)
    if recipe.heads == "frozen_probe":
        fit_probe(model, data, recipe)
    held_out = encode(tokenizer, dataset["calib"], recipe.max_length) if "calib" in dataset else None
    curve: list[tuple[int, float]] = []
    every = max(recipe.steps // CURVE_POINTS, 1)

    def measure(step: int) -> None:
        if held_out is not None and (step % every == 0 or step == recipe.steps):
            curve.append((step, round(accuracy(model, held_out), 4)))

    measure(0)
    finetune(model, data, recipe, train_head=recipe.heads == "cotrained", desc="fine-tune", seed=seed, on_step=measure)
    return model, curve


def save_model(model: nn.Module, tokenizer_source: str, folder: Path, meta: Mapping) -> None:
    """``save_pretrained`` + tokenizer + a ``recipe.json``, written beside and renamed: a folder is complete or absent."""
    from transformers import AutoTokenizer

    with atomic_path(folder, directory=True) as tmp:
        model.cpu().save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(meta, indent=1))


def expert_dir(tasks_key: str, recipe: Recipe, base: str | None, cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "experts" / recipe.key(base) / tasks_key


def build_experts(
    tasks: Sequence[str],
    recipe: Recipe | None = None,
    base: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Train (or reuse from the cache) one expert per text task; returns ``{task: folder}``.

    Args:
        tasks: names from :func:`adamerge.testbeds.text_tasks.available_tasks`.
        recipe: the training recipe (default :class:`Recipe`).
        base: hub id or folder of the base; None = the packaged all-MiniLM-L6-v2.
        cache_dir: root of the cache (default env ``ADAMERGE_CACHE`` or ``~/.cache/adamerge``).
        device: ``cpu`` / ``cuda``; default CUDA when present.
        data_dir: where the task files are (default: the shipped ones).

    The cache folder is keyed on the recipe, the base and a hash of each task's data (:func:`data_key`).
    """

    recipe = recipe or Recipe()
    source = base or minilm_path()
    keys = {task: data_key(task, data_dir) for task in tasks}  # every task checked before any training
    folders = {}
    for k, task in enumerate(tasks):
        folder = expert_dir(keys[task], recipe, base, cache_dir)
        if not (folder / "recipe.json").exists():
            log.info("training expert %r (%d/%d) into %s", task, k + 1, len(tasks), folder)
            start = time.perf_counter()
            model, curve = train_expert(source, load_task(task, data_dir), recipe, device, seed=task_seed(task))
            meta = {"task": task, "data": keys[task], "base": base, **dataclasses.asdict(recipe)}
            meta |= {"calib_accuracy_curve": curve, "train_s": round(time.perf_counter() - start, 1)}
            save_model(model, source, folder, meta)
        folders[task] = folder
    return folders


def build_multitask(
    tasks: Sequence[str],
    recipe: Recipe | None = None,
    base: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """One backbone fine-tuned on every task at once through the experts' frozen probe heads (the upper reference).

    Each step takes a batch of every task (``recipe.batch_size`` each) and sums the losses, so every task sees as
    many examples as its expert did; costs as much as training all the experts. Returns the saved folder.
    """
    from torch.func import functional_call
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    recipe = recipe or Recipe()
    if recipe.heads != "frozen_probe":
        raise ValueError(
            "the multi-task reference reads the experts' frozen probe heads: use recipe.heads=frozen_probe"
        )
    experts = build_experts(tasks, recipe, base, cache_dir, device, data_dir)
    folder = expert_dir("_multitask-" + "+".join(sorted(data_key(t, data_dir) for t in tasks)), recipe, base, cache_dir)
    if (folder / "recipe.json").exists():
        return folder
    from safetensors.torch import load_file

    source = base or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    device = device or default_device()
    heads = {
        t: {
            k: v.to(device) for k, v in load_file(experts[t] / "model.safetensors").items() if k.startswith(HEAD_PREFIX)
        }
        for t in tasks
    }
    data = {
        t: encode(tokenizer, load_task(t, data_dir)["train"], recipe.max_length, recipe.max_train, recipe.seed)
        for t in tasks
    }
    model = load_base(source, 2, recipe).to(device)
    backbone = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX)]
    optimizer = torch.optim.AdamW(backbone, lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(recipe.steps, 1))
    g = torch.Generator().manual_seed(recipe.seed + 10_000)
    model.train()
    for _ in tqdm(range(recipe.steps), desc="multi-task", leave=False):
        optimizer.zero_grad()
        for task in tasks:
            idx = torch.randint(0, len(data[task]["labels"]), (recipe.batch_size,), generator=g)
            batch = {k: v.to(device) for k, v in trim({k: v[idx] for k, v in data[task].items()}).items()}
            labels = batch.pop("labels")
            # the loss is ours: the model's own would read config.num_labels, not this task's head
            logits = functional_call(model, heads[task], (), batch, strict=False).logits
            nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    save_model(model, source, folder, {"tasks": list(tasks), "base": base, **dataclasses.asdict(recipe)})
    return folder


def preset_experts(name: str, seed: int | None = None) -> dict:
    """A preset's experts config (``tasks``, ``recipe``, ...) as the benchmark composes it, with ``recipe.seed`` set
    when ``seed`` is given: the one place scripts read a preset from."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from adamerge.cli import config_dir, register_resolvers

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=minilm_text", f"experts={PRESETS[name]}"])
    experts = OmegaConf.to_container(cfg.experts, resolve=True)
    if seed is not None:
        experts["recipe"]["seed"] = seed
    return experts


def expert_pool(
    tasks: Sequence[str],
    recipe: Mapping | Recipe | None = None,
    base: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    **pool_kwargs,
) -> ExpertPool:
    """The pool of text experts (built or reused): the Hydra target of ``experts=minilm_text``.

    The base is loaded with the first task's number of labels; its head slot is replaced by each task's own head
    (``classifier.*``, kept per expert, never merged). ``pool_kwargs`` go to :func:`adamerge.core.pool.make_pool`.
    """

    if not tasks:
        raise ValueError("no tasks given; list them under experts.tasks")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(**dict(recipe or {}))
    folders = build_experts(tasks, recipe, base, cache_dir, device, data_dir)
    model_kwargs = {"num_labels": load_task(tasks[0], data_dir)["test"].features["label"].num_classes}
    if recipe.num_hidden_layers is not None:
        model_kwargs["num_hidden_layers"] = recipe.num_hidden_layers
    pool = load_pool(
        base or minilm_path(), {t: str(f) for t, f in folders.items()}, MODEL_CLASS, model_kwargs, **pool_kwargs
    )
    pool.model.eval()
    return pool


def peer_check_pool(num_experts: int) -> ExpertPool:
    """Real experts for the peer speed checks (``scripts/*_peer_check.py --speed``): the hard preset's cached
    experts, K <= 7 its first K tasks, K = 8 all seven plus debian_section's expert of expert-training seed 1 (all
    real fine-tunes, no perturbed copies). Built and cached on first use."""
    experts = preset_experts("hard")
    tasks = experts["tasks"]
    if not 1 <= num_experts <= len(tasks) + 1:
        raise ValueError(f"K={num_experts}: the hard preset gives 1 to {len(tasks) + 1} real experts")
    pool = expert_pool(tasks[: min(num_experts, len(tasks))], experts["recipe"], device="cpu")
    if num_experts <= len(tasks):
        return pool
    other = expert_pool(tasks[:1], preset_experts("hard", seed=1)["recipe"], device="cpu")
    task_vectors = {n: torch.cat([tau, other.task_vectors[n]]) for n, tau in pool.task_vectors.items()}
    name = f"{tasks[0]}@seed1"
    heads = pool.heads | {name: other.heads[tasks[0]]}
    return dataclasses.replace(pool, experts=[*pool.experts, name], task_vectors=task_vectors, heads=heads)
