"""Experts that added tokens (adamerge.core.vocab): shared rows merge, added rows are the adders' mean, the export
carries the union tokenizer and its provenance; vocabularies that are not extensions are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from adamerge.core.export import export_merged
from adamerge.core.merged import MergedModel
from adamerge.core.pool import PoolError, load_pool, make_pool
from adamerge.core.vocab import (
    PROVENANCE_FILE,
    VocabUnion,
    mean_added_rows,
    provenance_markdown,
    vocab_union_sources,
)
from adamerge.testbeds.tiny_lm import CONTENT, tiny_llama_config

BASE_TOKENS = ["<pad>", "<sep>", *[f"t{i}" for i in range(CONTENT)]]  # the tiny Llama's 66 ids
ADDED = {"A": [AddedToken("<tool>", special=False), "<|im_start|>"], "B": ["<|im_start|>", "<think>"]}
LAMBDA = {"A": 0.3, "B": 0.5}


def word_tokenizer(tokens: list[str]):
    """A word-level tokenizer over ``tokens`` (ids in list order), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def with_tokens(tokenizer, tokens):
    out = copy.deepcopy(tokenizer)
    for token in tokens:
        special = isinstance(token, str) and token.startswith("<|")
        out.add_tokens([AddedToken(token, special=True) if special else token], special_tokens=special)
    return out


def fine_tune(base: LlamaForCausalLM, tokenizer, seed: int) -> LlamaForCausalLM:
    """The base grown to ``tokenizer``'s size, every tensor moved a little (new rows random)."""
    expert = copy.deepcopy(base)
    expert.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return expert


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folders(request, tmp_path_factory):
    """base/, A/ (adds <tool>, <|im_start|>), B/ (adds <|im_start|>, <think>): model + tokenizer each."""
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=request.param)).eval()
    tokenizer = word_tokenizer(BASE_TOKENS)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    models = {"base": base}
    for k, (name, tokens) in enumerate(ADDED.items()):
        expert_tokenizer = with_tokens(tokenizer, tokens)
        models[name] = fine_tune(base, expert_tokenizer, seed=k)
        models[name].save_pretrained(root / name)
        expert_tokenizer.save_pretrained(root / name)
    return root, {n: m.state_dict() for n, m in models.items()}


def test_added_tokens_keep_their_experts_rows_and_shared_rows_merge(folders, tmp_path):
    root, states = folders
    pool = load_pool(
        str(root / "base"), {e: str(root / e) for e in ADDED}, "transformers.AutoModelForCausalLM", head_patterns=[]
    )
    assert pool.vocab.added == ["<tool>", "<|im_start|>", "<think>"]
    assert pool.model.config.vocab_size == 69
    merged = MergedModel(pool, granularity="task", init=[[LAMBDA["A"]], [LAMBDA["B"]]])
    export_merged(merged, tmp_path / "out", pool.base_source)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    out = model.state_dict()
    base, a, b = states["base"], states["A"], states["B"]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        shared = base[name].shape[0] if name != "model.layers.0.self_attn.q_proj.weight" else None
        expected = base[name] + sum(LAMBDA[e] * (states[e][name][:shared] - base[name]) for e in ADDED)
        torch.testing.assert_close(out[name][:shared], expected, atol=1e-6, rtol=0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(out[name][66], a[name][66])  # <tool>: A's id 66
        torch.testing.assert_close(out[name][67], (a[name][67] + b[name][66]) / 2)  # <|im_start|>: A 67, B 66
        torch.testing.assert_close(out[name][68], b[name][67])  # <think>: B's id 67

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    assert len(tokenizer) == 69
    assert tokenizer.convert_ids_to_tokens(list(range(66))) == BASE_TOKENS
    assert tokenizer.convert_tokens_to_ids(["<tool>", "<|im_start|>", "<think>"]) == [66, 67, 68]
    ids = tokenizer("<|im_start|> t3 <tool> <think>", add_special_tokens=False)["input_ids"]
    assert ids == [67, 5, 66, 68]
    table = (tmp_path / "out" / PROVENANCE_FILE).read_text()
    assert "| 66 | `<tool>` | A | 66 |" in table
    assert "| 67 | `<\\|im_start\\|>` | A, B | 67, 66 |" in table
    assert "| 68 | `<think>` | B | 67 |" in table

    # The exported model is the functional merge, added tokens included.
    batch = {"input_ids": torch.tensor([ids + [2, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=0)


def test_added_rows_never_move_with_the_coefficients(folders):
    root, states = folders
    pool = load_pool(
        str(root / "base"), {e: str(root / e) for e in ADDED}, "transformers.AutoModelForCausalLM", head_patterns=[]
    )
    tau = pool.task_vectors["model.embed_tokens.weight"]  # [K, 69, hidden]
    assert tau.shape[:2] == (2, 69) and tau[:, 66:].abs().max() == 0
    assert not tau.requires_grad and not any(p.requires_grad for p in pool.model.parameters())
    merged = MergedModel(pool, granularity="task")
    for lam in (0.0, 1.0):
        rows = merged.constant_params(lam)["model.embed_tokens.weight"][66:]
        torch.testing.assert_close(rows[0], states["A"]["model.embed_tokens.weight"][66])


def test_experts_without_added_tokens_merge_as_before(base_model, expert_states):
    pool = make_pool(base_model, expert_states)
    assert pool.vocab is None


def test_an_expert_whose_ids_differ_from_the_base_is_refused_by_name(folders, tmp_path):
    root, states = folders
    tokens = list(BASE_TOKENS)
    tokens[5] = "<bad>"  # t3 replaced: not an extension of the base's vocabulary
    with_tokens(word_tokenizer(tokens), ["<tool>", "<|im_start|>"]).save_pretrained(tmp_path / "C")
    AutoModelForCausalLM.from_pretrained(root / "A").save_pretrained(tmp_path / "C")
    with pytest.raises(PoolError, match=r"expert 'C': token id 5 is '<bad>' in its tokenizer but 't3' in the base"):
        load_pool(
            str(root / "base"),
            {"A": str(root / "A"), "C": str(tmp_path / "C")},
            "transformers.AutoModelForCausalLM",
            head_patterns=[],
        )


def test_a_grown_expert_without_a_tokenizer_is_refused(folders):
    root, states = folders
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    with pytest.raises(PoolError, match=r"expert 'A' has 68 vocabulary rows but no tokenizer.*experts\.tokenizers\.A"):
        make_pool(base, {"A": states["A"]}, head_patterns=[], base_source=str(root / "base"))
    # the tokenizer given by hand (experts.tokenizers) is enough
    pool = make_pool(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        {"A": states["A"]},
        head_patterns=[],
        base_source=str(root / "base"),
        tokenizers={"A": str(root / "A")},
    )
    assert pool.vocab.added == ["<tool>", "<|im_start|>"]
    # rows padded past the tokenizer (resize to a multiple of 8) name no token: dropped, the shared rows merge
    padded = AutoModelForCausalLM.from_pretrained(root / "A")
    padded.resize_token_embeddings(72, mean_resizing=False)
    pool = make_pool(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        {"P": padded.state_dict()},
        head_patterns=[],
        base_source=str(root / "base"),
        tokenizers={"P": str(root / "base")},
    )
    assert pool.vocab.added == [] and pool.task_vectors["model.embed_tokens.weight"].shape == (1, 66, 32)


def test_other_shape_differences_keep_the_architecture_error(folders):
    root, states = folders
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    grown_projection = dict(states["base"]) | {name: torch.zeros(33, 32)}
    for experts in ({"X": grown_projection}, {"A": states["A"], "X": grown_projection}):  # beside an added vocabulary
        with pytest.raises(
            PoolError, match=r"expert 'X': tensor .*q_proj.* has shape \(33, 32\).*architecture differs"
        ):
            make_pool(
                AutoModelForCausalLM.from_pretrained(root / "base"),
                experts,
                head_patterns=[],
                base_source=str(root / "base"),
                tokenizers={"A": str(root / "A")},
            )
    shrunk = dict(states["base"]) | {"model.embed_tokens.weight": torch.zeros(60, 32)}
    with pytest.raises(PoolError, match=r"expert 'S': tensor .*embed_tokens.* has shape \(60, 32\).*architecture"):
        make_pool(
            AutoModelForCausalLM.from_pretrained(root / "base"),
            {"A": states["A"], "S": shrunk},
            head_patterns=[],
            base_source=str(root / "base"),
            tokenizers={"A": str(root / "A")},
        )
    if "lm_head.weight" in dict(base.named_parameters()):  # untied: only one vocab tensor grown is not an extension
        half = dict(states["A"]) | {"lm_head.weight": states["base"]["lm_head.weight"]}
        with pytest.raises(PoolError, match=r"expert 'H': its vocab-indexed tensors have .* extends all of them"):
            make_pool(base, {"H": half}, head_patterns=[], base_source=str(root / "base"))


# ---------------------------------------------------------------------------------------- pure functions by hand


def test_union_keeps_base_ids_and_orders_added_tokens_by_first_sight():
    base = {0: "a", 1: "b"}
    experts = {"x": base | {2: "<t>", 3: "<c>"}, "y": base | {2: "<c>", 3: "<k>"}, "z": dict(base)}
    size, sources = vocab_union_sources(base, experts)
    assert size == 2
    assert sources == {"<t>": {"x": 2}, "<c>": {"x": 3, "y": 2}, "<k>": {"y": 3}}
    with pytest.raises(PoolError, match="expert 'w': token id 1 is 'c'"):
        vocab_union_sources(base, {"w": {0: "a", 1: "c", 2: "b"}})


def test_mean_added_rows_averages_over_the_experts_that_added_the_token():
    vocab = VocabUnion(None, 2, {"<t>": {"x": 2}, "<c>": {"x": 3, "y": 2}}, ["emb"])
    values = {"x": torch.tensor([[0.0], [0.0], [1.0], [2.0]]), "y": torch.tensor([[0.0], [0.0], [4.0]])}
    torch.testing.assert_close(mean_added_rows(vocab, values.__getitem__), torch.tensor([[1.0], [3.0]]))
    assert "| 3 | `<c>` | x, y | 3, 2 |" in provenance_markdown(vocab)


# ---------------------------------------------------------------------------------------- chat templates and the CLI

CHAT = "{% for m in messages %}<|im_start|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<think>{% endif %}"


def text_tasks(root, texts: dict[str, list[str]]) -> dict[str, str]:
    """task -> a save_to_disk folder with ``validation`` (calibration) and ``test`` text splits."""
    import datasets

    folders = {}
    for task, rows in texts.items():
        folders[task] = str(root / "data" / task)
        split = datasets.Dataset.from_dict({"text": rows})
        datasets.DatasetDict({"validation": split, "test": split}).save_to_disk(folders[task])
    return folders


def test_calibration_prompts_go_through_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    from adamerge.engine.data import MergeDataModule
    from adamerge.engine.datasets import DataError

    tokenizer = with_tokens(word_tokenizer(BASE_TOKENS), ["<|im_start|>", "<think>"])
    tasks = text_tasks(tmp_path, {"A": ["t1 t2", "t3"]})
    plain = MergeDataModule(tasks, tokenizer=copy.deepcopy(tokenizer), calib_split="validation")
    plain.setup()
    assert plain.calib["A"]["input_ids"] == [[3, 4], [5]]  # no template: text as is
    tokenizer.chat_template = CHAT
    chat = MergeDataModule(tasks, tokenizer=tokenizer, calib_split="validation")
    chat.setup()
    assert chat.calib["A"]["input_ids"] == [[66, 3, 4, 67], [66, 5, 67]]  # user turn, then the assistant's opening
    assert chat.eval["A"]["input_ids"] == [[3, 4], [5]]  # held-out text stays raw
    off = MergeDataModule(tasks, tokenizer=tokenizer, calib_split="validation", chat_template=False)
    off.setup()
    assert off.calib["A"]["input_ids"] == [[3, 4], [5]]
    with pytest.raises(DataError, match=r"data\.chat_template=true but the tokenizer .* has no chat template"):
        MergeDataModule(tasks, tokenizer=word_tokenizer(BASE_TOKENS), chat_template=True)


def test_a_classifier_calibrates_on_raw_text_even_when_its_tokenizer_has_a_chat_template(tmp_path):
    """data.chat_template=null means 'when the tokenizer has one' for language models only: a classifier is judged on
    raw text, so its calibration text stays raw; an explicit true is obeyed."""
    from hydra.utils import instantiate

    from adamerge.evaluation.causal_lm import CausalLM
    from adamerge.evaluation.classification import Classification
    from adamerge.pipeline import chat_prompts
    from tests.test_config import make_cfg

    tokenizer = with_tokens(word_tokenizer(BASE_TOKENS), ["<|im_start|>", "<think>"])
    tokenizer.chat_template = CHAT
    tasks = text_tasks(tmp_path, {"A": ["t1 t2", "t3"]})
    cfg = make_cfg("data=hf", f"data.tasks={{A: '{tasks['A']}'}}")
    calib = {}
    for evaluator in (Classification(), CausalLM()):
        data = instantiate(cfg.data, tokenizer=tokenizer, num_steps=1, **chat_prompts(cfg, evaluator))
        data.setup()
        calib[type(evaluator).__name__] = data.calib["A"]["input_ids"]
    assert calib == {"Classification": [[3, 4], [5]], "CausalLM": [[66, 3, 4, 67], [66, 5, 67]]}
    assert chat_prompts(make_cfg("data=hf", "data.chat_template=true"), Classification()) == {}


def test_cli_merges_chat_experts_on_the_union_vocabulary(folders, tmp_path, caplog):
    """experts=hf on folders whose tokenizers added tokens: calibration and evaluation text holding them runs through
    the merged model; the export has the union tokenizer (with B's chat template) and the provenance table."""
    from adamerge.pipeline import run
    from tests.test_config import make_cfg

    root, _ = folders
    chat_expert = tmp_path / "B"  # B with a chat template, which the union tokenizer inherits (the base has none)
    AutoModelForCausalLM.from_pretrained(root / "B").save_pretrained(chat_expert)
    tokenizer = AutoTokenizer.from_pretrained(root / "B")
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(chat_expert)
    tasks = text_tasks(tmp_path, {"A": ["<tool> t1 t2 t3", "t4 t5"], "B": ["t7 t9 <think>", "<|im_start|> t2"]})
    experts = f"{{A: '{root / 'A'}', B: '{chat_expert}'}}"
    overrides = [
        "experts=hf",
        f"experts.base='{root / 'base'}'",
        f"experts.experts={experts}",
        "experts.model_class=transformers.AutoModelForCausalLM",
        "experts.head_patterns=[]",
        "data=hf",
        f"data.tasks={{A: '{tasks['A']}', B: '{tasks['B']}'}}",
        "evaluator=causal_lm",
        "method=task_arithmetic",
        f"paths.output_dir={tmp_path / 'out'}",
        "calibration_batches=0",
        "~logger",
    ]
    with caplog.at_level("INFO", logger="adamerge.pipeline"):
        result = run(make_cfg(*overrides))
    assert "tokenized with the union of the experts' vocabularies (3 added tokens)" in caplog.text
    assert {row["method"] for row in result["table"]} >= {"task_arithmetic", "expert (own task)"}
    exported = AutoTokenizer.from_pretrained(tmp_path / "out" / "merged" / "model")
    assert exported.convert_tokens_to_ids(["<tool>", "<|im_start|>", "<think>"]) == [66, 67, 68]
    assert exported.chat_template == CHAT
    assert "| 68 | `<think>` | B | 67 |" in (tmp_path / "out" / "merged" / PROVENANCE_FILE).read_text()
