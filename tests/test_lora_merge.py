"""LoRA-native merging against the dense reference: the same adapters densified by ``make_pool`` + ``MergedModel``."""

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from adamerge.cli import config_dir
from adamerge.core.adapters import AdapterError
from adamerge.core.export import export_merged, load_merged
from adamerge.core.lora_merged import LoraMergedModel, LoraParams
from adamerge.core.lora_pool import LoraPool, make_lora_pool
from adamerge.core.merged import MergedModel
from adamerge.core.merged_base import two_stage_backward
from adamerge.core.pool import make_pool
from adamerge.engine.module import MergeModule
from adamerge.objectives.entropy import entropy_objective
from tests.conftest import tiny_bert_config

# Different targets, ranks, alphas and rsLoRA per expert; task2 adapts `value` at rank 5 (rank_pattern), has no head.
LORA_CONFIGS = {
    "task0": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "task1": dict(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["query", "key", "intermediate.dense"],
        modules_to_save=["classifier"],
    ),
    "task2": dict(r=3, lora_alpha=3, target_modules=["value", "output.dense"], rank_pattern={"value": 5}),
}


def save_adapter(path, base, seed, **config):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # random heads, so that each task reads the merge differently
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def adapters(tmp_path, base_model):
    return {
        name: save_adapter(tmp_path / name, base_model, k + 1, **c) for k, (name, c) in enumerate(LORA_CONFIGS.items())
    }


def lora_and_dense(base, adapters, granularity, seed=0):
    """The LoRA-native model and the dense one from the same adapters, with the same random coefficients."""
    lora = LoraMergedModel(make_lora_pool(copy.deepcopy(base), adapters), granularity=granularity, clamp=None)
    dense = MergedModel(make_pool(copy.deepcopy(base), adapters), granularity=granularity, clamp=None)
    lam = torch.rand(lora.coefficients.raw.shape, generator=torch.Generator().manual_seed(seed)) + 0.2
    lora.coefficients.assign(lam)
    # Dense columns the adapters do not touch (zero task vectors) get arbitrary values: they cannot matter.
    dense_lam = torch.full(dense.coefficients.raw.shape, 0.7)
    for j, group in enumerate(dense.group_names):
        if group in lora.group_names:
            dense_lam[:, j] = lam[:, lora.group_names.index(group)]
    dense.coefficients.assign(dense_lam)
    return lora, dense


def logits(model, batch, **kw):
    return model(**batch, **kw).logits


@pytest.mark.parametrize("granularity", ["task", "layer", "block"])
def test_composition_equals_dense_merge(granularity, base_model, adapters, batch):
    lora, dense = lora_and_dense(base_model, adapters, granularity)
    assert lora.experts == dense.experts == ["task0", "task1", "task2"]
    if granularity == "layer":  # one column per adapted module, named like the dense model's tensors
        assert "bert.encoder.layer.1.intermediate.dense.weight" in lora.group_names
        assert not any("embeddings" in g or "LayerNorm" in g for g in lora.group_names)
    with torch.no_grad():
        for task in [None, *lora.experts]:
            torch.testing.assert_close(
                logits(lora, batch, task=task), logits(dense, batch, task=task), atol=1e-5, rtol=0
            )
        # constant tables, as evaluate's reference rows use them
        for value in (0.0, 0.3):
            torch.testing.assert_close(
                logits(lora, batch, task="task0", params=lora.constant_params(value)),
                logits(dense, batch, task="task0", params=dense.constant_params(value)),
                atol=1e-5,
                rtol=0,
            )
    # the hooks are gone after each forward: the base is a plain model again
    assert not any(m._forward_hooks for m in lora.model.modules())


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradients_equal_dense_gradients(granularity, base_model, adapters, batch):
    lora, dense = lora_and_dense(base_model, adapters, granularity, seed=1)
    for model in (lora, dense):
        sum(logits(model, batch, task=t).logsumexp(-1).mean() for t in model.experts).backward()
    grad = lora.coefficients.raw.grad
    # an expert has a gradient exactly in the columns of the modules it adapts
    adapts = torch.zeros_like(grad, dtype=torch.bool)
    for stack, cols in zip(lora.stacks, lora.layout):
        adapts[stack.expert.unique(), cols[0]] = True
    assert torch.equal(grad != 0, adapts)
    columns = [dense.group_names.index(g) for g in lora.group_names]
    torch.testing.assert_close(grad, dense.coefficients.raw.grad[:, columns], atol=1e-5, rtol=1e-4)


def test_split_backward_equals_joint(base_model, adapters, batch):
    lora, _ = lora_and_dense(base_model, adapters, "block")

    def run(params):
        for task in lora.experts:
            yield logits(lora, batch, task=task, params=params).logsumexp(-1).mean()

    sum(run(lora.merged_tensors())).backward()
    joint = lora.coefficients.raw.grad.clone()
    lora.coefficients.raw.grad = None
    two_stage_backward(lora, run)
    torch.testing.assert_close(lora.coefficients.raw.grad, joint, atol=1e-6, rtol=1e-5)


def test_exported_peft_adapter_reproduces_the_merge(tmp_path, base_model, adapters, batch):
    lora, _ = lora_and_dense(base_model, adapters, "layer", seed=2)
    lora.export_peft_adapter(tmp_path / "merged_adapter", task="task1")
    assert LoraConfig.from_pretrained(tmp_path / "merged_adapter").modules_to_save == ["classifier"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "merged_adapter").eval()
    # ranks concatenate per module (value: task0's 4 + task2's 5, query: 4 + 2) and PEFT's scale is 1
    attention = peft_model.base_model.model.bert.encoder.layer[0].attention.self
    assert attention.value.lora_A["default"].weight.shape[0] == 9 and attention.query.r["default"] == 6
    assert attention.value.scaling["default"] == attention.query.scaling["default"] == 1.0
    with torch.no_grad():
        expected = logits(lora, batch, task="task1")
        torch.testing.assert_close(logits(peft_model, batch), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(peft_model.merge_and_unload(), batch), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_equals_forward_and_export_works(tmp_path, base_model, adapters, batch):
    lora, dense = lora_and_dense(base_model, adapters, "block", seed=3)
    base_before = {n: t.clone() for n, t in lora.model.state_dict().items()}
    plain = lora.merge_and_unload(task="task2")
    assert type(plain) is BertForSequenceClassification and not any(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, batch), logits(lora, batch, task="task2"), atol=1e-5, rtol=0)
        for name, value in dense.merge_and_unload().state_dict().items():  # same dense weights as the dense merge
            torch.testing.assert_close(lora.merge_and_unload().state_dict()[name], value, atol=1e-6, rtol=0)
    for name, value in lora.model.state_dict().items():
        assert torch.equal(value, base_before[name]), name
    # export.py works unchanged
    export_merged(lora, tmp_path / "out")
    reloaded = load_merged(tmp_path / "out", "task0", "transformers.AutoModelForSequenceClassification").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, batch), logits(lora, batch, task="task0"), atol=1e-5, rtol=0)


def test_gpt2_fan_in_fan_out_adapters(tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)).eval()
    adapters = {
        "a": save_adapter(tmp_path / "a", base, 1, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        "b": save_adapter(
            tmp_path / "b", base, 2, r=3, lora_alpha=3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        ),
    }
    lora, dense = lora_and_dense(base, adapters, "layer")
    assert all(stack.transposed for stack in lora.stacks)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(lora.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        lora.export_peft_adapter(tmp_path / "merged")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged").eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_merge_module_trains_the_coefficients(base_model, adapters):
    """MergeModule unchanged, in its default mode (auto; split == joint and concat == split are checked here)."""
    lora = LoraMergedModel(make_lora_pool(base_model, adapters), granularity="layer", init=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            task: {
                "input_ids": torch.randint(1, 40, (8,), generator=g),
                "attention_mask": torch.ones(8, dtype=torch.long),
            }
            for task in lora.experts
        }
        for _ in range(32)
    ]
    loader = DataLoader(batches, batch_size=4)

    def total_entropy():
        with torch.no_grad():
            batch = next(iter(loader))
            return sum(entropy_objective(lora(**inputs, task=task), task, inputs) for task, inputs in batch.items())

    before_lam, before = lora.coefficients().detach().clone(), total_entropy()
    module = MergeModule(lora, entropy_objective, lambda params: torch.optim.Adam(params, lr=0.05))
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, train_dataloaders=loader)
    assert not torch.equal(lora.coefficients().detach(), before_lam)
    assert total_entropy() < before


def test_config_instantiates_a_lora_pool(tmp_path, base_model, adapters):
    base_model.save_pretrained(tmp_path / "base")
    cfg = OmegaConf.load(f"{config_dir()}/experts/lora.yaml")
    cfg.base, cfg.experts = str(tmp_path / "base"), adapters
    pool = instantiate(cfg)
    assert isinstance(pool, LoraPool) and pool.experts == ["task0", "task1", "task2"]
    assert set(pool.heads["task0"]) == {"classifier.weight", "classifier.bias"} and pool.heads["task2"] == {}


def test_errors_name_the_expert_and_the_fix(tmp_path, base_model, adapters, expert_states):
    other = BertForSequenceClassification(tiny_bert_config(hidden_size=8, intermediate_size=12)).eval()
    wrong = save_adapter(tmp_path / "wrong", other, 0, r=2, target_modules=["query"])
    with pytest.raises(AdapterError, match=r"expert 'wrong'.*query\.weight.*another base.*experts\.base"):
        make_lora_pool(base_model, {"task0": adapters["task0"], "wrong": wrong})
    bias = save_adapter(tmp_path / "bias", base_model, 0, r=2, target_modules=["query"], bias="all")
    with pytest.raises(AdapterError, match=r"expert 'b'.*besides LoRA factors.*experts\.head_patterns"):
        make_lora_pool(base_model, {"b": bias})
    base_model.save_pretrained(tmp_path / "dense")
    with pytest.raises(AdapterError, match="expert 'd'.*not a PEFT adapter folder.*experts=hf"):
        make_lora_pool(base_model, {"d": str(tmp_path / "dense")})
    pool = make_lora_pool(base_model, adapters)
    with pytest.raises(ValueError, match="method.granularity"):
        LoraMergedModel(pool, granularity="chunk")
    lora = LoraMergedModel(pool, granularity="task")
    with pytest.raises(TypeError, match="runs on LoraParams.*dense MergedModel"):
        lora(input_ids=torch.ones(1, 4, dtype=torch.long), params=dict(base_model.named_parameters()))
    with pytest.raises(ValueError, match=r"shape \(3, 2\), expected \(3, 1\)"):
        lora(input_ids=torch.ones(1, 4, dtype=torch.long), params=LoraParams(torch.zeros(3, 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(base_model, adapters, batch):
    cpu = LoraMergedModel(make_lora_pool(copy.deepcopy(base_model), adapters), granularity="layer", init=0.4)
    gpu = LoraMergedModel(
        make_lora_pool(copy.deepcopy(base_model), adapters, device="cuda"), granularity="layer", init=0.4
    )
    gpu.coefficients.cuda()
    with torch.no_grad():
        out = logits(gpu, {k: v.cuda() for k, v in batch.items()}, task="task1").cpu()
        torch.testing.assert_close(out, logits(cpu, batch, task="task1"), atol=1e-4, rtol=1e-4)


def test_concat_backward_equals_split(base_model, adapters, batch):
    """One forward over the task batches concatenated: the low-rank hooks and the per-task heads compose."""
    from adamerge.engine.concat import concatenable
    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective

    lora, _ = lora_and_dense(base_model, adapters, "block")
    module = MergeModule(lora, entropy_objective, torch.optim.SGD)
    module.manual_backward = lambda loss: loss.backward()  # no Trainer attached
    tasks = {task: dict(batch) for task in lora.experts}
    assert concatenable(tasks)
    grads = {}
    for mode in ("split", "concat"):
        lora.coefficients.raw.grad = None
        module.backward_step(tasks, mode)
        grads[mode] = lora.coefficients.raw.grad.clone()
    assert grads["split"].abs().max() > 0
    torch.testing.assert_close(grads["concat"], grads["split"], atol=1e-6, rtol=1e-5)


def test_export_writes_the_dense_model_and_the_exact_peft_adapter(tmp_path, base_model, adapters, batch):
    """What the pipeline's export gives for experts=lora: merged/model/ and merged/adapter/ (the same merge)."""
    lora, _ = lora_and_dense(base_model, adapters, "layer", seed=2)
    lora.export(tmp_path / "merged")
    dense = BertForSequenceClassification.from_pretrained(tmp_path / "merged" / "model").eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "merged" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            dense.bert(**batch).last_hidden_state,
            peft_model.base_model.model.bert(**batch).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )
