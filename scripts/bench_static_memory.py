"""Peak host memory (and wall time) of an out-of-core static TIES merge: ``adamerge merge-files`` against
mergekit's ``mergekit-yaml`` on the same safetensors experts.

    python scripts/bench_static_memory.py --mergekit /path/to/mergekit-venv/bin/mergekit-yaml

Builds a SmolLM2-135M-shaped Llama (random weights: memory and time do not need real ones), K experts as the base
plus noise, all saved in bf16 as Hugging Face folders; then runs each merger in its own process under
``/usr/bin/time -v`` (peak RSS) and compares the two merged models tensor by tensor. mergekit lives in its own venv
(LGPL; it is run, never imported). Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamerge.testbeds.random_llama import LLAMA_SHAPES

SMOLLM2_135M = LLAMA_SHAPES["smollm2-135m"] | {"max_position_embeddings": 2048}


def build_models(root: Path, experts: int, scale: float, layers: int | None, dtype: str) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(SMOLLM2_135M | ({"num_hidden_layers": layers} if layers else {})))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(getattr(torch, dtype))
    base.save_pretrained(root / "base")
    state = base.state_dict()
    paths = []
    for k in range(experts):
        g = torch.Generator().manual_seed(k + 1)
        expert = {n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in state.items()}
        base.load_state_dict(expert)
        base.save_pretrained(root / f"expert{k}")
        paths.append(root / f"expert{k}")
    return root / "base", paths


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return wall, rss_kb / 1024


def mergekit_config(base: Path, experts: list[Path], density: float, dtype: str) -> str:
    models = "\n".join(f"  - model: {p}\n    parameters: {{density: {density}, weight: 1.0}}" for p in experts)
    return (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}\n"
        f"parameters:\n  normalize: true\n  int8_mask: false\ndtype: {dtype}\n"
    )


def compare(ours: Path, theirs: Path) -> dict:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                out |= {k: f.get_tensor(k) for k in f.keys()}
        return out

    a, b = tensors(ours), tensors(theirs)
    shared = sorted(set(a) & set(b))
    diffs = [(a[n].float() - b[n].float()).abs().max().item() for n in shared]
    scale = max(a[n].float().abs().max().item() for n in shared)
    return {
        "tensors_compared": len(shared),
        "only_ours": len(set(a) - set(b)),
        "only_mergekit": len(set(b) - set(a)),
        "max_abs_diff": max(diffs),
        "median_abs_diff": sorted(diffs)[len(diffs) // 2],
        "max_abs_weight": scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", help="path of mergekit-yaml (its own venv); omitted: adamerge alone")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--scale", type=float, default=0.002, help="std of each expert's noise (its task vector)")
    parser.add_argument("--layers", type=int, help="fewer layers than SmolLM2-135M's 30 (a quicker run)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="of the saved models; float32 makes the agreement check exact (no bf16 ties)",
    )
    parser.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_static_memory_"))
    base, experts = build_models(root, args.experts, args.scale, args.layers, args.dtype)
    size_mib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    ours = [sys.executable, "-m", "adamerge.cli", "merge-files", "ties", "--base", str(base)]
    ours += [a for k, p in enumerate(experts) for a in ("--expert", f"e{k}={p}")]
    ours += ["--out", str(root / "adamerge_out"), "--set", f"density={args.density}", "--set", "weights=1.0"]
    rows = {"adamerge merge-files": timed(ours)}
    result = {"model_mib": round(size_mib, 1), "experts": args.experts}
    if args.mergekit:
        (root / "ties.yml").write_text(mergekit_config(base, experts, args.density, args.dtype))
        theirs = [args.mergekit, str(root / "ties.yml"), str(root / "mergekit_out"), "--copy-tokenizer"]
        rows["mergekit-yaml"] = timed(theirs)
        result["agreement"] = compare(root / "adamerge_out", root / "mergekit_out")
    print(
        f"\nTIES (density {args.density}) of K={args.experts} experts, each {size_mib:.0f} MiB ({args.dtype} safetensors)\n"
    )
    print("| merger | wall s | peak RSS MiB |\n|---|---|---|")
    for name, (wall, rss) in rows.items():
        print(f"| {name} | {wall:.1f} | {rss:.0f} |")
        result[name] = {"wall_s": round(wall, 1), "peak_rss_mib": round(rss)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
