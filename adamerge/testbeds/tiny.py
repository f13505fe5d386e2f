"""The ``tiny`` experiment: a tiny BERT and its experts, trained here in seconds on synthetic token tasks.

Task k asks "does marker token k occur in the sequence?". Experts follow the papers' recipe: a linear head is first
fitted on the frozen base, then the backbone is fine-tuned with that head frozen, so every merged backbone is read
through heads that mean the same thing. Everything is deterministic given ``seed``; nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from adamerge.core.pool import ExpertPool, make_pool
from adamerge.engine.data import MergeDataModule

VOCAB, SEQ_LEN, FIRST_FILLER = 48, 12, 16


def tiny_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN + 4,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def task_examples(task: int, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Balanced examples: filler tokens, with task ``task``'s marker (token ``1 + task``) inserted in half of them."""
    ids = torch.randint(FIRST_FILLER, VOCAB, (n, SEQ_LEN), generator=generator)
    labels = torch.arange(n) % 2
    labels = labels[torch.randperm(n, generator=generator)]
    # distractors: other tasks' markers appear at random, so a task must look for its own marker
    distract = torch.randint(1, 9, (n,), generator=generator)
    ids[:, 1] = torch.where(distract == 1 + task, FIRST_FILLER, distract)
    where = torch.randint(2, SEQ_LEN, (n,), generator=generator)
    ids[labels == 1, where[labels == 1]] = 1 + task
    ids[:, 0] = 0  # CLS-like first token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": labels}


def task_dataset(task: int, seed: int, sizes: dict[str, int]):
    import datasets

    g = torch.Generator().manual_seed(seed * 100 + task)
    splits = {}
    for split, n in sizes.items():
        ex = task_examples(task, n, g)
        features = datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int64")),
                "attention_mask": datasets.Sequence(datasets.Value("int64")),
                "label": datasets.ClassLabel(names=["absent", "present"]),
            }
        )
        splits[split] = datasets.Dataset.from_dict({k: v.tolist() for k, v in ex.items()}, features=features)
    return datasets.DatasetDict(splits)


def fit(model: nn.Module, params, data: dict[str, torch.Tensor], steps: int, lr: float, seed: int) -> None:
    """A few AdamW steps of cross-entropy on ``params`` only."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data["label"]), (32,), generator=g)
        out = model(
            input_ids=data["input_ids"][idx], attention_mask=data["attention_mask"][idx], labels=data["label"][idx]
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()


def pretrain(base: nn.Module, steps: int, seed: int) -> None:
    """A short generic "pre-training": which of the tokens 9..15 occur (multi-label). The base learns to detect
    tokens, but not the task markers, so a probe on it is better than chance and worse than an expert."""
    g = torch.Generator().manual_seed(seed + 1000)
    head = nn.Linear(base.config.hidden_size, 7)
    params = [p for n, p in base.named_parameters() if not n.startswith("classifier")] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (32, SEQ_LEN), generator=g)
        ids[:, 0] = 0
        targets = torch.stack([(ids == t).any(1) for t in range(9, 16)], 1).float()
        hidden = base.bert(input_ids=ids).pooler_output
        loss = nn.functional.binary_cross_entropy_with_logits(head(hidden), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base.eval()


@functools.lru_cache(maxsize=4)
def build(num_tasks: int = 3, seed: int = 0, steps: int = 80, pretrain_steps: int = 150, lr: float = 3e-4):
    """(base model, {task: expert state dict}, {task: DatasetDict}) for the tiny experiment."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_config())
    pretrain(base, pretrain_steps, seed)
    sizes = {"train": 512, "calib": 128, "test": 256}
    tasks, experts = {}, {}
    for k in range(num_tasks):
        name = f"marker{k}"
        tasks[name] = task_dataset(k, seed, sizes)
        train = {c: torch.tensor(tasks[name]["train"][c]) for c in ("input_ids", "attention_mask", "label")}
        model = copy.deepcopy(base)
        torch.nn.init.normal_(model.classifier.weight, std=0.02, generator=torch.Generator().manual_seed(seed + k))
        fit(model, model.classifier.parameters(), train, 3 * steps, lr=3e-2, seed=seed + k)  # probe, frozen base
        backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
        fit(model, backbone, train, steps, lr=lr, seed=seed + k)  # fine-tune with the head frozen
        experts[name] = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return base, experts, tasks


def tiny_pool(num_tasks: int = 3, seed: int = 0, steps: int = 80, lr: float = 3e-4, **pool_kwargs) -> ExpertPool:
    base, experts, _ = build(num_tasks, seed, steps, lr=lr)
    return make_pool(copy.deepcopy(base), experts, base_source=None, **pool_kwargs)


def tiny_datamodule(
    num_tasks: int = 3, seed: int = 0, steps: int = 80, lr: float = 3e-4, **datamodule_kwargs
) -> MergeDataModule:
    _, _, tasks = build(num_tasks, seed, steps, lr=lr)
    return MergeDataModule(tasks=tasks, seed=seed, **datamodule_kwargs)
