"""The tiny causal-LM testbed: a 2-layer Llama built from a config and fine-tuned here, in seconds, into one expert
per synthetic task. Task k continues a prompt of tokens by a fixed rule (an arithmetic progression of step
``STEPS[k]`` over the content tokens), so each expert learns a different next-token map; the base is "pre-trained"
on a mixture of the rules and a step no expert uses, so the experts are fine-tunes of a model that knows the format.

``tiny_lm_pool`` and ``tiny_lm_datamodule`` serve ``experiment=tiny_lm``: the CLI path of causal-LM experts.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import torch
from torch import nn

from adamerge.core.pool import ExpertPool, make_pool
from adamerge.engine.data import MergeDataModule
from adamerge.evaluation.causal_lm import response_labels

CONTENT = 64  # content tokens are 2 .. 2 + CONTENT; 0 = pad, 1 = separator
STEPS = (1, 3, 5, 7)


def tiny_llama_config(vocab_size: int = 2 + CONTENT, hidden_size: int = 32, num_layers: int = 2, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(kwargs | overrides))


def progression_examples(task: int, n: int, prompt_len: int, response_len: int, generator: torch.Generator):
    """Task ``task``: prompt ``a, a+s, a+2s, ...`` (mod CONTENT), separator, then the response continues it."""
    step = STEPS[task % len(STEPS)]
    start = torch.randint(0, CONTENT, (n, 1), generator=generator)
    seq = (start + step * torch.arange(prompt_len + response_len)) % CONTENT + 2  # (n, P + R)
    ids = torch.cat([seq[:, :prompt_len], torch.ones(n, 1, dtype=torch.long), seq[:, prompt_len:]], 1)
    response = torch.zeros_like(ids)
    response[:, prompt_len + 1 :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response}


def lm_task_dataset(task: int, seed: int, sizes: Mapping[str, int], prompt_len: int = 6, response_len: int = 8):
    import datasets

    g = torch.Generator().manual_seed(seed * 100 + task)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {k: v.tolist() for k, v in progression_examples(task, n, prompt_len, response_len, g).items()}
            )
            for split, n in sizes.items()
        }
    )


def fine_tune(model: nn.Module, dataset, steps: int, lr: float, seed: int, batch_size: int = 32) -> None:
    """Full fine-tuning on the response tokens (AdamW)."""
    g = torch.Generator().manual_seed(seed)
    data = {k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "response_mask")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data["input_ids"]), (batch_size,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=response_labels(batch)
        )
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
    model.eval()


@functools.lru_cache(maxsize=4)
def build_tiny_lm(
    num_tasks: int = 2, seed: int = 0, steps: int = 150, pretrain_steps: int = 100, lr: float = 3e-3, **config
):
    """(base, {task: expert state dict}, {task: DatasetDict(train/calib/test)}): a tiny Llama and its experts.

    The base is "pre-trained" on a mixture of all the tasks' rules with shorter training, so the experts are
    fine-tunes of a model that already knows the token format (as real experts are).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(**config))
    sizes = {"train": 512, "calib": 16, "test": 128}
    tasks = {f"seq{k}": lm_task_dataset(k, seed, sizes) for k in range(num_tasks)}
    if pretrain_steps:
        import datasets

        # a generic prior: progressions of a step no expert uses
        generic = lm_task_dataset(len(STEPS) + 2, seed + 7, {"train": 512})["train"]
        mixed = datasets.concatenate_datasets([generic, *[t["train"].select(range(64)) for t in tasks.values()]])
        fine_tune(base, mixed, pretrain_steps, lr, seed + 1000)
    experts = {}
    for k, (name, data) in enumerate(tasks.items()):
        model = copy.deepcopy(base)
        fine_tune(model, data["train"], steps, lr, seed + k)
        experts[name] = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return base.eval(), experts, tasks


def tiny_lm_pool(num_tasks: int = 2, seed: int = 0, steps: int = 150, **pool_kwargs) -> ExpertPool:
    """The tiny Llama and its experts as a pool (``experiment=tiny_lm``); nothing is task-specific (no heads)."""
    base, experts, _ = build_tiny_lm(num_tasks, seed, steps)
    return make_pool(copy.deepcopy(base), experts, head_patterns=[], **pool_kwargs)


def tiny_lm_datamodule(num_tasks: int = 2, seed: int = 0, steps: int = 150, **datamodule_kwargs) -> MergeDataModule:
    """Per task: 16 calibration prompts with responses (``calib``) and 128 held-out sequences (``test``)."""
    _, _, tasks = build_tiny_lm(num_tasks, seed, steps)
    return MergeDataModule(tasks=tasks, calib_split="calib", eval_split="test", seed=seed, **datamodule_kwargs)
