"""Peer check of RegMean and Fisher merging against FusionBench 0.2.33 (run by hand, not by the tests).

    python scripts/regmean_peer_check.py            # same seeded weights, Grams and Fishers: per-tensor max |diff|
    OMP_NUM_THREADS=1 python scripts/regmean_peer_check.py --speed   # RegMean on the hard preset's 7 experts, timed

FusionBench runs in its own virtual environment (``--fb-python``, default /tmp/fbvenv/bin/python) in a subprocess, on
tensors handed over with ``torch.save``; this environment never imports it. Definitional differences (padding
tokens, fp32 inverse, the Fisher floor and normalisation) are documented in ``adamerge.methods.regmean`` and
``adamerge.methods.fisher``; here the inputs are chosen where the definitions match, and the Fisher floor is
compared both as is and moved (FusionBench's ``F + eps`` given ``max(F, eps) - eps``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import torch

FB_CODE = textwrap.dedent(
    """
    import json, sys, time, torch
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights, regmean_merging
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    mode, path, out = sys.argv[1:4]
    state = torch.load(path)
    if mode == "tensors":
        params = {n: list(v) for n, v in state["weights"].items()}
        result = {"regmean": merging_with_regmean_weights(params, state["grams"], state["alpha"])}
        k = len(state["fishers"])
        for key, fishers in (("fisher", state["fishers"]), ("fisher_moved", state["fishers_moved"])):
            result[key] = merging_with_fisher_weights(
                params, fishers, torch.ones(k) / k, normalize_fisher_weight=False, minimal_fisher_weight=state["eps"]
            )
        torch.save(result, out)
    else:
        from transformers import BertForSequenceClassification

        class Trainer:  # what regmean_merging asks of a Hugging Face trainer
            def __init__(self, batches):
                self.batches, self._train_batch_size = batches, len(batches[0]["input_ids"])
            def get_train_dataloader(self):
                return self.batches
            def _prepare_inputs(self, inputs):
                return inputs

        torch.set_num_threads(1)
        models = [BertForSequenceClassification.from_pretrained(f).eval() for f in state["folders"]]
        trainers = [Trainer(state["batches"][t]) for t in state["tasks"]]
        times, cpu, merged = [], [], None
        for _ in range(state["repeats"]):
            start, start_cpu = time.perf_counter(), time.process_time()
            merged = regmean_merging(models, trainers, ["classifier.*"], [state["examples"]] * len(models), state["alpha"])
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        torch.save({"times": times, "cpu": cpu, "merged": merged}, out)
    """
)


def fusion_bench(mode: str, state: dict, fb_python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "in.pt"), Path(tmp, "out.pt")
        torch.save(state, inp)
        subprocess.run([fb_python, "-c", FB_CODE, mode, str(inp), str(out)], check=True)
        return torch.load(out)


def tensor_check(fb_python: str) -> dict:
    """Seeded linear layers, Grams (X^T X / n, n > d) and Fishers; FusionBench's merge functions vs ours."""
    from adamerge.methods.fisher import fisher_merge
    from adamerge.methods.regmean import regmean

    g = torch.Generator().manual_seed(0)
    k, alpha, eps = 3, 0.9, 1e-6
    shapes = {"l0": (6, 5), "l1": (4, 6), "l2": (8, 8)}
    base = {f"{m}.weight": torch.randn(s, generator=g) for m, s in shapes.items()}
    base |= {f"{m}.bias": torch.randn(s[0], generator=g) for m, s in shapes.items()}
    tau = {n: 0.1 * torch.randn(k, *t.shape, generator=g) for n, t in base.items()}
    weights = {n: base[n] + tau[n] for n in base}  # [K, *shape]
    grams = []
    for _ in range(k):
        xs = {m: torch.randn(50, s[1], generator=g) for m, s in shapes.items()}
        grams.append({m: x.T @ x / len(x) for m, x in xs.items()})
    fishers = [{n: torch.rand(t.shape, generator=g) ** 4 for n, t in base.items()} for _ in range(k)]
    moved = [{n: f.clamp_min(eps) - eps for n, f in fisher.items()} for fisher in fishers]
    state = {"weights": weights, "grams": grams, "alpha": alpha, "fishers": fishers, "fishers_moved": moved, "eps": eps}
    theirs = fusion_bench("tensors", state, fb_python)

    ours = {}
    for n in base:
        module = n.rsplit(".", 1)[0]
        if n.endswith(".weight"):
            stack = torch.stack([grams[i][module] for i in range(k)]).double()
            ours[n] = base[n].double() + regmean(stack, tau[n].double(), alpha)
        else:
            ours[n] = base[n] + tau[n].mean(0)  # the paper: other tensors averaged
    fisher_stack = {n: torch.stack([f[n] for f in fishers]) for n in base}
    ours_fisher = {n: base[n] + fisher_merge(tau[n], fisher_stack[n], eps) for n in base}
    report = {}
    for key, mine in (("regmean", ours), ("fisher", ours_fisher), ("fisher_moved", ours_fisher)):
        report[key] = {n: float((mine[n].double() - theirs[key][n].double()).abs().max()) for n in base}
    return report


def speed_check(fb_python: str, repeats: int, examples: int, alpha: float) -> dict:
    """RegMean statistics + solve on the hard preset's 7 cached MiniLM experts, ours and FusionBench's, on the same
    batches."""
    from adamerge.methods.regmean import RegMean
    from adamerge.methods.statistics import calibration_batches
    from adamerge.testbeds.minilm import Recipe, build_experts, expert_pool, preset_experts
    from adamerge.testbeds.text_tasks import text_tasks_datamodule

    torch.set_num_threads(1)
    experts = preset_experts("hard")
    tasks, recipe = experts["tasks"], Recipe(**experts["recipe"])
    pool = expert_pool(tasks, recipe, device="cpu")
    data = text_tasks_datamodule(tasks, max_length=64, batch_size=16, seed=0)
    data.setup("fit")
    run = SimpleNamespace(pool=pool, data=data, cfg=None)
    method = RegMean("regmean", reduce_non_diagonal_ratio=alpha, num_examples=examples)
    ours, ours_cpu, deltas = [], [], None
    for _ in range(repeats):  # wall and CPU time: on a shared machine the CPU time is the steadier of the two
        start, start_cpu = time.perf_counter(), time.process_time()
        deltas = method.deltas(run)
        ours.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - start_cpu)
    folders = build_experts(tasks, recipe, device="cpu")  # the pool's own folders (cached: no training)
    batches = {
        t: [dict(b) for b in calibration_batches(data.calib[t], examples, 16, data.pad_id, data.seed)] for t in tasks
    }
    state = {
        "folders": [str(folders[t]) for t in tasks],
        "tasks": tasks,
        "batches": batches,
        "examples": examples,
        "alpha": alpha,
        "repeats": repeats,
    }
    theirs = fusion_bench("speed", state, fb_python)
    base = pool.base_tensors()
    # the pool's names are the model's own (bert.encoder...), as are FusionBench's: compared name for name
    diffs = {n: float((base[n] + deltas[n] - theirs["merged"][n]).abs().max()) for n in deltas if n in theirs["merged"]}
    if not diffs:
        raise SystemExit(f"no tensor names in common: ours {sorted(deltas)[:3]}, theirs {sorted(theirs['merged'])[:3]}")
    return {
        "ours_s": ours,
        "fusionbench_s": theirs["times"],
        "ours_median_s": statistics.median(ours),
        "fusionbench_median_s": statistics.median(theirs["times"]),
        "ours_cpu_s": ours_cpu,
        "fusionbench_cpu_s": theirs["cpu"],
        "ours_cpu_median_s": statistics.median(ours_cpu),
        "fusionbench_cpu_median_s": statistics.median(theirs["cpu"]),
        "tokens_note": "ours skips padding tokens, FusionBench counts them: the merges differ by that (max |diff| below)",
        "max_abs_diff_real_experts": max(diffs.values()) if diffs else None,
        "compared_tensors": len(diffs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fb-python", default="/tmp/fbvenv/bin/python")
    parser.add_argument("--speed", action="store_true", help="time RegMean on the hard preset's experts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=256, help="calibration examples per task (FusionBench's 256)")
    parser.add_argument("--alpha", type=float, default=0.9)
    args = parser.parse_args()
    if args.speed:
        print(json.dumps(speed_check(args.fb_python, args.repeats, args.examples, args.alpha), indent=2))
        return
    report = tensor_check(args.fb_python)
    for key, per_tensor in report.items():
        print(f"{key}: max |diff| per tensor")
        for name, diff in per_tensor.items():
            print(f"  {name:<12} {diff:.2e}")


if __name__ == "__main__":
    main()
