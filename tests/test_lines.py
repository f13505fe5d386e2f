"""LiNeS: block depth from the project's block naming, the layer-increasing scaling worked by hand, beta=0 as a uniform
scaling, the paper's norm rule for alpha, the per-task transform, and the CLI's pipeline."""

import math

import pytest
import torch

from adamerge.methods import kernels
from adamerge.methods.lines import block_index, layer_scalings
from adamerge.methods.registry import ConfigError, Run, build_method
from adamerge.pipeline import run
from adamerge.testbeds.tiny import tiny_pool
from tests.test_config import make_cfg


@pytest.fixture(scope="module")
def pool():
    return tiny_pool(num_tasks=3)  # the experiment=tiny pool (cached per process)


def test_block_index_follows_the_project_block_naming():
    assert block_index("bert.encoder.layer.3.attention.self.query.weight") == 3
    assert block_index("model.layers.10.mlp.up_proj.weight") == 10
    assert block_index("transformer.h.2.attn.c_attn.weight") == 2
    assert block_index("visual.blocks.0.norm1.weight") == 0
    assert block_index("bert.embeddings.word_embeddings.weight") is None
    assert block_index("bert.pooler.dense.weight") is None


def test_layer_scalings_by_hand():
    names = ["emb", "enc.layer.0.w", "enc.layer.1.w", "enc.layer.1.b", "enc.layer.2.w", "pooler.w"]
    # L = 3 blocks: lambda_l = 0.2 + 0.6 * l / 2 -> 0.2, 0.5, 0.8; outside blocks: alpha
    assert layer_scalings(names, alpha=0.2, beta=0.6) == pytest.approx(
        {
            "emb": 0.2,
            "enc.layer.0.w": 0.2,
            "enc.layer.1.w": 0.5,
            "enc.layer.1.b": 0.5,
            "enc.layer.2.w": 0.8,
            "pooler.w": 0.2,
        }
    )
    assert layer_scalings(["h.5.w", "head"], alpha=0.3, beta=1.0) == {"h.5.w": 0.3, "head": 0.3}  # L = 1: alpha


def test_beta_zero_is_a_uniform_scaling(pool):
    result = build_method({"name": "lines", "alpha": 0.25, "beta": 0.0}).merge(Run(None, pool, None))
    base = pool.base_tensors()
    for name, tau in pool.task_vectors.items():
        torch.testing.assert_close(result.params[name], base[name] + kernels.task_arithmetic(tau, 0.25))


def test_the_tiny_bert_blocks_scale_by_depth(pool):
    # tiny BERT: layer.0 and layer.1 (L = 2) -> alpha and alpha + beta; embeddings and pooler -> alpha
    result = build_method({"name": "lines", "alpha": 0.1, "beta": 0.5}).merge(Run(None, pool, None))
    base = pool.base_tensors()
    scale = {"embeddings": 0.1, "layer.0.": 0.1, "layer.1.": 0.6, "pooler": 0.1}
    for name, tau in pool.task_vectors.items():
        lam = next(v for k, v in scale.items() if k in name)
        torch.testing.assert_close(result.params[name], base[name] + lam * tau.sum(0))


def test_the_norm_rule_gives_one_over_t_over_task_arithmetic(pool):
    # alpha = ||sum tau||_1 / (T ||sum tau||_1) = 1/T: with beta = 0, LiNeS over task arithmetic is weight averaging
    result = build_method({"name": "lines", "alpha": None, "beta": 0.0}).merge(Run(None, pool, None))
    assert result.record["options"]["alpha_used"] == pytest.approx(1 / 3)
    base = pool.base_tensors()
    for name, tau in pool.task_vectors.items():
        torch.testing.assert_close(result.params[name], base[name] + tau.mean(0))
    over_ties = build_method({"name": "lines", "beta": 0.0, "base_merge": "ties"}).merge(Run(None, pool, None))
    summed = sum(float(tau.sum(0).abs().sum()) for tau in pool.task_vectors.values())
    merged = sum(float(kernels.ties(tau).abs().sum()) for tau in pool.task_vectors.values())
    assert over_ties.record["options"]["alpha_used"] == pytest.approx(summed / (3 * merged))


@pytest.mark.parametrize("base_merge", ["task_arithmetic", "ties"])
def test_transform_rows_are_depth_scaled_and_sum_to_the_merge(pool, base_merge):
    method = build_method({"name": "lines", "alpha": 0.1, "beta": 0.5, "base_merge": base_merge})
    merged = method.merge(Run(None, pool, None)).params
    rows = method.transform(Run(None, pool, None)).task_vectors
    base = pool.base_tensors()
    for name, stack in rows.items():
        torch.testing.assert_close(base[name] + stack.sum(0), merged[name])
        if base_merge == "task_arithmetic":
            lam = 0.6 if "layer.1." in name else 0.1
            torch.testing.assert_close(stack, lam * pool.task_vectors[name])


def test_bad_options_fail_naming_the_key():
    with pytest.raises(ConfigError, match="method.base_merge"):
        build_method({"name": "lines", "base_merge": "dare"})
    with pytest.raises(ConfigError, match="method.alpha"):
        build_method({"name": "lines", "alpha": -1.0})


def test_lines_runs_through_the_pipeline_on_tiny(tmp_path):
    result = run(make_cfg("method=lines", "experiment=tiny", f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    assert math.isfinite(rows["lines"]["avg_normalized"])
    assert rows["lines"]["avg_normalized"] >= rows["base + heads (floor)"]["avg_normalized"]


def test_lines_runs_through_the_pipeline_on_tiny_lm(tmp_path):
    result = run(make_cfg("method=lines", "experiment=tiny_lm", f"paths.output_dir={tmp_path}", "~logger"))
    rows = {row["method"]: row for row in result["table"]}
    assert rows["lines"]["avg_normalized"] > rows["base + heads (floor)"]["avg_normalized"]


@pytest.mark.slow
def test_adamerging_learns_over_lines(tmp_path):
    overrides = ["method=adamerging", "method.transform=lines", "method.steps=3", "experiment=tiny"]
    result = run(make_cfg(*overrides, f"paths.output_dir={tmp_path}", "~logger"))
    assert math.isfinite({row["method"]: row for row in result["table"]}["adamerging"]["avg_normalized"])
