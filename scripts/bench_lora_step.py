"""LoRA experts at LLM scale: the LoRA-native coefficient step against a plain forward + backward of the dense base.

SmolLM2-135M's shape (``adamerge.testbeds.random_llama``: random weights from its config, since step time depends on
shapes only) with K LoRA experts of rank r on q, k, v, o, gate, up and down, merged without densifying
(``LoraMergedModel``, layer-wise coefficients, init 0.3). Two steps on the same batch, interleaved in one process (the
order alternating) so that a drift in the machine's speed hits both alike:

- ``limit``: the dense base with trainable weights, what a fine-tuning step costs: forward, entropy of the next-token
  prediction, backward into every weight;
- ``lora``: the merged model's coefficient step, as ``MergeModule`` runs it without Lightning: ``two_stage_backward``
  (forward with the lam-weighted low-rank terms, backward into the coefficients only) and an Adam step. No weight
  gradient is formed, so it can be cheaper than the limit.

Both in float32 on the CPU threads torch is given (``OMP_NUM_THREADS``). The headline ``lora_vs_limit`` is the median
over the timed pairs of (lora step / limit step run next to it): on a shared machine whose speed drifts by 2x over
minutes, the ratio of the two medians mixes steps from different loads.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_lora_step.py        # smollm2-135m, K=4, r=16, 4 x 128 tokens, 10 steps
    python scripts/bench_lora_step.py --shape tiny --steps 2    # seconds

The last line printed is the result as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def main(argv=None) -> dict:
    from adamerge.core.lora_merged import LoraMergedModel
    from adamerge.core.lora_pool import make_lora_pool
    from adamerge.core.merged_base import two_stage_backward
    from adamerge.objectives.entropy import entropy_objective
    from adamerge.testbeds.random_llama import LLAMA_SHAPES, random_llama, random_lora_adapters, token_batches

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(LLAMA_SHAPES), default="smollm2-135m")
    parser.add_argument("--experts", type=int, default=4, help="number of LoRA experts K")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base = random_llama(args.shape, seed=args.seed)
    dense = copy.deepcopy(base).requires_grad_(True)
    adapters = random_lora_adapters(base, args.experts, args.lora_rank, seed=args.seed)
    merged = LoraMergedModel(make_lora_pool(base, adapters), granularity="layer", init=0.3).train()
    optimizer = torch.optim.Adam([merged.coefficients.raw], lr=1e-3)
    (batch,) = token_batches(base.config.vocab_size, 1, args.batch, args.seq, args.seed)

    def limit():
        entropy_objective(dense(**batch), None, batch).backward()

    def lora():
        two_stage_backward(merged, lambda params: [entropy_objective(merged(**batch, params=params), None, batch)])
        optimizer.step()

    def timed(step) -> float:
        dense.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    times = {"limit": [], "lora": []}
    for i in range(args.warmup + args.steps):
        for name in ("limit", "lora") if i % 2 == 0 else ("lora", "limit"):
            times[name].append(timed(limit if name == "limit" else lora))
    times = {name: t[args.warmup :] for name, t in times.items()}
    medians = {name: statistics.median(t) for name, t in times.items()}
    pairs = [b / a for a, b in zip(times["limit"], times["lora"])]
    result = {
        "shape": args.shape,
        "experts": args.experts,
        "lora_rank": args.lora_rank,
        "tokens": [args.batch, args.seq],
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in base.parameters()),
        "lora_parameters": sum(f.A.numel() + f.B.numel() for a in adapters.values() for f in a.modules.values()),
        "coefficients": merged.coefficients.raw.numel(),
        "limit_s": medians["limit"],
        "lora_s": medians["lora"],
        "lora_vs_limit": statistics.median(pairs),
        "ratio_of_medians": medians["lora"] / medians["limit"],
        "steps": times,
    }
    print(
        f"{args.shape}, K={args.experts} LoRA experts of rank {args.lora_rank}, {args.batch} x {args.seq} tokens, "
        f"{result['threads']} thread(s), medians of {args.steps} interleaved steps: limit (dense forward + backward) "
        f"{medians['limit']:.3f} s, LoRA-native coefficient step {medians['lora']:.3f} s; "
        f"LoRA / limit per pair: median {result['lora_vs_limit']:.2f}x (range {min(pairs):.2f}-{max(pairs):.2f})"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
