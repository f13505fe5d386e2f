"""Out-of-core static merges (``adamerge merge-files``): tensor by tensor from safetensors, equal to the in-memory
kernels, sharded output that transformers loads, and clear errors for what cannot be merged that way."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from adamerge.core.weight_files import PoolError
from adamerge.methods.file_merge import main, merge_files
from adamerge.methods.kernels import task_arithmetic, ties
from adamerge.methods.registry import build_method
from adamerge.testbeds.tiny_lm import tiny_llama_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama base and two experts (base + noise), saved as Hugging Face safetensors folders."""
    root = tmp_path_factory.mktemp("file_merge")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(root / "base")
    for k in range(2):
        expert = LlamaForCausalLM(tiny_llama_config())
        state = {n: t + 0.01 * torch.randn_like(t) for n, t in base.state_dict().items()}
        expert.load_state_dict(state)
        expert.save_pretrained(root / f"e{k}")
    return root


def stacks(root):
    base = load_file(root / "base" / "model.safetensors")
    experts = [load_file(root / f"e{k}" / "model.safetensors") for k in range(2)]
    return base, {n: torch.stack([e[n] - base[n] for e in experts]) for n in base}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_a_file_merge_equals_the_kernel_on_every_tensor(folders, tmp_path, method):
    options = {"ties": {"density": 0.2, "weights": 1.0}, "task_arithmetic": {"weights": 0.3}}[method]
    merge = build_method({"name": method, **options}).tensor_merge()
    experts = {"a": folders / "e0", "b": folders / "e1"}
    out = merge_files(folders / "base", experts, merge, tmp_path / "merged")
    merged = load_file(out / "model.safetensors")
    base, taus = stacks(folders)
    kernel = {"ties": lambda t: ties(t, 0.2, 1.0), "task_arithmetic": lambda t: task_arithmetic(t, 0.3)}[method]
    assert merged.keys() == base.keys()
    for name, tau in taus.items():
        torch.testing.assert_close(merged[name], base[name] + kernel(tau), rtol=0, atol=1e-6)
    assert (out / "config.json").exists()


def test_small_shards_are_indexed_and_load_in_transformers(folders, tmp_path):
    merge = build_method({"name": "task_arithmetic", "weights": 0.5}).tensor_merge()
    out = merge_files(folders / "base", {"a": folders / "e0"}, merge, tmp_path / "m", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 2
    model = AutoModelForCausalLM.from_pretrained(out)
    base, taus = stacks(folders)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], base[name] + 0.5 * taus[name][0], rtol=0, atol=1e-6)


def test_what_cannot_be_merged_tensor_by_tensor_is_refused_with_its_reason(folders, tmp_path):
    merge = build_method({"name": "average"}).tensor_merge()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PoolError, match=r"expert 'bin'.*holds torch weights.*safetensors"):
        merge_files(folders / "base", {"bin": tmp_path}, merge, tmp_path / "out")
    small = LlamaForCausalLM(tiny_llama_config(num_layers=1))
    small.save_pretrained(tmp_path / "one_layer")
    with pytest.raises(PoolError, match=r"expert 'short' lacks .* of the base's tensors"):
        merge_files(folders / "base", {"short": tmp_path / "one_layer"}, merge, tmp_path / "out")
    wide = LlamaForCausalLM(tiny_llama_config(vocab_size=tiny_llama_config().vocab_size + 2))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(PoolError, match=r"expert 'wide': tensor 'lm_head.weight' has shape \[68, 32\]"):
        merge_files(folders / "base", {"wide": tmp_path / "wide"}, merge, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(SystemExit, match=r"method 'doge' does not merge tensor by tensor.*adamerge method=doge"):
        main(["doge", "--base", str(folders / "base"), "--expert", f"a={folders / 'e0'}", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"in merge-files --set \(ties\): method.density=2.0 must be in"):
        main(
            [
                "ties",
                "--base",
                str(folders / "base"),
                "--expert",
                f"a={folders / 'e0'}",
                "--out",
                "o",
                "--set",
                "density=2.0",
            ]
        )


def test_the_command_line(folders, tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "adamerge.cli", "merge-files", "ties", "--base", str(folders / "base")]
    command += ["--expert", f"a={folders / 'e0'}", "--expert", f"b={folders / 'e1'}", "--out", str(out)]
    done = subprocess.run([*command, "--set", "density=0.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    base, taus = stacks(folders)
    merged = load_file(out / "model.safetensors")
    for name, tau in taus.items():
        torch.testing.assert_close(merged[name], base[name] + ties(tau, 0.5, 1.0), rtol=0, atol=1e-6)
