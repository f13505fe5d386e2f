"""Causal LMs as experts: response-token losses, expert-generated calibration responses, a tiny Llama testbed.

Any ``AutoModelForCausalLM`` (Llama, Qwen, Mistral, GPT-2 ...) merges like the other models: its ``lm_head`` is an
ordinary merged tensor (or tied to the embeddings), nothing is task-specific. Calibration samples are prompts,
optionally completed by the expert's own greedy responses (``with_expert_responses``); a ``response_mask`` column
(1 on response tokens) makes Expert Merging align on the responses only (``adamerge.objectives.teachers``). Evaluation is the
held-out next-token loss on the response tokens (``lm_loss``).

The tiny testbed (``build_tiny_lm``) is a 2-layer Llama built from a config and fine-tuned here, in seconds, into
one expert per synthetic task: task k continues a prompt of tokens by a fixed rule (an arithmetic progression of
step ``STEPS[k]`` over the content tokens), so each expert learns a different next-token map.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from adamerge.engine.datasets import MODEL_INPUTS, collate

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


def response_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """Next-token labels on the response tokens only (-100 elsewhere), as Hugging Face causal LMs expect."""
    mask = batch.get("response_mask", batch.get("attention_mask"))
    return batch["input_ids"].masked_fill(mask == 0, -100)


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


@torch.no_grad()
def lm_loss(merged, params: Mapping[str, Tensor] | None, dataset, batch_size: int = 32, pad_id: int = 0) -> float:
    """Mean next-token cross-entropy over the response tokens of ``dataset`` (attended tokens if no mask)."""
    was_training = merged.training
    merged.eval()
    device = merged.coefficients.raw.device
    keys = [c for c in dataset.column_names if c in (*MODEL_INPUTS, "response_mask")]
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows, keys, pad_id).items()}
            labels = response_labels(batch)[:, 1:]
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
            logits = merged(**inputs, params=params).logits[:, :-1].float()
            total += nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
            count += int((labels != -100).sum())
    finally:
        merged.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(loss)


@torch.no_grad()
def with_expert_responses(merged, datasets: Mapping, max_new_tokens: int = 32, pad_id: int = 0, **generate_kwargs):
    """Complete each task's prompts with its expert's greedy response: rows gain ``response_mask``.

    The expert (the merged model at the one-hot table) is materialised one at a time with ``merge_and_unload`` for
    ``generate``. Prompts are generated one by one (no left-padding subtleties); calibration sets are small.
    """
    import datasets as hf_datasets

    out = {}
    for task, dataset in datasets.items():
        one_hot = torch.zeros_like(merged.coefficients())
        one_hot[merged.experts.index(task)] = 1.0
        expert = merged.merge_and_unload(params=merged.merged_tensors(one_hot)).eval()
        rows = {"input_ids": [], "attention_mask": [], "response_mask": []}
        for i in range(len(dataset)):
            prompt = torch.as_tensor(dataset[i]["input_ids"])[None].to(merged.coefficients.raw.device)
            full = expert.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **generate_kwargs,
            )[0].cpu()
            rows["input_ids"].append(full.tolist())
            rows["attention_mask"].append([1] * len(full))
            rows["response_mask"].append([0] * prompt.shape[1] + [1] * (len(full) - prompt.shape[1]))
        del expert
        out[task] = hf_datasets.Dataset.from_dict(rows)
    return out
