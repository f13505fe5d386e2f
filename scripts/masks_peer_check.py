"""Peer check of the mask merges against FusionBench, and their wall time on real MiniLM experts.

FusionBench runs in its own venv (``--fb-python``, default ``/tmp/fbvenv/bin/python``) as a subprocess on tensors
saved with ``torch.save``, so this venv never imports it. FusionBench 0.2.33 implements TALL masks (two versions: the
flat ``tall_mask.utils.generate_task_masks`` of the authors' repository and the state-dict one its
``TallMaskTaskArithmeticAlgorithm`` calls) and Consensus (``construct_consensus_mask``); it has no PCB, DELLA,
Breadcrumbs or LiNeS, so those are checked only against hand-worked values (tests/test_masks.py, tests/test_lines.py).

Usage::

    OMP_NUM_THREADS=1 python scripts/masks_peer_check.py            # agreement per tensor (seeded random tensors)
    OMP_NUM_THREADS=1 python scripts/masks_peer_check.py --speed    # timings, K=4 and K=8 real MiniLM experts (hard preset)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from adamerge.core.pool import ExpertPool
from adamerge.methods.registry import Run, build_method
from adamerge.testbeds.minilm import peer_check_pool

# Runs under FusionBench's python: its functions on our tensors, results saved back. ``mode`` = check or speed.
FUSIONBENCH_SIDE = r"""
import sys, time, statistics, torch
torch.set_num_threads(1)
import fusion_bench.method.tall_mask.utils as fb_utils
from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as fb_state_dict_masks
from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict
from fusion_bench.utils.state_dict_arithmetic import state_dict_sum, state_dict_hadamard_product, state_dict_add

mode, path, out, lam, k_cons, repeats = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
data = torch.load(path)
base, tvs = data["base"], data["task_vectors"]  # name -> tensor; task -> name -> tensor
tasks = list(tvs)

def to_state_dict(vector):
    # FusionBench's vector_to_state_dict writes into its reference's tensors (a shallow copy): give it fresh ones
    return vector_to_state_dict(vector, {name: t.clone() for name, t in base.items()})

def flat_tall():
    # the authors' flat version: masks from theta_0, theta_t and tau_MTL = sum_t tau_t
    flat_ptm = state_dict_to_vector(base)
    flat_tv = torch.vstack([state_dict_to_vector(tvs[t]) for t in tasks])
    masks = fb_utils.generate_task_masks(flat_tv, flat_ptm + flat_tv, flat_ptm, tall_mask_lambda=lam)
    merged = flat_tv.sum(0)
    per_task = {t: to_state_dict(flat_ptm + masks[i] * merged) for i, t in enumerate(tasks)}
    return masks, per_task

def state_dict_tall():
    # TallMaskTaskArithmeticAlgorithm.run's calls, minus model loading and deepcopy
    mtv = state_dict_sum([tvs[t] for t in tasks])
    per_task = {}
    for t in tasks:
        mask = fb_state_dict_masks(mtv, tvs[t], base, tall_mask_lambda=lam)
        per_task[t] = state_dict_add(base, state_dict_hadamard_product(mask, mtv))
    return per_task

def consensus(masks):
    flat_ptm = state_dict_to_vector(base)
    fb_utils.load_tall_mask = lambda remove_keys, ptm_check, config: {
        t: to_state_dict(masks[i].float()) for i, t in enumerate(tasks)
    }
    cmask = fb_utils.construct_consensus_mask(base, k_cons, None, [])
    merged = torch.vstack([state_dict_to_vector(tvs[t]) for t in tasks]).sum(0)
    return to_state_dict(flat_ptm + cmask * merged)

import contextlib, io
quiet = contextlib.redirect_stdout(io.StringIO())
if mode == "check":
    with quiet:
        masks, flat = flat_tall()
        result = {"flat": flat, "state_dict": state_dict_tall(), "consensus": consensus(masks)}
    torch.save(result, out)
else:
    times = {}
    for name, fn in [("tall_masks", flat_tall), ("tall_masks (state-dict algorithm)", state_dict_tall)]:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                fn()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    with contextlib.redirect_stdout(io.StringIO()):
        masks, _ = flat_tall()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            m, _ = flat_tall()
            consensus(m)
        runs.append(time.perf_counter() - start)
    times["consensus"] = statistics.median(runs)
    torch.save(times, out)
"""


def run_fusionbench(fb_python: str, mode: str, base, pool: ExpertPool, lam: float, k: int, repeats: int = 1) -> dict:
    """FusionBench's TALL/Consensus on the pool's tensors, in its own interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out, code = Path(tmp) / "in.pt", Path(tmp) / "out.pt", Path(tmp) / "fb_side.py"
        task_vectors = {
            t: {n: tau[i].clone() for n, tau in pool.task_vectors.items()} for i, t in enumerate(pool.experts)
        }
        torch.save({"base": {n: b.detach().clone() for n, b in base.items()}, "task_vectors": task_vectors}, data)
        code.write_text(FUSIONBENCH_SIDE)
        cmd = [fb_python, str(code), mode, str(data), str(out), str(lam), str(k), str(repeats)]
        subprocess.run(cmd, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        return torch.load(out)


def random_pool(num_experts: int = 4, seed: int = 0) -> ExpertPool:
    """Seeded base and experts: a few tensor shapes of a small transformer, task vectors ~1% of the weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (100, 32), "enc.layer.0.w": (64, 32), "enc.layer.0.b": (64,), "enc.layer.1.w": (32, 64)}
    model = torch.nn.Module()
    for name, shape in shapes.items():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.randn(shape, generator=g)))
    params = dict(model.named_parameters())
    base = {name: params[name.replace(".", "_")].detach() for name in shapes}
    task_vectors = {n: 0.01 * torch.randn((num_experts, *s), generator=g) for n, s in shapes.items()}
    return base, ExpertPool(model, [f"task{i}" for i in range(num_experts)], task_vectors)


def ours_on(base: dict, pool: ExpertPool, name: str, **options):
    """Our merge on the pool (its base_tensors replaced by ``base``: the random pool names its parameters apart)."""
    method = build_method({"name": name, **options})
    pool.base_tensors = lambda: base  # type: ignore[method-assign]
    return method.merge(Run(None, pool, None))


def check(fb_python: str, lam: float, k: int) -> None:
    base, pool = random_pool()
    theirs = run_fusionbench(fb_python, "check", base, pool, lam, k)
    tall = ours_on(base, pool, "tall_masks", mask_lambda=lam)
    cons = ours_on(base, pool, "consensus", mask_lambda=lam, k=k, weights=1.0)
    print(f"TALL masks (lambda={lam}) and Consensus (k={k}): max |ours - FusionBench| per tensor")
    header = ["tall (flat utils)", "tall (algorithm)", "algorithm's rule", "consensus"]
    print(f"{'tensor':<16}" + "".join(f"{h:>19}" for h in header))
    for name, tau in pool.task_vectors.items():
        flat = max(float((tall.task_params[t][name] - theirs["flat"][t][name]).abs().max()) for t in pool.experts)
        algo = max(float((tall.task_params[t][name] - theirs["state_dict"][t][name]).abs().max()) for t in pool.experts)
        # the algorithm class's rule, |theta_0 - tau_t| > lambda |tau_MTL - tau_t|, written out here: it matches
        mtl = tau.sum(0)
        rule = [
            base[name] + torch.where((base[name] - tau[i]).abs() > lam * (mtl - tau[i]).abs(), mtl, 0)
            for i in range(len(tau))
        ]
        algo_rule = max(
            float((rule[i] - theirs["state_dict"][t][name]).abs().max()) for i, t in enumerate(pool.experts)
        )
        consensus = float((cons.params[name] - theirs["consensus"][name]).abs().max())
        print(f"{name:<16}" + "".join(f"{v:>19.2e}" for v in (flat, algo, algo_rule, consensus)))
    print(
        "tall (algorithm): FusionBench's TallMaskTaskArithmeticAlgorithm passes theta_0 where the paper's eq. has the "
        "task vector's origin (|theta_0 - tau_t| instead of |tau_t|), so its masks differ by definition; its flat "
        "utils (the authors' code) follow the paper. FusionBench also uses '>' where the paper has '>=' (equal only "
        "at exact ties)."
    )


def median_seconds(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def speed(fb_python: str, repeats: int, lam: float, k: int) -> None:
    torch.set_num_threads(1)
    methods = ["tall_masks", "consensus", "pcb", "della", "breadcrumbs", "lines"]
    rows = []
    for num_experts in (4, 8):
        pool = peer_check_pool(num_experts)
        base = pool.base_tensors()
        numel = sum(t[0].numel() for t in pool.task_vectors.values())
        theirs = run_fusionbench(fb_python, "speed", base, pool, lam, k, repeats)
        for name in methods:
            options = {"mask_lambda": lam} if name in ("tall_masks", "consensus") else {}
            method = build_method({"name": name, **options, **({"k": k} if name == "consensus" else {})})
            ours = median_seconds(lambda m=method, p=pool: m.merge(Run(None, p, None)), repeats)
            rows.append(
                {
                    "K": num_experts,
                    "params": numel,
                    "method": name,
                    "adamerge_s": ours,
                    "fusionbench_s": theirs.get(name),
                }
            )
        rows.append(
            {
                "K": num_experts,
                "params": numel,
                "method": "tall_masks (FusionBench state-dict algorithm)",
                "adamerge_s": None,
                "fusionbench_s": theirs["tall_masks (state-dict algorithm)"],
            }
        )
    print(f"median of {repeats} runs, OMP_NUM_THREADS=1, one thread each (shared machine)")
    print(f"{'K':>2} {'method':<48} {'adamerge s':>11} {'FusionBench s':>14}")
    for row in rows:
        ours = f"{row['adamerge_s']:.3f}" if row["adamerge_s"] is not None else "-"
        fb = f"{row['fusionbench_s']:.3f}" if row["fusionbench_s"] is not None else "n/a"
        print(f"{row['K']:>2} {row['method']:<48} {ours:>11} {fb:>14}")
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="time every merge on MiniLM experts, K=4 and K=8")
    parser.add_argument("--fb-python", default="/tmp/fbvenv/bin/python")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask-lambda", type=float, default=0.6)
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()
    if args.speed:
        speed(args.fb_python, args.repeats, args.mask_lambda, args.k)
    else:
        check(args.fb_python, args.mask_lambda, args.k)


if __name__ == "__main__":
    main()
