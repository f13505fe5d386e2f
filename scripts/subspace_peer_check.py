"""TSV-M, Iso-C, Iso-CTS and WUDI next to FusionBench's implementations: agreement, and speed on real experts
(the mask merges: scripts/masks_peer_check.py).

    python scripts/subspace_peer_check.py            # per-tensor max |diff| on seeded random task vectors
    python scripts/subspace_peer_check.py --speed    # wall time on the hard preset's MiniLM experts, K=4 and K=8

FusionBench runs in its own virtual environment (``--fb-python``, default ``/tmp/fbvenv/bin/python``) as a
subprocess on task vectors saved with ``torch.save``, so this environment never imports it. Both sides compute the
unscaled merge (alpha = 1) in float32 on the CPU; run with ``OMP_NUM_THREADS=1`` for comparable timings.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adamerge.methods.subspace import iso_c, iso_cts, map_matrices, tsv_m
from adamerge.methods.wudi import wudi
from adamerge.testbeds.minilm import peer_check_pool

METHODS = ("tsv_m", "iso_c", "iso_cts", "wudi")
TOLERANCE = 1e-5

# Runs in FusionBench's venv: calls its merge functions on the saved task vectors, times them, saves the merges.
FB_RUNNER = r"""
import contextlib, io, statistics, sys, time
import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.wudi.wudi import wudi_merging

job = torch.load(sys.argv[1])
tvs, out = job["task_vectors"], {}
calls = {
    "tsv_m": lambda: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
    "iso_c": lambda: iso_c(tvs, accelerator="cpu"),
    "iso_cts": lambda: iso_cts(tvs, common_space_fraction=job["common_fraction"], accelerator="cpu"),
    "wudi": lambda: wudi_merging(tvs, accelerator="cpu", iter_num=job["wudi_steps"], exclude_keys=job["wudi_exclude"]),
}
for name in job["methods"]:
    times = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            merged = calls[name]()
        times.append(time.perf_counter() - start)
    out[name] = {"merged": {k: v.detach() for k, v in merged.items()}, "seconds": statistics.median(times)}
torch.save(out, sys.argv[2])
"""


def ours(name: str, task_vectors: dict, common_fraction: float, wudi_steps: int, wudi_exclude: list) -> dict:
    """Our unscaled merged deltas of a ``name -> [K, ...]`` dict (the methods' ``deltas`` without the base)."""
    kernels = {
        "tsv_m": lambda tau, mat: tsv_m(tau, 1.0, None, mat),
        "iso_c": lambda tau, mat: iso_c(tau, 1.0, mat),
        "iso_cts": lambda tau, mat: iso_cts(tau, 1.0, common_fraction, None, mat),
        "wudi": lambda tau, mat: wudi(tau, wudi_steps, 1e-5, mat),
    }
    if name != "wudi":
        return map_matrices(task_vectors, kernels[name])
    solved = {k: v for k, v in task_vectors.items() if k not in wudi_exclude}
    return map_matrices(solved, kernels[name]) | {k: task_vectors[k].mean(0) for k in wudi_exclude}


def run_fusion_bench(fb_python: str, task_vectors: dict, methods, repeats: int, **job) -> dict:
    """FusionBench's merges and median seconds, from a subprocess in its venv."""
    k = next(iter(task_vectors.values())).shape[0]
    as_list = [{name: tau[i].clone() for name, tau in task_vectors.items()} for i in range(k)]
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file, runner = Path(tmp, "job.pt"), Path(tmp, "out.pt"), Path(tmp, "runner.py")
        torch.save({"task_vectors": as_list, "methods": list(methods), "repeats": repeats, **job}, job_file)
        runner.write_text(FB_RUNNER)
        subprocess.run([fb_python, str(runner), str(job_file), str(out_file)], check=True, stderr=subprocess.DEVNULL)
        return torch.load(out_file)


def seeded_task_vectors(k: int = 4, seed: int = 0) -> dict:
    """Random task vectors with a shared part: two matrices of one shape (a batch), a tall, a wide, two 1-D."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.q.weight": (48, 32), "l1.q.weight": (48, 32), "l0.up.weight": (96, 32), "l0.down.weight": (32, 96)}
    shapes |= {"l0.up.bias": (96,), "norm.weight": (48,)}
    return {n: 1e-2 * (torch.randn(1, *s, generator=g) + torch.randn(k, *s, generator=g)) for n, s in shapes.items()}


def peer_check(args) -> bool:
    task_vectors = seeded_task_vectors()
    job = {"common_fraction": 0.8, "wudi_steps": 300, "wudi_exclude": []}
    theirs = run_fusion_bench(args.fb_python, task_vectors, METHODS, 1, **job)
    ok = True
    print(f"{'method':8} {'tensor':16} {'max |diff|':>11} {'max |ref|':>10}")
    for method in METHODS:
        mine = ours(method, task_vectors, **job)
        for name, ref in theirs[method]["merged"].items():
            diff = (mine[name] - ref).abs().max().item()
            ok &= diff <= TOLERANCE
            print(f"{method:8} {name:16} {diff:11.2e} {ref.abs().max().item():10.2e}")
    print("all within", TOLERANCE if ok else f"FAILED: some exceed {TOLERANCE}")
    return ok


def speed(args) -> None:
    for k in (4, 8):
        task_vectors = peer_check_pool(k).task_vectors
        embedding = [n for n, t in task_vectors.items() if t.shape[1] > 10000]
        # FusionBench's WUDI forms [K, m, m] products (a 30522 x 30522 one per task for the word embedding): both sides
        # leave that matrix out (averaged) and run fewer steps than the paper's 300 (time per step scales linearly).
        job = {"common_fraction": 0.8, "wudi_steps": args.wudi_steps, "wudi_exclude": embedding}
        methods = args.methods.split(",")
        theirs = run_fusion_bench(args.fb_python, task_vectors, methods, args.repeats, **job) if args.fb else {}
        for method in methods:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                ours(method, task_vectors, **job)
                times.append(time.perf_counter() - start)
            fb = theirs.get(method, {}).get("seconds")
            fb_text = f"{fb:8.2f} s" if fb is not None else "   (not run)"
            note = f" (WUDI: {args.wudi_steps} steps, word embedding averaged)" if method == "wudi" else ""
            print(
                f"K={k} {method:8} adamerge {statistics.median(times):8.2f} s   FusionBench {fb_text}{note}", flush=True
            )
        if "wudi" in methods:
            start = time.perf_counter()
            ours("wudi", task_vectors, common_fraction=0.8, wudi_steps=300, wudi_exclude=[])
            print(f"K={k} wudi     adamerge {time.perf_counter() - start:8.2f} s   (paper's 300 steps, all matrices)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="time the merges on the cached MiniLM experts")
    parser.add_argument("--fb-python", default="/tmp/fbvenv/bin/python", help="python of FusionBench's venv")
    parser.add_argument("--no-fb", dest="fb", action="store_false", help="--speed: time adamerge only")
    parser.add_argument("--repeats", type=int, default=3, help="--speed: repeats per method (median)")
    parser.add_argument("--wudi-steps", type=int, default=20, help="--speed: WUDI steps on both sides")
    parser.add_argument("--methods", default=",".join(METHODS), help="--speed: comma-separated subset")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    if args.speed:
        speed(args)
    elif not peer_check(args):
        sys.exit(1)


if __name__ == "__main__":
    main()
