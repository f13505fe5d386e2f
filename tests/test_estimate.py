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
