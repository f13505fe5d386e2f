"""The method registry: typed, checked method configs; per-method experiment knobs; `adamerge methods`."""

import subprocess
import sys

import pytest
import torch

from adamerge.methods.registry import REGISTRY, ConfigError, build_method, methods
from adamerge.pipeline import run
from tests.test_config import make_cfg


def test_registry_lists_every_kind_with_paper_and_needs():
    specs = methods()
    assert {s.kind for s in specs} == {"static", "learned"}
    for spec in specs:
        assert spec.paper.startswith("https://arxiv.org/abs/") and spec.description, spec.name
    assert REGISTRY["adamerging_pp"].needs.dense and not REGISTRY["adamerging"].needs.dense
    assert REGISTRY["expert_merging"].needs.expert_outputs and REGISTRY["ties"].needs.calibration is False


def test_misspelled_inapplicable_or_mistyped_keys_name_the_key_and_the_method():
    with pytest.raises(ConfigError, match=r"method\.granularty is not an option of method 'adamerging'"):
        build_method(make_cfg("+method.granularty=layer").method)
    with pytest.raises(ConfigError, match=r"method\.density does not apply to 'task_arithmetic'"):
        build_method(make_cfg("method=task_arithmetic", "+method.density=0.2").method)
    with pytest.raises(ConfigError, match=r"method\.steps='many' has the wrong type for method 'adamerging'"):
        build_method(make_cfg("method.steps=many").method)
    with pytest.raises(ConfigError, match=r"method\.init must hold finite numbers"):
        build_method(make_cfg("method.init=nan").method)
    with pytest.raises(ConfigError, match=r"method\.backward='sideways' is not one of"):
        build_method(make_cfg("method=expert_merging", "method.backward=sideways").method)
    with pytest.raises(ConfigError, match=r"unknown method 'tiez'"):
        build_method({"name": "tiez"})


def test_learned_methods_share_one_schema():
    """Every learned preset carries every shared option, so any of them can be overridden without a `+`."""
    em = build_method(make_cfg("method=expert_merging", "method.compile=true").method)
    ada = build_method(make_cfg("method=adamerging").method)
    assert em.compile is True
    shared = set(vars(ada)) - {"transform", "name"}
    for spec in methods():
        if spec.kind == "learned":
            assert shared <= set(make_cfg(f"method={spec.name}").method), spec.name


def test_an_experiment_tunes_each_method_by_name():
    """experiment=minilm_text used to set lr 1e-2 for whatever method was chosen (expert_merging's preset is 0.05)."""
    assert make_cfg("experiment=minilm_text", "method=expert_merging").method.optimizer.lr == 5e-2
    assert make_cfg("experiment=minilm_text", "method=adamerging").method.optimizer.lr == 1e-2
    assert make_cfg("experiment=minilm_text", "method=adamerging_task").method.optimizer.lr == 1e-2
    assert make_cfg("experiment=tiny", "method=expert_merging").method.steps == 100
    assert "steps" not in make_cfg("experiment=tiny", "method=ties").method  # a static method gets no learned knob
    # the command line still wins over the experiment's tuning
    assert make_cfg("experiment=tiny", "method.optimizer.lr=0.5").method.optimizer.lr == 0.5


def test_a_bad_method_config_fails_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the pool was loaded before the config was checked")

    monkeypatch.setattr("adamerge.testbeds.tiny.build", no_work)
    cfg = make_cfg("experiment=tiny", "method.granularity=tensor", f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"method\.granularity='tensor' is not one of"):
        run(cfg)


def test_a_dense_method_on_lora_experts_is_refused_before_loading(tmp_path):
    cfg = make_cfg(
        "experts=lora", "experts.base=/nonexistent/base", "+experts.experts={a: /nonexistent/a}", "method=ties"
    )
    with pytest.raises(ConfigError, match=r"method 'ties' needs dense task vectors.*experts=hf"):
        run(cfg)


def test_static_merge_through_the_registry_equals_the_kernel(tmp_path):
    from adamerge.methods.kernels import task_arithmetic
    from adamerge.methods.registry import Run
    from adamerge.testbeds.tiny import tiny_pool

    pool = tiny_pool(num_tasks=2)
    result = build_method({"name": "task_arithmetic", "weights": 0.3}).merge(Run(None, pool, None))
    base = pool.base_tensors()
    for name, tau in pool.task_vectors.items():
        torch.testing.assert_close(result.params[name], base[name] + task_arithmetic(tau, 0.3))
    assert result.record == {"method": "task_arithmetic", "options": {"weights": 0.3}} and result.coefficients is None


def test_methods_subcommand_lists_the_registry():
    out = subprocess.run(
        [sys.executable, "-m", "adamerge.cli", "methods"], capture_output=True, text=True, check=True
    ).stdout
    for spec in methods():
        assert spec.name in out and spec.paper in out and spec.description in out
    usage = subprocess.run([sys.executable, "-m", "adamerge.cli", "--help"], capture_output=True, text=True).stdout
    assert usage.startswith("usage: adamerge") and "adamerge methods" in usage and "adamerge estimate" in usage
