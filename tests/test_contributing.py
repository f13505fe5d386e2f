"""CONTRIBUTING.md's "Adding a method" example runs as written: its file registers a method, its YAML builds it, its
test passes, and the merge goes through the registry like any shipped method."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adamerge.methods.registry import REGISTRY, Run, build_method

DOC = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def example_files() -> dict[str, str]:
    """path -> text of every code block of the guide whose first line is ``# file: <path>``."""
    blocks = re.findall(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    return {path: text for path, text in blocks}


@pytest.fixture
def example(tmp_path, monkeypatch):
    files = example_files()
    assert set(files) == {
        "adamerge/methods/example_median.py",
        "conf/method/example_median.yaml",
        "tests/test_example_median.py",
    }
    assert "example_median" not in REGISTRY  # the example's name must never be a shipped method's
    source = tmp_path / "example_median.py"
    source.write_text(files["adamerge/methods/example_median.py"])
    spec = importlib.util.spec_from_file_location("adamerge.methods.example_median", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "adamerge.methods.example_median", module)
    spec.loader.exec_module(module)  # registers "example_median"
    yield module, files
    REGISTRY.pop("example_median", None)


def test_the_guide_example_registers_builds_merges_and_its_test_passes(example):
    from adamerge.testbeds.tiny import tiny_pool

    module, files = example
    assert REGISTRY["example_median"].kind == "static" and REGISTRY["example_median"].factory is module.MedianMerge
    method = build_method(OmegaConf.create(files["conf/method/example_median.yaml"]))
    pool = tiny_pool(num_tasks=2)
    result = method.merge(Run(None, pool, None))
    base = pool.base_tensors()
    for name, tau in pool.task_vectors.items():
        # two experts: the median is their mean
        torch.testing.assert_close(result.params[name], base[name] + tau.mean(0))
    namespace = {}
    exec(compile(files["tests/test_example_median.py"], "test_example_median.py", "exec"), namespace)
    namespace["test_median_merge_ignores_the_one_expert_that_moves_an_entry_far"]()
