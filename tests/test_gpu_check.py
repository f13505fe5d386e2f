"""scripts/gpu_check.py: its --smoke run (the GPU check's code path on the CPU, tiny Llama, K=2) prints one JSON line
with finite, positive figures per storage; its memory gate skips 8 x 7B resident on an H200 and lets streamed run."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
GIB = 2**30


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_one_json_line_with_every_entry(gpu_check, capsys):
    gpu_check.main(["--smoke"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["experts"] == 2 and result["precision"] == "bf16-mixed"
    entries = {(e["method"], e["storage"]): e for e in result["entries"]}
    assert set(entries) == {("adamerge", "resident"), ("adamerge", "streamed"), ("fusionbench", "resident")}
    for storage in ("resident", "streamed"):
        entry = entries["adamerge", storage]
        assert entry["status"] == "ok" and entry["size"] == "tiny" and entry["mode"] == "split"
        for key in ("step_s", "limit_s", "vs_limit", "peak_gib", "plan_gib"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (storage, key, entry[key])
        assert entry["vs_limit"] == pytest.approx(entry["step_s"] / entry["limit_s"])
    resident, streamed = entries["adamerge", "resident"], entries["adamerge", "streamed"]
    # The plan is adamerge estimate's: K bf16 task vectors on the device when resident, in host memory when streamed.
    tau_gib = 2 * resident["parameters"] * 2 / GIB
    assert resident["plan_gib"] - streamed["plan_gib"] == pytest.approx(tau_gib)
    assert streamed["plan_host_gib"] == pytest.approx(tau_gib) and resident["plan_host_gib"] == 0
    assert entries["fusionbench", "resident"]["status"] in ("ok", "not installed")
    assert set(result["limits"]["tiny"]) == {"concat", "separate"}


def test_memory_gate_skips_7b_x_8_resident_on_an_h200_and_lets_streamed_run(gpu_check):
    from adamerge.estimate import memory_plan
    from adamerge.testbeds.random_llama import random_llama

    meta = random_llama("7b", "meta")
    plans = {s: memory_plan(meta, 8, "bfloat16", "bfloat16", s) for s in ("resident", "streamed")}
    h200, host = 139.5 * GIB, 120 * GIB
    reason = gpu_check.fit_reason(plans["resident"], 3 * GIB, h200, host, "resident")
    assert reason.startswith("does not fit: plan 138.1 GiB + activations 3.0 GiB")
    assert gpu_check.fit_reason(plans["streamed"], 3 * GIB, h200, host, "streamed") is None
    small_host = gpu_check.fit_reason(plans["streamed"], 3 * GIB, h200, 64 * GIB, "streamed")
    assert small_host.startswith("does not fit host memory: task vectors 100.4 GiB")


def test_noise_experts_are_the_same_for_adamerge_and_fusionbench():
    from adamerge.testbeds.random_llama import noise_row, noise_task_vectors, random_llama

    model = random_llama("tiny", dtype=torch.bfloat16)
    stacks = noise_task_vectors(model, 2, seed=3, device="cpu")
    for index, (name, theta) in enumerate(model.named_parameters()):
        torch.testing.assert_close(stacks[name][1], noise_row(theta, index, 1, seed=3), rtol=0, atol=0)
    assert not torch.equal(stacks[name][0], stacks[name][1])
    flat = torch.empty(2 * sum(p.numel() for p in model.parameters()), dtype=torch.bfloat16)
    views = noise_task_vectors(model, 2, seed=3, out=flat)  # streamed: views of one buffer, page-locked at once
    assert all(torch.equal(views[n], stacks[n]) for n in stacks)
    assert sum(v.numel() for v in views.values()) == flat.numel()
