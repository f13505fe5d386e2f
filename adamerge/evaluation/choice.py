"""Multiple choice for causal LMs: accuracy of the most likely allowed answer, and the gold answer's loss.

Scored as lm-evaluation-harness scores ``multiple_choice`` tasks: each choice's log-likelihood is the sum of
``log p(answer token | prompt, earlier answer tokens)`` over its tokens, and the prediction is the argmax (``acc``).
The loss is the mean next-token cross-entropy over the gold answers' tokens: the held-out loss of
``evaluator=causal_lm`` on the same rows, read from the same forward.

Each evaluation row holds ``input_ids`` (prompt + gold answer), ``response_mask`` (1 on the answer), ``label`` (the
gold choice) and ``choices`` (each allowed answer's token ids): ``adamerge.testbeds.instruction_tasks`` builds them.
The prompt runs once (a batch of left-padded prompts, positions counted from each prompt's first token) and the
choices continue it from its key/value cache, so a row costs one prompt forward plus a few answer tokens per choice.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.core.merged_base import MergedModelBase
from adamerge.engine.datasets import DataError
from adamerge.evaluation.protocol import Evaluator, Metric

COLUMNS = ("input_ids", "response_mask", "label", "choices")


def prompt_of(row) -> list[int]:
    """The prompt's ids: the tokens before the first response token."""
    mask = list(row["response_mask"])
    return list(row["input_ids"][: mask.index(1) if 1 in mask else len(mask)])


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids and their attention mask: every prompt ends at the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def cache_keyword(model) -> str:
    """The forward's name for a key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    inner = getattr(model, "model", model)  # a merged model runs its base's forward
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.no_grad()
def choice_logprobs(model, params: Any, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id=0):
    """``[B, C]`` log-likelihoods of every choice (token ids) after each prompt; ``choices`` shared by the batch.

    Args:
        model: a merged model (``model(..., params=params)``) or any causal LM when ``params`` is None.
        prompts: B prompts (token ids).
        choices: C answers (token ids), each at least one token.
    """
    device = model.device
    call = (lambda **kw: model(**kw)) if params is None else (lambda **kw: model(**kw, params=params))
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out = call(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (B, V): the answer's first token
    B, C = len(prompts), len(choices)
    lengths = torch.tensor([len(c) for c in choices], device=device)
    width = int(lengths.max())
    answers = torch.full((C, width), pad_id, dtype=torch.long, device=device)
    for c, tokens in enumerate(choices):
        answers[c, : len(tokens)] = torch.as_tensor(tokens)
    scores = first[:, answers[:, 0]]  # (B, C)
    if width > 1:  # the later tokens: every choice continues every prompt from its cache
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_repeat_interleave(C)
        rest = answers[:, :-1].repeat(B, 1)  # (B*C, width-1): inputs; row b*C + c is prompt b, choice c
        mask2 = torch.cat([mask.repeat_interleave(C, 0), torch.ones_like(rest)], 1)
        start = mask.sum(1).repeat_interleave(C)[:, None]
        pos2 = start + torch.arange(width - 1, device=device)
        kwargs = {cache_keyword(model): cache}
        logits = call(input_ids=rest, attention_mask=mask2, position_ids=pos2, **kwargs).logits
        logp = torch.log_softmax(logits.float(), -1)  # (B*C, width-1, V)
        targets = answers[:, 1:].repeat(B, 1)
        token_lp = logp.gather(-1, targets[..., None])[..., 0]  # (B*C, width-1)
        valid = torch.arange(1, width, device=device)[None] < lengths.repeat(B)[:, None]
        scores = scores + (token_lp * valid).sum(1).view(B, C)
    return scores


class MultipleChoice(Evaluator):
    """Accuracy of the argmax choice (primary, higher is better) and the gold answers' mean token loss.

    Args:
        batch_size: prompts per forward (each continued by every choice: ``batch_size x choices`` rows).
        normalize: ``none`` (lm-eval's ``acc``: summed log-likelihood) or ``tokens`` (divided by the choice's token
            count; favours long answers less).
    """

    metrics = (Metric("accuracy", higher_is_better=True), Metric("loss", higher_is_better=False))

    def __init__(self, batch_size: int = 16, normalize: str = "none"):
        if normalize not in ("none", "tokens"):
            raise ValueError(f"evaluator.normalize={normalize!r}: choose none or tokens")
        if batch_size < 1:
            raise ValueError(f"evaluator.batch_size={batch_size}: give at least 1")
        self.batch_size, self.normalize = batch_size, normalize

    def check(self, data) -> None:
        for task, dataset in data.eval.items():
            missing = [c for c in COLUMNS if c not in dataset.column_names]
            if missing:
                raise DataError(
                    f"task {task!r}: evaluation split {data.eval_split!r} lacks {missing} (columns: "
                    f"{dataset.column_names}); evaluator=choice needs instruction rows "
                    "(data=instruction_tasks) or evaluator=causal_lm"
                )

    def score(self, model: MergedModelBase, params: Any, data, task: str) -> dict[str, float]:
        dataset = data.eval[task]
        correct, total_nll, tokens = 0, 0.0, 0
        for start in range(0, len(dataset), self.batch_size):
            rows = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
            for group in same_choices(rows):
                choices = group[0]["choices"]
                scores = choice_logprobs(model, params, [prompt_of(r) for r in group], choices, data.pad_id)
                labels = torch.tensor([r["label"] for r in group], device=scores.device)
                gold = scores.gather(1, labels[:, None])[:, 0]
                counts = torch.tensor([len(c) for c in choices], device=scores.device, dtype=scores.dtype)
                ranked = scores / counts if self.normalize == "tokens" else scores
                correct += int((ranked.argmax(1) == labels).sum())
                total_nll -= float(gold.sum())
                tokens += int(counts[labels].sum())
        loss = total_nll / max(tokens, 1)
        return {"accuracy": correct / max(len(dataset), 1), "loss": loss}


def same_choices(rows: list) -> list[list]:
    """Rows split into runs that share one list of choices (a task's rows usually all do)."""
    groups: list[list] = []
    for row in rows:
        if groups and groups[-1][0]["choices"] == row["choices"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups
