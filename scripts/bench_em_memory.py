"""Peak memory of Expert Merging: cached teacher targets vs keeping the K experts resident as models.

    python scripts/bench_em_memory.py                       # 4 experts of a ~27M-parameter Llama, CPU
    python scripts/bench_em_memory.py --device cuda         # also reports torch.cuda.max_memory_allocated

Both modes learn the same layer-wise coefficients with the same objective (logit KL + hidden-state MSE) for a few
steps; they differ only in where the targets come from:

- ``cached``: ``adamerge.objectives.teachers.build_teacher_cache`` runs each expert once (as the merged model at a one-hot
  table) and keeps its outputs (bf16); no expert model exists during training;
- ``resident``: the K experts are loaded as models next to the merged one and run on every batch, as a
  distillation loop without the cache would.

Experts are random perturbations of a randomly initialised base (memory does not depend on what they learned),
written to safetensors first so that the pool is read lazily in both modes. Each mode runs in a fresh process;
its peak resident set size (``ru_maxrss``) is the measure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max(args.seq, 64),
        tie_word_embeddings=False,
    )


def prepare(args, workdir: Path) -> None:
    """The base as a model folder and K experts as safetensors files."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(config(args))
    base.save_pretrained(workdir / "base")
    state = base.state_dict()
    for k in range(args.experts):
        g = torch.Generator().manual_seed(k + 1)
        expert = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}
        save_file(expert, str(workdir / f"expert{k}.safetensors"))
        del expert


def calibration(args):
    import datasets

    g = torch.Generator().manual_seed(0)
    return {
        f"expert{k}": datasets.Dataset.from_dict(
            {"input_ids": torch.randint(0, args.vocab, (args.samples, args.seq), generator=g).tolist()}
        )
        for k in range(args.experts)
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args, workdir: Path) -> dict:
    """One mode, in this (fresh) process."""
    from transformers import LlamaForCausalLM

    from adamerge.core.merged import MergedModel
    from adamerge.core.pool import make_pool
    from adamerge.engine.datasets import model_inputs
    from adamerge.engine.train import fit_coefficients
    from adamerge.objectives.alignment import ExpertAlignment
    from adamerge.objectives.teachers import Targets, batch_rows, output_rows, sample_positions

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sources = {f"expert{k}": str(workdir / f"expert{k}.safetensors") for k in range(args.experts)}
    base = LlamaForCausalLM.from_pretrained(workdir / "base")
    pool = make_pool(base, sources, device=device)
    merged = MergedModel(pool, granularity="layer", init=0.1, parametrization="sigmoid", clamp=None).to(device)
    calib = calibration(args)
    kwargs = dict(temperature=1.0, hidden_weight=1.0, layers=args.hidden_layers, top_k=args.top_k)
    if args.mode == "cached":
        objective = ExpertAlignment(teacher="cache", **kwargs)
    else:
        from safetensors.torch import load_file

        experts = {}
        for name, path in sources.items():
            model = LlamaForCausalLM.from_pretrained(workdir / "base")
            model.load_state_dict(load_file(path))
            experts[name] = model.to(device).eval().requires_grad_(False)

        class ResidentTeacher:
            def __init__(self, layers):
                self.layers, self.top_k = layers, args.top_k

            @torch.no_grad()
            def targets(self, task, batch):
                positions = [sample_positions(calib[task][int(i)]) for i in batch["_index"]]
                rows, pos = (t.to(device) for t in batch_rows(positions))
                out = experts[task](**model_inputs(batch), output_hidden_states=True)
                logits, hidden = output_rows(out, rows, pos, self.layers)
                return Targets(rows, pos, logits, None, hidden, token_logits=True)

        class ResidentAlignment(ExpertAlignment):
            def bind(self, merged, datamodule=None, datasets=None, pad_id=None):
                super().bind(merged, datamodule, datasets, pad_id)  # teacher="online": resolves the layers
                self.teacher = ResidentTeacher(self.teacher.layers)
                return self

        objective = ResidentAlignment(teacher="online", **kwargs)
    setup_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fit_coefficients(merged, objective, calib, steps=args.steps, lr=0.05, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    model_mb = sum(t.numel() * t.element_size() for t in base.state_dict().values()) / 2**20
    return {
        "mode": args.mode,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mb": setup_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "cache_mb": objective.teacher.nbytes() / 2**20 if args.mode == "cached" else 0.0,
        "model_mb": model_mb,
        "train_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples per task")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--hidden-layers", default="middle")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["cached", "resident"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args, Path(args.workdir))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepare(args, Path(tmp))
        results = {}
        for mode in ("cached", "resident"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--workdir", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    cached, resident = results["cached"], results["resident"]
    print(
        f"{args.experts} experts of a {cached['model_mb']:.0f} MiB model (fp32), {args.samples} calibration samples "
        f"x {args.seq} tokens per task, {args.steps} steps, device {args.device}"
    )
    print(
        "| teacher | peak RSS (MiB) | RSS before training (MiB) | teacher storage (MiB) | CUDA peak (MiB) | train s |"
    )
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        storage = r["cache_mb"] if mode == "cached" else args.experts * r["model_mb"]
        cuda = f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-"
        print(
            f"| {mode} | {r['peak_rss_mb']:.0f} | {r['rss_before_training_mb']:.0f} | {storage:.1f} | {cuda} | "
            f"{r['train_s']:.1f} |"
        )
    saved = resident["peak_rss_mb"] - cached["peak_rss_mb"]
    print(
        f"cached targets: peak RSS {saved:.0f} MiB lower ({100 * saved / resident['peak_rss_mb']:.0f}% of the "
        "resident-experts run)"
    )
    if cached["cuda_peak_mb"] is not None:
        d = resident["cuda_peak_mb"] - cached["cuda_peak_mb"]
        print(f"CUDA peak {d:.0f} MiB lower with cached targets")


if __name__ == "__main__":
    main()
