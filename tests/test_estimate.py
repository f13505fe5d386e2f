import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.estimate import memory_plan, meta_model
from tests.conftest import perturbed


def allocated_bytes(*tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaConfig(**(kwargs | overrides))


def test_memory_plan_matches_real_allocation(tmp_path):
    config = tiny_llama_config(tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    experts = {f"e{k}": perturbed(model, seed=k) for k in range(4)}
    merged = MergedModel(make_pool(model, experts, dtype="bfloat16"), granularity="layer")
    real = {
        "base": allocated_bytes(*merged.model.parameters()),
        "task_vectors": allocated_bytes(*(t for _, t in merged.task_vectors.items())),
        "merged_tensors": allocated_bytes(*merged.merged_tensors().values()),
    }
    plan = memory_plan(meta_model(str(tmp_path), "transformers.LlamaForCausalLM"), 4, tau_dtype="bfloat16")
    for key, value in real.items():
        assert abs(plan[f"device/{key}"] - value) <= 0.2 * value, (key, plan[f"device/{key}"], value)
    streamed = memory_plan(
        meta_model(str(tmp_path), "transformers.LlamaForCausalLM"), 4, storage="streamed", tau_dtype="bfloat16"
    )
    assert streamed["device/task_vectors"] == 0 and streamed["host/task_vectors"] == plan["device/task_vectors"]


def test_estimate_command_prints_a_plan(tmp_path, capsys):
    from adamerge.estimate import main

    tiny_llama_config().save_pretrained(tmp_path)
    main([str(tmp_path), "--experts", "8", "--model-class", "transformers.AutoModelForCausalLM"])
    out = capsys.readouterr().out
    assert "device/task_vectors" in out and "K=8" in out


def held_bytes(merged: MergedModel) -> int:
    """Bytes of the low-rank factors and the dense task vectors, as moved to a device. (On the CPU each V factor
    still shares the storage of its whole SVD output, ``vh[:, :r]`` in adamerge.core.lowrank: more than this.)"""
    tensors = [*merged.low_rank_u.tensors(), *merged.low_rank_v.tensors(), *merged.task_vectors.tensors()]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_lowrank_plan_matches_the_factors_the_training_keeps(tmp_path):
    config = tiny_llama_config(tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    pool = make_pool(model, {f"e{k}": perturbed(model, seed=k) for k in range(3)}, dtype="float32")
    meta = meta_model(str(tmp_path), "transformers.LlamaForCausalLM")
    for rank in (2, 20):  # 20: some matrices (32 x 32, 16 x 32) keep fewer floats dense than as factors
        merged = MergedModel(pool, granularity="layer", storage="lowrank", rank=rank)
        plan = memory_plan(meta, 3, tau_dtype="float32", storage="lowrank", rank=rank)
        assert plan["device/task_vectors"] == held_bytes(merged)
        assert plan["low_rank_tensors"] == len(merged.low_rank_u)
    dense = memory_plan(meta, 3, tau_dtype="float32")["device/task_vectors"]
    # energy alone: the rank depends on the weights, so the plan counts full rank (dense), an upper bound
    energy = memory_plan(meta, 3, tau_dtype="float32", storage="lowrank", energy=0.5)["device/task_vectors"]
    merged = MergedModel(pool, granularity="layer", storage="lowrank", energy=0.5)
    assert energy == dense and held_bytes(merged) < energy


def test_estimate_lowrank_command_says_when_it_is_an_upper_bound(tmp_path, capsys):
    from adamerge.estimate import main

    tiny_llama_config().save_pretrained(tmp_path)
    main([str(tmp_path), "--experts", "4", "--storage", "lowrank", "--rank", "4"])
    out = capsys.readouterr().out
    assert "lowrank, rank=4" in out and "low rank:" in out and "UPPER BOUND" not in out
    main([str(tmp_path), "--experts", "4", "--storage", "lowrank", "--energy", "0.9"])
    assert "UPPER BOUND" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--storage", "lowrank"], "--storage lowrank needs --rank R and/or --energy E"),
        (["--storage", "lowrank", "--energy", "1.5"], "energy must be in (0, 1]"),
        (["--rank", "4"], "--rank and --energy apply to --storage lowrank only"),
    ],
)
def test_estimate_rejects_bad_lowrank_options(tmp_path, capsys, argv, message):
    from adamerge.estimate import main

    tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--experts", "2", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_estimate_of_a_missing_model_is_one_line_naming_it(tmp_path, capsys):
    from adamerge.estimate import main

    missing = tmp_path / "no" / "such-model"
    with pytest.raises(SystemExit) as exit_:
        main([str(missing), "--experts", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{missing} is neither a local folder nor a reachable hub id" in err

    with pytest.raises(SystemExit):
        main([str(tmp_path), "--experts", "2"])  # a folder without a config
    assert f"{tmp_path}: cannot read a model config there" in capsys.readouterr().err


def test_statistics_plan_counts_the_grams_and_fishers(tmp_path):
    from adamerge.estimate import statistics_plan

    tiny_llama_config(tie_word_embeddings=False).save_pretrained(tmp_path)
    meta = meta_model(str(tmp_path), "transformers.LlamaForCausalLM")
    # per layer: q, k, v, o, gate, up read 32 features, down_proj 64; lm_head 32; K=3 experts, fp32
    layer = 6 * 32 * 32 + 64 * 64
    regmean = statistics_plan(meta, 3, "regmean")
    assert regmean["statistics/total"] == regmean["statistics/peak"] == 3 * 4 * (2 * layer + 32 * 32)
    staged = statistics_plan(meta, 3, "regmean_pp")
    assert staged["statistics/total"] == regmean["statistics/total"] and staged["statistics/peak"] == 3 * 4 * layer
    fisher = statistics_plan(meta, 3, "fisher")
    assert fisher["statistics/peak"] == 3 * 4 * sum(p.numel() for p in meta.parameters())


def test_a_7b_llama_down_proj_gram_is_11008_squared_floats_per_expert():
    from transformers import LlamaConfig

    from adamerge.estimate import statistics_plan

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    only_down = statistics_plan(model, 2, "regmean_pp", include=["*down_proj.weight"])
    assert only_down["statistics/peak"] == 2 * 11008**2 * 4
