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
def breadcrumbs(tmp_path, monkeypatch):
    files = example_files()
    assert set(files) == {
        "adamerge/methods/breadcrumbs.py",
        "conf/method/breadcrumbs.yaml",
        "tests/test_breadcrumbs.py",
    }
    source = tmp_path / "breadcrumbs.py"
    source.write_text(files["adamerge/methods/breadcrumbs.py"])
    spec = importlib.util.spec_from_file_location("adamerge.methods.breadcrumbs", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "adamerge.methods.breadcrumbs", module)
    spec.loader.exec_module(module)  # registers "breadcrumbs"
    yield module, files
    REGISTRY.pop("breadcrumbs", None)


def test_the_guide_example_registers_builds_merges_and_its_test_passes(breadcrumbs):
    from adamerge.testbeds.tiny import tiny_pool

    module, files = breadcrumbs
    assert REGISTRY["breadcrumbs"].kind == "static" and REGISTRY["breadcrumbs"].factory is module.Breadcrumbs
    method = build_method(OmegaConf.create(files["conf/method/breadcrumbs.yaml"]))
    pool = tiny_pool(num_tasks=2)
    result = method.merge(Run(None, pool, None))
    base = pool.base_tensors()
    for name, tau in pool.task_vectors.items():
        torch.testing.assert_close(result.params[name], base[name] + module.breadcrumbs(tau, 0.9, 0.01, 0.3))
    namespace = {}
    exec(compile(files["tests/test_breadcrumbs.py"], "test_breadcrumbs.py", "exec"), namespace)
    namespace["test_breadcrumbs_drops_the_outlier_and_the_small_entries"]()
