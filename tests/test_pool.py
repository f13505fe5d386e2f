import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from adamerge.core.adapters import AdapterError
from adamerge.core.pool import PoolError, load_pool, make_pool, select_merged_names
from tests.conftest import perturbed, tiny_bert_config


def save_experts(tmp_path, base_model, expert_states):
    base_model.save_pretrained(tmp_path / "base")
    paths = {}
    for name, state in expert_states.items():
        expert = BertForSequenceClassification(tiny_bert_config()).eval()
        expert.load_state_dict(state)
        expert.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    return paths


def test_folders_give_the_same_pool_as_state_dicts(tmp_path, base_model, expert_states):
    paths = save_experts(tmp_path, base_model, expert_states)
    from_disk = load_pool(str(tmp_path / "base"), paths, model_class="transformers.AutoModelForSequenceClassification")
    in_memory = make_pool(base_model, expert_states)
    assert from_disk.experts == ["task0", "task1", "task2"]
    assert list(from_disk.task_vectors) == list(in_memory.task_vectors)
    for name, tau in in_memory.task_vectors.items():
        assert tau.shape == (3, *base_model.get_parameter(name).shape)
        torch.testing.assert_close(from_disk.task_vectors[name], tau)
    # heads are per expert, never merged
    assert not any(n.startswith("classifier") for n in from_disk.task_vectors)
    torch.testing.assert_close(
        from_disk.heads["task1"]["classifier.weight"], expert_states["task1"]["classifier.weight"]
    )


def test_safetensors_file_expert_and_bf16_stacks(tmp_path, base_model, expert_states):
    save_file({k: v.contiguous() for k, v in expert_states["task0"].items()}, str(tmp_path / "e.safetensors"))
    pool = make_pool(base_model, {"task0": str(tmp_path / "e.safetensors")}, dtype="bf16")
    tau = pool.task_vectors["bert.encoder.layer.0.attention.self.query.weight"]
    assert tau.dtype == torch.bfloat16
    expected = expert_states["task0"]["bert.encoder.layer.0.attention.self.query.weight"] - base_model.get_parameter(
        "bert.encoder.layer.0.attention.self.query.weight"
    )
    torch.testing.assert_close(tau[0].float(), expected, atol=2e-3, rtol=1e-2)


def test_include_exclude_patterns(base_model):
    state = dict(base_model.named_parameters())
    names = select_merged_names(state, include=["*encoder*"], exclude=["*LayerNorm*"])
    assert names and all("encoder" in n and "LayerNorm" not in n for n in names)
    assert not any(n.startswith("classifier") for n in select_merged_names(state))
    with pytest.raises(PoolError, match="experts.include"):
        select_merged_names(state, include=["nothing*"])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_task_vector_equals_merge_and_unload_minus_base(tmp_path, base_model, use_rslora):
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(base_model),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            use_rslora=use_rslora,
            modules_to_save=["classifier"],
            init_lora_weights=False,
        ),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = peft_model.merge_and_unload()
    pool = make_pool(base_model, {"lora": str(tmp_path / "adapter")})
    for name, tau in pool.task_vectors.items():
        expected = dense.get_parameter(name) - base_model.get_parameter(name)
        torch.testing.assert_close(tau[0], expected, atol=1e-6, rtol=0)
    assert pool.task_vectors["bert.encoder.layer.1.attention.self.value.weight"].abs().sum() > 0
    torch.testing.assert_close(pool.heads["lora"]["classifier.weight"], dense.classifier.weight)


def test_lora_with_fan_in_fan_out_gpt2(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    base = GPT2LMHeadModel(config).eval()
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = peft_model.merge_and_unload()
    pool = make_pool(base, {"lora": str(tmp_path / "adapter")})
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(
        pool.task_vectors[name][0], dense.get_parameter(name) - base.get_parameter(name), atol=1e-6, rtol=0
    )


def test_shape_mismatch_names_expert_and_tensor(base_model, expert_states):
    bad = dict(expert_states["task0"])
    bad["bert.encoder.layer.0.attention.self.query.weight"] = torch.zeros(16, 8)
    with pytest.raises(PoolError, match=r"expert 'bad'.*attention\.self\.query\.weight.*shape \(16, 8\)"):
        make_pool(base_model, {"bad": bad})


def test_missing_and_extra_tensors(base_model, expert_states):
    missing = {k: v for k, v in expert_states["task0"].items() if "layer.1.output.dense" not in k}
    with pytest.raises(PoolError, match=r"expert 'm' has no tensor 'bert\.encoder\.layer\.1\.output\.dense.*exclude"):
        make_pool(base_model, {"m": missing})
    extra = dict(expert_states["task0"]) | {"bert.encoder.layer.2.output.dense.weight": torch.zeros(16, 24)}
    with pytest.raises(PoolError, match="tensor\\(s\\) the base lacks.*layer.2"):
        make_pool(base_model, {"x": extra})
    # excluded tensors may be missing
    pool = make_pool(base_model, {"m": missing}, exclude=["*layer.1.output.dense*"])
    assert "bert.encoder.layer.1.output.dense.weight" not in pool.task_vectors


def test_non_floating_expert_tensor(base_model, expert_states):
    bad = dict(expert_states["task0"])
    bad["bert.pooler.dense.bias"] = torch.zeros(16, dtype=torch.long)
    with pytest.raises(PoolError, match="pooler.dense.bias.*not floating"):
        make_pool(base_model, {"bad": bad})


def test_architecture_mismatch(tmp_path, base_model):
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt")
    with pytest.raises(PoolError, match="expert 'g' is a 'gpt2' model but the base is 'bert'"):
        make_pool(base_model, {"g": str(tmp_path / "gpt")})


def test_adapter_for_another_base(tmp_path, base_model):
    other = BertForSequenceClassification(tiny_bert_config(hidden_size=8, intermediate_size=12)).eval()
    get_peft_model(other, LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="expert 'a'.*query.weight.*another base"):
        make_pool(base_model, {"a": str(tmp_path / "adapter")})


def test_missing_path_and_no_experts(base_model):
    with pytest.raises(PoolError, match="does not exist"):
        make_pool(base_model, {"a": "./no/such/folder"})
    with pytest.raises(PoolError, match="no experts"):
        make_pool(base_model, {})


def test_dora_refused(tmp_path, base_model):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        make_pool(base_model, {"d": str(tmp_path / "d")})


def test_pool_accepts_modules(base_model, expert_states):
    expert = BertForSequenceClassification(tiny_bert_config()).eval()
    expert.load_state_dict(perturbed(base_model, seed=7))
    pool = make_pool(base_model, {"mod": expert})
    name = "bert.pooler.dense.weight"
    torch.testing.assert_close(pool.task_vectors[name][0], expert.get_parameter(name) - base_model.get_parameter(name))


def fake_hub(monkeypatch, tmp_path, repos):
    """``huggingface_hub.snapshot_download`` over local folders: copies the files ``allow_patterns`` admits."""
    import fnmatch
    import shutil

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        out = tmp_path / "hub" / repo_id.replace("/", "--")
        out.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_experts_with_safetensors_or_only_legacy_bin_weights(tmp_path, monkeypatch, base_model, expert_states):
    repos = {}
    for k, (name, safe) in enumerate([("org/new-expert", True), ("org/legacy-expert", False)]):
        model = copy.deepcopy(base_model)
        model.load_state_dict(expert_states[f"task{k}"])
        repos[name] = tmp_path / name.replace("/", "_")
        model.save_pretrained(repos[name])
        if not safe:  # transformers >= 5 writes safetensors only: make the legacy layout by hand
            (repos[name] / "model.safetensors").unlink()
            torch.save(model.state_dict(), repos[name] / "pytorch_model.bin")
    calls = fake_hub(monkeypatch, tmp_path, repos)
    pool = make_pool(base_model, {"new": "org/new-expert", "legacy": "org/legacy-expert"})
    assert [any("*.bin" in p for p in c) for c in calls] == [False, False, True]  # .bin fetched only when needed
    expected = make_pool(base_model, {"new": expert_states["task0"], "legacy": expert_states["task1"]})
    for name, tau in expected.task_vectors.items():
        torch.testing.assert_close(pool.task_vectors[name], tau)
