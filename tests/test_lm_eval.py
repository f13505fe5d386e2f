"""evaluator=lm_eval: local lm-eval tasks (YAML + 20-row jsonl, offline) judge merges of the tiny Llama in memory.

The accuracy lm-eval reports is checked against the same choice computed here with the merged model's own forward,
the base's parameters are checked to be back after each run, and the CLI's pipeline writes the lm-eval metric into
results.md/CSV and the loggers.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

pytest.importorskip("lm_eval")

from adamerge.core.lora_merged import LoraMergedModel  # noqa: E402
from adamerge.core.lora_pool import make_lora_pool  # noqa: E402
from adamerge.core.merged import MergedModel  # noqa: E402
from adamerge.evaluation.lm_eval import LMEval, load_tokenizer, pick_metric  # noqa: E402
from adamerge.evaluation.protocol import EXPERT, FLOOR, reference_rows  # noqa: E402
from adamerge.pipeline import run  # noqa: E402
from adamerge.testbeds.tiny_lm import tiny_llama_config, tiny_lm_pool  # noqa: E402
from tests.test_config import make_cfg  # noqa: E402

ASSETS = Path(__file__).parent / "assets" / "lm_eval"
TASKS = {"tiny_seq0": "seq0", "tiny_seq1": "seq1"}  # lm-eval task -> the expert whose rule it asks for


class Data:
    """What the evaluator and reference_rows read of a datamodule: the task (expert) names, which have evaluation
    data (lm-eval brings its own), and the tokenizer (tiny_lm has none)."""

    task_names = list(TASKS.values())
    eval = dict.fromkeys(task_names)
    tokenizer = None


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub, no network; the task YAMLs' data_files are relative to their folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ASSETS)


@pytest.fixture(scope="module")
def merged():
    # the experiment=tiny_lm pool: its experts are built once per process, for the pipeline test too
    return MergedModel(tiny_lm_pool(num_tasks=2, seed=0), granularity="task")


def make_evaluator(**overrides) -> LMEval:
    kwargs = dict(
        tasks=list(TASKS),
        include_path=str(ASSETS),
        include_defaults=False,
        tokenizer=str(ASSETS / "tokenizer"),
        expert_tasks=TASKS,
        batch_size=8,
    )
    return LMEval(**(kwargs | overrides))


def direct_accuracy(model, params, task: str) -> float:
    """The multiple-choice accuracy worked out here: the choice whose token the merge finds most likely after the
    prompt, through the merged model's own forward (not lm-eval's, not the swapped-in module)."""
    tokenizer = load_tokenizer(str(ASSETS / "tokenizer"))
    rows = [json.loads(line) for line in (ASSETS / f"{task}.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tokenizer.encode(row["prompt"])])  # (1, T)
            log_probs = model(input_ids=ids, params=params).logits[0, -1].log_softmax(-1)  # (V,)
            choices = [tokenizer.convert_tokens_to_ids(c) for c in row["choices"]]  # one token each
            correct += int(log_probs[choices].argmax()) == row["label"]
    return correct / len(rows)


def snapshot(module: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (id(p), p.detach().clone()) for n, p in module.named_parameters()}


def assert_restored(module: torch.nn.Module, before: dict) -> None:
    after = dict(module.named_parameters())
    assert after.keys() == before.keys()
    for name, (identity, value) in before.items():
        assert id(after[name]) == identity and torch.equal(after[name], value), name


def test_accuracy_equals_the_direct_computation_and_the_base_is_restored(merged):
    evaluator = make_evaluator()
    evaluator.check(Data)
    before = snapshot(merged.model)
    merges = {
        "floor": merged.constant_params(0.0),
        "task arithmetic": merged.constant_params(0.3),
        "seq0": merged.expert_params("seq0"),
        "seq1": merged.expert_params("seq1"),
    }
    scores = {}
    for name, params in merges.items():
        scores[name] = evaluator.evaluate(merged, params, Data)
        assert_restored(merged.model, before)
        for task in TASKS:
            assert scores[name][task]["acc"] == pytest.approx(direct_accuracy(merged, params, task)), (name, task)
    # the merges differ (so each run saw its own weights): each expert is the specialist of its rule
    assert scores["seq0"]["tiny_seq0"]["acc"] == 1.0 and scores["seq0"]["tiny_seq1"]["acc"] < 0.5
    assert scores["seq1"]["tiny_seq1"]["acc"] == 1.0 and scores["seq1"]["tiny_seq0"]["acc"] < 0.5


def test_generation_runs_the_merge(merged):
    """generate_until (HF ``generate``) also runs the swapped-in merge: the greedy next token, worked out directly."""
    tokenizer = load_tokenizer(str(ASSETS / "tokenizer"))
    rows = [json.loads(line) for line in (ASSETS / "tiny_seq0.jsonl").read_text().splitlines()]
    evaluator = make_evaluator(tasks=["tiny_gen0"], expert_tasks=None, metrics=["exact_match"])
    for expert in TASKS.values():
        params = merged.expert_params(expert)
        with torch.no_grad():
            greedy = [
                merged(input_ids=torch.tensor([tokenizer.encode(row["prompt"])]), params=params).logits[0, -1].argmax()
                for row in rows
            ]
        expected = sum(
            int(g) == tokenizer.convert_tokens_to_ids(r["choices"][r["label"]]) for g, r in zip(greedy, rows)
        )
        score = evaluator.evaluate(merged, params, Data)["tiny_gen0"]["exact_match"]
        assert score == pytest.approx(expected / len(rows)), expert


def test_reference_rows_judge_experts_only_on_their_mapped_tasks(merged):
    rows = reference_rows(merged, make_evaluator(expert_tasks={"tiny_seq1": "seq1"}), Data)
    assert set(rows[FLOOR]) == set(TASKS) and set(rows["task arithmetic (lam=0.3)"]) == set(TASKS)
    assert rows[EXPERT] == {"tiny_seq1": {"acc": 1.0}}  # seq0 has no lm-eval task of its own here
    evaluator = make_evaluator()
    assert evaluator.selected(None) == list(TASKS)
    assert evaluator.selected(["seq0"]) == ["tiny_seq0"] and evaluator.selected(["tiny_seq1"]) == ["tiny_seq1"]


def test_lora_merge_is_materialized_and_judged(tmp_path):
    """A merged model whose params are not tensors (LoRA factors) runs as a merge_and_unload copy."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    adapters = {}
    for k, expert in enumerate(TASKS.values()):
        torch.manual_seed(k + 1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / expert)
        adapters[expert] = str(tmp_path / expert)
    lora = LoraMergedModel(make_lora_pool(copy.deepcopy(base), adapters), granularity="task", init=0.5)
    before = snapshot(lora.model)
    params = lora.merged_tensors()
    scores = make_evaluator(tasks=["tiny_seq0"], expert_tasks=None).evaluate(lora, params, Data)
    assert scores["tiny_seq0"]["acc"] == pytest.approx(direct_accuracy(lora, params, "tiny_seq0"))
    assert_restored(lora.model, before)


def test_metric_keys_lose_the_filter_only_when_unambiguous():
    results = {
        "alias": "t",
        "acc,none": 0.5,
        "acc_stderr,none": "N/A",
        "exact_match,strict": 0.2,
        "exact_match,flex": 0.3,
    }
    assert pick_metric(results, "acc", "t") == 0.5
    assert pick_metric(results, "exact_match,flex", "t") == 0.3
    with pytest.raises(KeyError, match="several filters.*evaluator.metrics"):
        pick_metric(results, "exact_match", "t")
    with pytest.raises(KeyError, match="no metric 'f1'.*evaluator.metrics"):
        pick_metric(results, "f1", "t")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": ["tiny_seq0", "nope"], "expert_tasks": None}, r"no task \['nope'\].*evaluator.tasks"),
        ({"expert_tasks": {"tiny_seq0": "seq9"}}, r"seq9.*not experts of this run"),
        ({"tokenizer": None}, "evaluator.tokenizer"),
    ],
)
def test_check_names_the_key_to_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_evaluator(**overrides).check(Data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": []}, "evaluator.tasks"),
        ({"expert_tasks": {"arc_easy": "seq0"}}, r"evaluator.expert_tasks names \['arc_easy'\]"),
        ({"metrics": ["my_score"]}, "evaluator.higher_is_better"),
        ({"include_path": "/no/such/folder"}, "evaluator.include_path"),
    ],
)
def test_construction_refuses_bad_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_evaluator(**overrides)


def test_unknown_metric_direction_can_be_given():
    assert make_evaluator(metrics=["my_score"], higher_is_better={"my_score": False}).primary.higher_is_better is False


LM_EVAL = (
    "evaluator=lm_eval",
    "evaluator.tasks=[tiny_seq0,tiny_seq1]",
    f"evaluator.include_path={ASSETS}",
    "evaluator.include_defaults=false",
    f"evaluator.tokenizer={ASSETS / 'tokenizer'}",
    "evaluator.expert_tasks={tiny_seq0: seq0, tiny_seq1: seq1}",
)


def test_pipeline_writes_the_lm_eval_metric(tmp_path):
    """experiment=tiny_lm evaluator=lm_eval: every row holds the lm-eval tasks, in results.md/CSV and the CSV logger."""
    cfg = make_cfg("experiment=tiny_lm", *LM_EVAL, "method.steps=2", "export=false", f"paths.output_dir={tmp_path}")
    rows = {row["method"]: row for row in run(cfg)["table"]}
    assert list(rows) == [
        FLOOR,
        EXPERT,
        "task arithmetic (lam=0.3)",
        "adamerging (init, before training)",
        "adamerging",
    ]
    assert rows[EXPERT]["tiny_seq0"] == rows[EXPERT]["tiny_seq1"] == 1.0 and rows[EXPERT]["avg_normalized"] == 1.0
    assert 0 < rows["adamerging"]["avg_normalized"] <= 1.0
    assert (tmp_path / "results.md").read_text().startswith("Task columns: acc (higher is better)")
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {"tiny_seq0", "tiny_seq1", "avg_normalized"} <= set(table[0])
    logged = (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()
    assert "results/adamerging/tiny_seq0" in logged


def test_per_task_merges_are_judged_on_their_experts_lm_eval_tasks(tmp_path):
    """TALL judges each task through its own mask: with lm-eval, each expert's mapped tasks through that expert's."""
    cfg = make_cfg("experiment=tiny_lm", *LM_EVAL, "method=tall_masks", "~logger", f"paths.output_dir={tmp_path}")
    rows = {row["method"]: row for row in run(cfg)["table"]}
    per_task = rows["tall_masks (per-task)"]
    assert 0 < per_task["tiny_seq0"] <= 1 and 0 < per_task["tiny_seq1"] <= 1
    assert per_task["avg_normalized"] >= rows["tall_masks"]["avg_normalized"]
