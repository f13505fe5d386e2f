"""The shipped text tasks as instruction tasks with a short answer, so causal-LM merges are judged by accuracy.

Each classification task (``adamerge.testbeds.text_tasks``) becomes a question about its text whose answer is one of
the task's class names ("games", "noun.animal", "positive"); the allowed answers are listed in the prompt, so even
the base has a fair zero-shot chance. Splits, tokenized once:

- ``train``: prompt + gold answer + end-of-turn token, ``response_mask`` on the answer (expert fine-tuning);
- ``calib``: the prompt alone (unlabelled calibration: the merge never sees an answer);
- ``test``: prompt + gold answer (``response_mask`` on the answer, no end token), ``label`` and ``choices`` (every
  allowed answer's token ids): the multiple-choice evaluator (``adamerge.evaluation.choice``) scores each choice by
  its log-likelihood given the prompt, as lm-evaluation-harness does, and the held-out loss is the gold answer's.

Prompts go through the tokenizer's chat template when it has one (an instruct model expects its turn markers);
the answer's ids are appended to the prompt's ids, so training and scoring see the very same token boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from adamerge.engine.datasets import DataError
from adamerge.testbeds.text_tasks import load_task

QUESTIONS = {
    "debian_section": "Which section of the Debian archive does this package belong to?\nPackage: {text}",
    "wordnet_supersense": "Which WordNet supersense (lexicographer file) does the word sense with this gloss belong "
    "to?\nGloss: {text}",
    "manpage_section": "Which kind of manual page is this paragraph from?\nParagraph: {text}",
    "spam_assassin": "Is this e-mail spam or ham (a legitimate message)?\nE-mail: {text}",
    "vader_movies": "Is the sentiment of this movie review sentence positive or negative?\nReview: {text}",
    "vader_amazon": "Is the sentiment of this product review sentence positive or negative?\nReview: {text}",
    "vader_tweets": "Is the sentiment of this tweet positive or negative?\nTweet: {text}",
}
GENERIC_QUESTION = "Which class does this text belong to?\nText: {text}"
"""Tasks without their own question (your own ``data_dir``) get this one."""


def answer_strings(class_names: Sequence[str]) -> list[str]:
    """The answer a model writes for each class: its name, underscores read as spaces ("system calls")."""
    return [name.replace("_", " ") for name in class_names]


def question(task: str, text: str, answers: Sequence[str]) -> str:
    """The user turn: the task's question about ``text`` and the allowed answers."""
    body = QUESTIONS.get(task, GENERIC_QUESTION).format(text=text)
    return f"{body}\nAnswer with one of: {', '.join(answers)}."


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, user_turn: str, chat: bool) -> list[int]:
    """The prompt's token ids: the chat template's user turn + assistant opening, or the plain text + "Answer: "."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_turn}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{user_turn}\nAnswer: ")["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"answer {answer!r} encodes to no token with this tokenizer (data.tokenizer)")
    return ids


def clip_text(tokenizer, text: str, max_tokens: int | None) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (whole text if None): the prompt, never the answer, is cut."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def encode_split(
    split,
    task: str,
    tokenizer,
    answers: Sequence[str],
    chat: bool,
    max_text_tokens: int | None,
    with_answer: bool,
    end_token: int | None = None,
) -> datasets.Dataset:
    """One split as token ids. ``with_answer``: prompt + gold answer (+ ``end_token``) with a ``response_mask``;
    else the prompt alone."""
    choices = [answer_ids(tokenizer, a) for a in answers]
    rows: dict[str, list] = {"input_ids": [], "attention_mask": []}
    if with_answer:
        rows |= {"response_mask": [], "label": [], "choices": []}
    for text, label in zip(split["text"], split["label"]):
        prompt = prompt_ids(tokenizer, question(task, clip_text(tokenizer, text, max_text_tokens), answers), chat)
        if not with_answer:
            rows["input_ids"].append(prompt)
            rows["attention_mask"].append([1] * len(prompt))
            continue
        response = choices[label] + ([end_token] if end_token is not None else [])
        rows["input_ids"].append(prompt + response)
        rows["attention_mask"].append([1] * (len(prompt) + len(response)))
        rows["response_mask"].append([0] * len(prompt) + [1] * len(response))
        rows["label"].append(label)
        rows["choices"].append(choices)
    return datasets.Dataset.from_dict(rows)


def cap(split, n: int | None, seed: int):
    """The first ``n`` rows of a seeded shuffle (all rows if None)."""
    return split if n is None or len(split) <= n else split.shuffle(seed=seed).select(range(n))


def instruction_task(
    task: str,
    tokenizer,
    chat: bool | None = None,
    max_text_tokens: int | None = 64,
    sizes: dict[str, int | None] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """One shipped task as an instruction task (see the module docstring for what each split holds).

    Args:
        task: a name from :func:`adamerge.testbeds.text_tasks.available_tasks`.
        tokenizer: the base model's tokenizer (an object).
        chat: through the chat template: None when the tokenizer has one (config key ``data.chat_template``).
        max_text_tokens: each text cut to this many tokens (``data.max_text_tokens``); None keeps it whole.
        sizes: split -> at most this many rows (a shuffle by ``seed``; the test rows by seed 0 always, so that runs
            of any seed are judged on the same rows); missing or None: the whole split.
        data_dir: where the task files are (default: the shipped ones).
    """
    if chat is None:
        chat = has_chat_template(tokenizer)
    elif chat and not has_chat_template(tokenizer):
        raise DataError("data.chat_template=true but the tokenizer has no chat template; set it to null or false")
    raw = load_task(task, data_dir)
    answers = answer_strings(raw["train"].features["label"].names)
    sizes = sizes or {}
    end = tokenizer.eos_token_id
    return datasets.DatasetDict(
        {
            "train": encode_split(
                cap(raw["train"], sizes.get("train"), seed), task, tokenizer, answers, chat, max_text_tokens, True, end
            ),
            "calib": encode_split(
                cap(raw["calib"], sizes.get("calib"), seed), task, tokenizer, answers, chat, max_text_tokens, False
            ),
            "test": encode_split(  # the same test rows whatever the seed: seeds are compared on one test set
                cap(raw["test"], sizes.get("test"), 0), task, tokenizer, answers, chat, max_text_tokens, True
            ),
        }
    )


def instruction_datamodule(
    tasks: Sequence[str],
    base: str = "smollm2",
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    chat_template: bool | None = None,
    max_text_tokens: int | None = 64,
    max_calib: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    **datamodule_kwargs,
):
    """The datamodule of ``experiment=smollm2_text``: prompts to calibrate on, prompts + answers to judge.

    Args:
        tasks: task names (each needs an expert of the same name: ``experts.tasks``).
        base: the experts' base (``experts.base``): its tokenizer encodes the prompts.
        cache_dir / data_dir: as for :func:`adamerge.testbeds.smollm2.expert_pool`.
        chat_template, max_text_tokens: see :func:`instruction_task`.
        max_calib / max_eval: at most this many calibration prompts / test rows per task.
        datamodule_kwargs: the rest of :class:`adamerge.engine.data.MergeDataModule` (batch_size, num_steps, ...).
    """
    from transformers import AutoTokenizer

    from adamerge.engine.data import MergeDataModule
    from adamerge.testbeds.smollm2 import base_folder

    tokenizer = AutoTokenizer.from_pretrained(base_folder(base, cache_dir))
    sizes = {"train": 0, "calib": max_calib, "test": max_eval}  # the merge never reads train
    sources = {t: instruction_task(t, tokenizer, chat_template, max_text_tokens, sizes, data_dir, seed) for t in tasks}
    return MergeDataModule(
        tasks=sources, tokenizer=tokenizer, calib_split="calib", eval_split="test", seed=seed, **datamodule_kwargs
    )
