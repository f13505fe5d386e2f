"""The 7B x 8 path, measured: adamerge's coefficient step on Llama-architecture models at 1B and 7B, on one GPU.

Models have random weights built from a config (``adamerge.testbeds.random_llama``; step time and memory depend on
shapes only), directly on the GPU in bf16; the K experts are base + seeded noise, so their task vectors are made in
memory one tensor at a time and handed to ``ExpertPool`` (no checkpoint is written). For each size, in this order:

- ``limit``: a plain forward + backward of the base with trainable weights over the same K task batches (bf16
  autocast), the faster of the batches concatenated and K separate passes (``bench_step.LimitStep``); what it
  allocates beyond the weight gradients is the activations at this batch;
- ``adamerge`` with ``storage=resident`` (task vectors on the GPU) and ``storage=streamed`` (in host memory, copied
  in one tensor's stack at a time): ``MergeModule``'s real training step under Lightning's bf16-mixed
  (``bench_step.fit_timed``), layer-wise coefficients, entropy objective, ``--backward`` (default ``split``);
- ``fusionbench``: FusionBench's ``LayerWiseMergedModel`` in its test-time-adaptation loop, when ``fusion_bench``
  imports (it is optional; the entry says ``not installed`` otherwise).

Before building anything, an entry is checked against ``adamerge estimate``'s plan (``adamerge.estimate.memory_plan``)
plus the activations measured in the limit; one that cannot fit is skipped as ``does not fit`` with the figures
(8 x 7B resident: base, 8 task vectors, merged tensors and their gradients are 138 GiB before activations). A
streamed entry must also fit its task vectors in the host's available memory. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps; an out-of-memory entry is reported as ``oom``.

Streamed task vectors are views of one host buffer page-locked in place (``cudaHostRegister``), which
``MergedModel`` keeps as it is, rather than pinned by ``MergedModel``'s ``Tensor.pin_memory()``: that copies into
PyTorch's caching host allocator, which rounds every block up to a power of two, so 7B x 8's ``[8, 11008, 4096]``
MLP stacks would take 1 GiB instead of 0.67 (132 GiB of pinned memory instead of 100, more than the GPU machine's
128 GiB).

Usage::

    python scripts/gpu_check.py                          # 1b and 7b, K=8, 2 x 512 tokens per task, on CUDA
    python scripts/gpu_check.py --sizes 1b --experts 4 --batch 4 --seq 256 --storages resident
    python scripts/gpu_check.py --smoke                  # the tiny shape, K=2, on the CPU in seconds (same code path)

The last line printed is the result as JSON: one entry per size x storage (and FusionBench per size).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import LIMIT_MODES, LimitStep, PeakMemory, autocast, entropy, fit_timed, sync  # noqa: E402

GIB = 2**30
LIMIT_MODE_OF = {"split": ("separate",), "concat": ("concat",), "auto": LIMIT_MODES}  # the limit's matching passes


def host_available() -> int:
    """Bytes of host memory available now (``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def allocated(device: str, memory: PeakMemory) -> int:
    """Bytes held at the start of a measurement: CUDA allocated, or the process's RSS on the CPU."""
    return torch.cuda.memory_allocated() if device == "cuda" else memory.peak


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def pinned_host_stacks(model, args) -> tuple[dict[str, torch.Tensor], int | None]:
    """Task-vector stacks as views of one host buffer, page-locked in one call when CUDA runs (see the module
    docstring; one region, since stacks sharing a page could not be registered twice). Returns the stacks and the
    pointer to unregister."""
    from adamerge.testbeds.random_llama import noise_task_vectors

    numel = args.experts * sum(p.numel() for p in model.parameters())
    flat = torch.empty(numel, dtype=torch.bfloat16)
    pointer = None
    if args.device == "cuda":
        code = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), numel * flat.element_size(), 0))
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of {numel * 2 / GIB:.1f} GiB failed (CUDA error {code})")
        pointer = flat.data_ptr()
        if not flat[:1].is_pinned():  # MergedModel would then pin_memory() a copy of every stack: twice the memory
            unregister_pinned(pointer)
            raise RuntimeError("registered host memory does not report is_pinned(); streamed storage would copy it")
    return noise_task_vectors(model, args.experts, args.seed, torch.bfloat16, out=flat), pointer


def unregister_pinned(pointer: int | None) -> None:
    if pointer is not None:
        torch.cuda.cudart().cudaHostUnregister(pointer)


def measure_limit(base, batches, args) -> dict:
    """The limit's median step time and peak per pass mode, and what it allocates beyond the weight gradients."""
    limit = LimitStep(base, batches, args.device, "bf16")
    grad_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    out = {}
    for mode in LIMIT_MODES:
        memory, times = PeakMemory(args.device), []
        try:
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    base.zero_grad(set_to_none=True)
                    memory.start()
                    start = allocated(args.device, memory)
                times.append(limit.timed(mode))
            peak = memory.stop() * 2**20
            out[mode] = {
                "s": statistics.median(times[args.warmup :]),
                "peak_gib": peak / GIB,
                "activations_gib": max(peak - start - grad_bytes, 0) / GIB,
            }
        except Exception as err:
            if not out_of_memory(err):
                traceback.print_exc()
            out[mode] = {"status": "oom" if out_of_memory(err) else "error", "error": first_line(err)}
        base.zero_grad(set_to_none=True)
        free_memory(args.device)
    base.requires_grad_(False)
    return out


def adamerge_step(base, storage: str, batches, args) -> dict:
    """MergeModule's training step with K noise experts in ``storage``, timed under Lightning."""
    from adamerge.core.merged import MergedModel
    from adamerge.core.pool import ExpertPool
    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective
    from adamerge.testbeds.random_llama import noise_task_vectors

    if storage == "streamed":
        stacks, pointer = pinned_host_stacks(base, args)
    else:
        stacks, pointer = noise_task_vectors(base, args.experts, args.seed, torch.bfloat16), None
    try:
        pool = ExpertPool(model=base, experts=[f"task{k}" for k in range(args.experts)], task_vectors=stacks)
        merged = MergedModel(pool, granularity="layer", init=0.3, storage=storage)
        module = MergeModule(merged, entropy_objective, partial(torch.optim.Adam, lr=1e-3), backward=args.backward)
        batch = {f"task{k}": b for k, b in enumerate(batches)}
        result = fit_timed(module, batch, args.device, "bf16", args.warmup, args.steps)
        return {"s": statistics.median(result["times"]), "peak_gib": result["mib"] / 1024, "mode": result["mode"]}
    finally:
        pool = merged = module = None
        free_memory(args.device)
        unregister_pinned(pointer)  # while the stacks are alive: freeing registered memory leaks it until exit


def fusionbench_step(base, batches, args) -> dict:
    """FusionBench's LayerWiseMergedModel on the same experts, in its own loop (as ``bench_step``'s worker)."""
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    from adamerge.testbeds.random_llama import noise_row

    finetuned = []
    for k in range(args.experts):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            pairs = zip(base.parameters(), expert.parameters())
            for index, (theta, param) in enumerate(pairs):
                param.add_(noise_row(theta, index, k, args.seed, param.dtype))
        finetuned.append(expert)
    num_layers = sum(1 for _ in base.parameters())
    module = LayerWiseMergedModel(
        # the weights in the model's dtype, as its docstring asks
        layer_wise_weight=get_layer_wise_weights(args.experts, num_layers, init_values=0.3, dtype=torch.bfloat16),
        pretrained_model=base.requires_grad_(True),  # it forms task vectors for the trainable tensors only
        finetuned_models=finetuned,
        clamp_weights=True,
        strict=False,  # non-persistent buffers (rotary inv_freq) are not in its merged state dict
    )
    del finetuned
    optimizer = torch.optim.Adam([module.merge_weight], lr=1e-3)
    module.train()
    module.merge_weights()
    memory, times = PeakMemory(args.device), []
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                memory.start()
            sync(args.device)
            t0 = time.perf_counter()
            for inputs in batches:
                with autocast(args.device, "bf16"):
                    logits = module(**inputs).logits
                entropy(logits).backward(retain_graph=True)
            optimizer.step()
            optimizer.zero_grad()
            module.merge_weights()
            sync(args.device)
            times.append(time.perf_counter() - t0)
        return {"s": statistics.median(times[args.warmup :]), "peak_gib": memory.stop() / 1024}
    finally:
        base.requires_grad_(False).eval()
        module = optimizer = None
        free_memory(args.device)


def fusionbench_status() -> str | None:
    """``None`` when fusion_bench imports, else why it is left out."""
    try:
        import fusion_bench.models.wrappers.layer_wise_fusion  # noqa: F401
    except ImportError:
        return "not installed"
    return None


def fit_reason(plan: dict, activations: float, capacity: float, host: float, storage: str) -> str | None:
    """Why an entry cannot fit (``None`` if it can): the plan plus activations against the device, streamed task
    vectors against the host's available memory."""
    need = plan["device/total"] + activations
    if need > capacity:
        return (
            f"does not fit: plan {plan['device/total'] / GIB:.1f} GiB + activations {activations / GIB:.1f} GiB "
            f"(measured in the limit) > {capacity / GIB:.1f} GiB of device memory"
        )
    if storage == "streamed" and plan["host/task_vectors"] > host:
        return (
            f"does not fit host memory: task vectors {plan['host/task_vectors'] / GIB:.1f} GiB > "
            f"{host / GIB:.1f} GiB available"
        )
    return None


def check_size(size: str, args, capacity: float, fb: str | None) -> tuple[dict, list[dict]]:
    """The limit and every entry of one model size."""
    from adamerge.estimate import memory_plan
    from adamerge.testbeds.random_llama import random_llama, token_batches

    meta = random_llama(size, "meta")
    plans = {s: memory_plan(meta, args.experts, "bfloat16", "bfloat16", s) for s in ("resident", "streamed")}
    params = plans["resident"]["total_parameters"]
    del meta
    base = random_llama(size, args.device, torch.bfloat16, args.seed)
    batches = token_batches(base.config.vocab_size, args.experts, args.batch, args.seq, args.seed, args.device)
    limit = measure_limit(base, batches, args)
    timed = {m: r for m, r in limit.items() if "s" in r}
    limit_s = min((r["s"] for r in timed.values()), default=None)
    activations = max((timed[m]["activations_gib"] for m in LIMIT_MODE_OF[args.backward] if m in timed), default=0.0)
    print(f"{size}: {params / 1e9:.2f}B parameters; limit {limit}", flush=True)

    runs = [("adamerge", s) for s in args.storages] + [("fusionbench", "resident")]
    entries = []
    for method, storage in runs:
        plan = plans[storage]
        entry = {"size": size, "method": method, "storage": storage, "parameters": params}
        entry |= {"plan_gib": plan["device/total"] / GIB, "plan_host_gib": plan["host/task_vectors"] / GIB}
        entry |= {"limit_s": limit_s, "activations_gib": activations}
        reason = fb if method == "fusionbench" else None
        reason = reason or fit_reason(plan, activations * GIB, capacity, host_available(), storage)
        if reason:
            entries.append(entry | {"status": reason})
            print(f"  {method} {storage}: {reason}", flush=True)
            continue
        start = time.perf_counter()
        try:
            result = (
                adamerge_step(base, storage, batches, args)
                if method == "adamerge"
                else fusionbench_step(base, batches, args)
            )
        except Exception as err:  # one entry's failure must not cost the others' figures on a borrowed GPU
            if not out_of_memory(err):
                traceback.print_exc()
            entry |= {"status": "oom" if out_of_memory(err) else "error", "error": first_line(err)}
        else:
            entry |= {"status": "ok", "step_s": result["s"], "peak_gib": result["peak_gib"]}
            entry |= {"vs_limit": result["s"] / limit_s if limit_s else None, "mode": result.get("mode")}
            entry["peak_minus_plan_gib"] = result["peak_gib"] - entry["plan_gib"]
        free_memory(args.device)
        entries.append(entry)
        print(f"  {method} {storage} ({time.perf_counter() - start:.0f} s): {entry}", flush=True)
    del base, batches
    free_memory(args.device)
    return limit, entries


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1b,7b", help="comma-separated shapes (adamerge.testbeds.random_llama)")
    parser.add_argument("--experts", type=int, default=8, help="number of experts K")
    parser.add_argument("--batch", type=int, default=2, help="sequences per task batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--storages", default="resident,streamed", help="adamerge's method.storage values to check")
    parser.add_argument("--backward", choices=["split", "concat", "auto"], default="split", help="method.backward")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per entry")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, K=2, 2 x 16 tokens, 2 steps, on the CPU")
    parser.add_argument("--skip-fusionbench", action="store_true")
    args = parser.parse_args(argv)
    args.storages = args.storages.split(",")
    if not set(args.storages) <= {"resident", "streamed"}:
        parser.error(f"--storages takes resident and/or streamed, got {args.storages}")
    if args.smoke:
        args.sizes, args.experts, args.batch, args.seq, args.steps, args.device = "tiny", 2, 2, 16, 2, "cpu"
    elif torch.cuda.is_available():
        args.device = "cuda"
    else:
        parser.error("no CUDA device here; --smoke runs the same path on the CPU with a tiny shape")

    torch.manual_seed(args.seed)
    if args.device == "cuda":
        capacity, device_name = torch.cuda.mem_get_info()[0], torch.cuda.get_device_name()
        memory = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        capacity, device_name = host_available(), "cpu"
        memory = "peak RSS of the process over the timed steps (includes host task vectors and libraries)"
    fb = "skipped (--skip-fusionbench)" if args.skip_fusionbench else fusionbench_status()
    limits, entries = {}, []
    for size in args.sizes.split(","):
        limits[size], size_entries = check_size(size, args, capacity, fb)
        entries += size_entries
    result = {
        "device": device_name,
        "capacity_gib": capacity / GIB,
        "host_available_gib": host_available() / GIB,
        "memory": memory,
        "precision": "bf16-mixed",
        "experts": args.experts,
        "batch": args.batch,
        "seq": args.seq,
        "backward": args.backward,
        "steps": args.steps,
        "fusionbench": fb or "installed",
        "limits": limits,
        "entries": entries,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
