"""Bad inputs (issue 15): broken weights, weight formats, dtypes, paths and data files are named, not crashed on."""

import copy
import json
import logging

import datasets
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

from adamerge.cli import config_dir
from adamerge.core.lora_pool import load_lora_pool, make_lora_pool
from adamerge.core.merged import MergedModel
from adamerge.core.pool import PoolError, load_pool, make_pool
from adamerge.engine.datasets import DataError, load_split
from tests.conftest import tiny_bert_config

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
MODEL_CLASS = "transformers.AutoModelForSequenceClassification"


def bert(state=None, seed=0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def save_bin(folder, model):
    """A legacy checkpoint: config.json and pytorch_model.bin, no safetensors."""
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def save_adapter(path, base, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf in an expert
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_expert_weights_is_named_at_load(base_model, expert_states, bad):
    broken = {k: v.clone() for k, v in expert_states["task1"].items()}
    broken[QUERY][2, 3] = bad
    experts = {"task0": expert_states["task0"], "task1": broken}
    with pytest.raises(PoolError, match=rf"expert 'task1': tensor '{QUERY}' has 1 NaN/inf.*experts.check_finite=false"):
        make_pool(copy.deepcopy(base_model), experts)
    pool = make_pool(copy.deepcopy(base_model), experts, check_finite=False)  # the documented way out, on purpose
    assert not pool.task_vectors[QUERY][1].isfinite().all()


def test_nan_in_the_base_blames_the_base_not_expert_0(base_model, expert_states):
    base = copy.deepcopy(base_model)
    with torch.no_grad():
        base.get_parameter(QUERY)[0, 0] = float("nan")
    with pytest.raises(PoolError, match=rf"base model's tensor '{QUERY}'.*experts\.base"):
        make_pool(base, expert_states)


def test_nan_in_expert_head_is_named(base_model, expert_states):
    broken = {k: v.clone() for k, v in expert_states["task2"].items()}
    broken["classifier.bias"][0] = float("nan")
    with pytest.raises(PoolError, match=r"expert 'task2': head tensor 'classifier\.bias'.*experts\.check_finite"):
        make_pool(base_model, {"task0": expert_states["task0"], "task2": broken})


def test_task_vector_overflowing_fp16_storage_is_named(base_model, expert_states):
    big = {k: v.clone() for k, v in expert_states["task0"].items()}
    big[QUERY][0, 0] = 1e6  # finite in the expert, beyond float16's range as a task vector
    with pytest.raises(PoolError, match=r"expert 't'.*overflows the storage dtype torch\.float16.*experts\.dtype"):
        make_pool(base_model, {"t": big}, dtype="float16")


def test_nan_in_lora_factors_is_named_in_both_pools(tmp_path, base_model):
    path = tmp_path / "adapter"
    save_adapter(path, base_model, 1, r=2, target_modules=["query"])
    weights = path / "adapter_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    key = next(k for k in state if "layer.1" in k and "lora_B" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    name = "bert.encoder.layer.1.attention.self.query.weight"
    with pytest.raises(PoolError, match=rf"expert 'a': '{name} \(lora_B\)'.*experts\.check_finite=false"):
        make_lora_pool(copy.deepcopy(base_model), {"a": str(path)})
    with pytest.raises(PoolError, match=rf"expert 'a': tensor '{name}' has \d+ NaN/inf"):
        make_pool(copy.deepcopy(base_model), {"a": str(path)})


def test_experts_configs_check_finite_by_default(tmp_path, base_model, expert_states):
    for group in ("hf", "lora", "minilm_text", "tiny"):
        assert OmegaConf.load(f"{config_dir()}/experts/{group}.yaml").check_finite is True, group
    base_model.save_pretrained(tmp_path / "base")
    broken = bert(expert_states["task0"])
    with torch.no_grad():
        broken.get_parameter(QUERY)[1, 1] = float("nan")
    broken.save_pretrained(tmp_path / "e")
    cfg = OmegaConf.load(f"{config_dir()}/experts/hf.yaml")
    cfg.base, cfg.experts = str(tmp_path / "base"), {"sst2": str(tmp_path / "e")}
    with pytest.raises(InstantiationException, match=r"expert 'sst2'.*experts\.experts\.sst2.*experts\.check_finite"):
        instantiate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Weight formats: .bin experts keep their heads
# ---------------------------------------------------------------------------------------------------------------


def test_pytorch_model_bin_expert_keeps_its_head(tmp_path, base_model, expert_states):
    expert = bert(expert_states["task1"])
    folder = save_bin(tmp_path / "legacy", expert)
    pool = make_pool(copy.deepcopy(base_model), {"legacy": folder})
    torch.testing.assert_close(pool.heads["legacy"]["classifier.weight"], expert.classifier.weight, rtol=0, atol=0)
    torch.testing.assert_close(pool.heads["legacy"]["classifier.bias"], expert.classifier.bias, rtol=0, atol=0)
    reference = make_pool(copy.deepcopy(base_model), {"legacy": expert_states["task1"]})
    for name, tau in reference.task_vectors.items():
        torch.testing.assert_close(pool.task_vectors[name], tau, rtol=0, atol=0)


def test_sharded_pytorch_model_bin_expert(tmp_path, base_model, expert_states):
    expert = bert(expert_states["task2"])
    folder = tmp_path / "sharded"
    expert.config.save_pretrained(folder)
    state = expert.state_dict()
    shards = {"pytorch_model-00001-of-00002.bin": {}, "pytorch_model-00002-of-00002.bin": {}}
    for i, (key, value) in enumerate(state.items()):
        shards[list(shards)[i % 2]][key] = value
    weight_map = {}
    for file, part in shards.items():
        torch.save(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pool = make_pool(copy.deepcopy(base_model), {"s": str(folder)})
    torch.testing.assert_close(pool.heads["s"]["classifier.weight"], expert.classifier.weight, rtol=0, atol=0)
    tau = expert.get_parameter(QUERY) - base_model.get_parameter(QUERY)
    torch.testing.assert_close(pool.task_vectors[QUERY][0], tau)


def test_bare_bin_file_expert_is_read_as_a_state_dict(tmp_path, base_model, expert_states):
    torch.save(expert_states["task0"], tmp_path / "expert.bin")
    pool = make_pool(copy.deepcopy(base_model), {"t": str(tmp_path / "expert.bin")})
    torch.testing.assert_close(pool.heads["t"]["classifier.weight"], expert_states["task0"]["classifier.weight"])


class NotATensor:  # a pickled object: weights_only loading must refuse it, never run its reduce
    pass


def test_bin_with_pickled_objects_is_refused_not_unpickled(tmp_path, base_model, expert_states):
    torch.save({"weights": expert_states["task0"], "extra": NotATensor()}, tmp_path / "expert.bin")
    with pytest.raises(PoolError, match=r"expert 'p': cannot read .*expert\.bin as a PyTorch state dict.*weights_only"):
        make_pool(base_model, {"p": str(tmp_path / "expert.bin")})
    torch.save({"state_dict": expert_states["task0"]}, tmp_path / "nested.pt")
    with pytest.raises(PoolError, match=r"expert 'n': .*nested\.pt holds a dict that is not a state dict"):
        make_pool(base_model, {"n": str(tmp_path / "nested.pt")})


def test_lora_adapter_saved_as_bin(tmp_path, base_model):
    path = tmp_path / "adapter"
    save_adapter(path, base_model, 1, r=2, target_modules=["query"])
    from safetensors.torch import load_file

    torch.save(load_file(str(path / "adapter_model.safetensors")), path / "adapter_model.bin")
    reference = make_lora_pool(copy.deepcopy(base_model), {"a": str(path)})
    (path / "adapter_model.safetensors").unlink()
    pool = make_lora_pool(copy.deepcopy(base_model), {"a": str(path)})
    for name, factors in reference.adapters["a"].modules.items():
        torch.testing.assert_close(pool.adapters["a"].modules[name].B, factors.B)


# ---------------------------------------------------------------------------------------------------------------
# Dtypes: an fp16 expert beside an fp32 base
# ---------------------------------------------------------------------------------------------------------------


def test_fp16_expert_beside_fp32_base_runs_a_forward(tmp_path, base_model, expert_states, batch):
    base_model.save_pretrained(tmp_path / "base")
    bert(expert_states["task0"]).save_pretrained(tmp_path / "full")
    bert(expert_states["task1"]).half().save_pretrained(tmp_path / "half")
    pool = load_pool(
        str(tmp_path / "base"), {"full": str(tmp_path / "full"), "half": str(tmp_path / "half")}, MODEL_CLASS
    )
    merged = MergedModel(pool, granularity="task", init=0.3)
    with torch.no_grad():
        logits = merged(**batch, task="half").logits
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    assert pool.task_vectors[QUERY].dtype == torch.float32  # experts.dtype
    assert {t.dtype for h in pool.heads.values() for t in h.values()} == {torch.float32}  # the base's dtype
    expected = expert_states["task1"][QUERY].half().float() - base_model.get_parameter(QUERY)
    torch.testing.assert_close(pool.task_vectors[QUERY][1], expected, rtol=0, atol=0)  # formed in float32


# ---------------------------------------------------------------------------------------------------------------
# Bad files and paths are named
# ---------------------------------------------------------------------------------------------------------------


def test_corrupt_safetensors_names_file_and_expert(tmp_path, base_model):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(PoolError, match=r"expert 'c': cannot read .*broken\.safetensors.*experts\.experts\.c"):
        make_pool(base_model, {"c": str(tmp_path / "broken.safetensors")})
    folder = tmp_path / "folder"
    base_model.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PoolError, match=r"expert 'f': cannot read .*model\.safetensors"):
        make_pool(base_model, {"f": str(folder)})


def test_unknown_weight_file_is_refused_clearly(tmp_path, base_model):
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(PoolError, match=r"expert 'w': .*weights\.npz is neither a \.safetensors file"):
        make_pool(base_model, {"w": str(tmp_path / "weights.npz")})


def fail_on_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_relative_expert_path_is_local_and_hub_errors_name_the_config_key(
    tmp_path, monkeypatch, base_model, expert_states
):
    monkeypatch.chdir(tmp_path)
    calls = fail_on_hub(monkeypatch)
    base_model.save_pretrained(tmp_path / "base")
    bert(expert_states["task0"]).save_pretrained(tmp_path / "experts" / "a")
    pool = load_pool("base", {"a": "experts/a"}, MODEL_CLASS)  # no "./": still the local folder
    assert pool.experts == ["a"] and calls == []
    with pytest.raises(
        PoolError,
        match=r"expert 'b': 'experts/b' is not a local path.*LocalEntryNotFoundError.*"
        r"experts\.experts\.b",
    ):
        load_pool("base", {"a": "experts/a", "b": "experts/b"}, MODEL_CLASS)
    with pytest.raises(PoolError, match=r"the base: 'org/no-base'.*LocalEntryNotFoundError.*fix experts\.base"):
        load_pool("org/no-base", {"a": "experts/a"}, MODEL_CLASS)
    with pytest.raises(PoolError, match=r"the base: 'org/no-base'.*experts\.base"):
        load_lora_pool("org/no-base", {"a": "experts/a"}, MODEL_CLASS)


def test_error_messages_name_experts_experts_not_experts_models(tmp_path, base_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt")
    with pytest.raises(
        PoolError, match=r"'gpt2' model but the base is 'bert'.*fix experts\.experts\.g or experts\.base"
    ):
        make_pool(base_model, {"g": str(tmp_path / "gpt")})
    with pytest.raises(PoolError, match=r"experts\.experts$"):
        make_pool(base_model, {})
    with pytest.raises(PoolError, match=r"does not exist.*fix experts\.experts\.m"):
        make_pool(base_model, {"m": "./no/such/folder"})


# ---------------------------------------------------------------------------------------------------------------
# LoRA: another declared base warns; include/exclude as for the dense pool
# ---------------------------------------------------------------------------------------------------------------


def test_lora_adapter_declaring_another_base_warns(tmp_path, caplog):
    bert(seed=0).save_pretrained(tmp_path / "base_a")
    bert(seed=1).save_pretrained(tmp_path / "base_b")  # same shapes, other weights
    trained_on = BertForSequenceClassification.from_pretrained(tmp_path / "base_a").eval()
    adapter = save_adapter(tmp_path / "adapter", trained_on, 1, r=2, target_modules=["query"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    for load in (load_lora_pool, load_pool):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load(str(tmp_path / "base_a"), {"sst2": adapter}, MODEL_CLASS)
        assert "trained on" not in caplog.text
        with caplog.at_level(logging.WARNING):
            load(str(tmp_path / "base_b"), {"sst2": adapter}, MODEL_CLASS)
        assert "expert 'sst2'" in caplog.text and "base_a" in caplog.text and "base_b" in caplog.text, load


def test_lora_pool_accepts_include_and_exclude(tmp_path, base_model):
    adapter = save_adapter(tmp_path / "adapter", base_model, 1, r=2, target_modules=["query", "value"])
    pool = make_lora_pool(copy.deepcopy(base_model), {"a": adapter}, exclude=["*.value.weight"])
    assert sorted(pool.adapters["a"].modules) == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
    ]
    pool = make_lora_pool(copy.deepcopy(base_model), {"a": adapter}, include=["*layer.1.*"])
    assert sorted(pool.adapters["a"].modules) == [
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.value.weight",
    ]
    with pytest.raises(ValueError, match=r"no adapted tensor matches.*experts\.include / experts\.exclude"):
        make_lora_pool(copy.deepcopy(base_model), {"a": adapter}, include=["nothing*"])
    # the README's YAML (exclude: []) through experts=lora
    base_model.save_pretrained(tmp_path / "base")
    cfg = OmegaConf.load(f"{config_dir()}/experts/lora.yaml")
    cfg.base, cfg.experts, cfg.exclude = str(tmp_path / "base"), {"a": adapter}, ["*layer.0.*"]
    pool = instantiate(cfg)
    assert all("layer.1" in n for n in pool.adapters["a"].modules)


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("container", ["dictconfig", "dict"])
def test_readme_data_files_yaml_loads_from_a_dictconfig_and_a_dict(tmp_path, monkeypatch, container):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "fine", "label": 1}])
    spec = {"path": "json", "data_files": {"validation": "a.jsonl", "test": "b.jsonl"}}
    if container == "dictconfig":  # what Hydra passes without _convert_: every data.tasks entry
        spec = OmegaConf.create({"tasks": {"sst2": spec}}).tasks.sst2
    assert load_split(spec, "validation", "sst2")["text"] == ["good", "bad"]
    assert load_split(spec, "test", "sst2")["label"] == [1]


def test_empty_jsonl_raises_data_error_naming_task_split_and_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    spec = {
        "path": "json",
        "data_files": {"validation": str(tmp_path / "empty.jsonl"), "test": str(tmp_path / "t.jsonl")},
    }
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(DataError, match=r"task 'sst2': data file .*empty\.jsonl \(split 'validation'\) is empty"):
        load_split(spec, "validation", "sst2")


def test_empty_saved_split_raises_data_error_naming_task_split_and_folder(tmp_path):
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": [], "label": []}),
            "test": datasets.Dataset.from_dict({"text": ["x"], "label": [0]}),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"task 'sst2': split 'validation' saved in .*saved/validation is empty"):
        load_split(str(tmp_path / "saved"), "validation", "sst2")
    assert load_split(str(tmp_path / "saved"), "test", "sst2")["text"] == ["x"]  # the other split still loads
    with pytest.raises(DataError, match=r"task 'sst2': dataset .*saved has no split 'calib'"):
        load_split({"path": str(tmp_path / "saved")}, "calib", "sst2")
