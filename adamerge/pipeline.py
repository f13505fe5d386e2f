"""One run, as a straight line: check the config -> pool -> data -> references -> method.merge -> evaluate -> write.

Nothing here depends on a method's kind: a method (``adamerge.methods``) returns a ``MergeResult`` that is evaluated
by the configured evaluator (``adamerge.evaluation``) and exported through the merged-model protocol. Every artifact
goes into ``cfg.paths.output_dir`` (the Hydra run dir): results.csv/md, coefficients.json/png, the merged model, and
Lightning checkpoints of the coefficients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from adamerge.artifacts.plots import log_images, write_run_plots
from adamerge.artifacts.run_dir import claim_run_dir, staged_outputs
from adamerge.atomic import write_json
from adamerge.core.factory import merged_model, pool_kind
from adamerge.engine.train import calibration_loss
from adamerge.evaluation.protocol import reference_rows
from adamerge.evaluation.results import summarize, to_markdown, write_results
from adamerge.methods.registry import ConfigError, Run, build_method, get_spec

log = logging.getLogger(__name__)


def check_tasks(experts: list[str], tasks: list[str]) -> None:
    """Every data task needs an expert (and its head), and every expert a task to calibrate on."""
    if set(experts) != set(tasks):
        raise ValueError(
            f"tasks in data ({sorted(tasks)}) and experts ({sorted(experts)}) differ: without data "
            f"{sorted(set(experts) - set(tasks))}, without expert {sorted(set(tasks) - set(experts))}; "
            "name each data task after its expert (config keys: data.tasks, experts.experts)"
        )


def check_pool(method, kind: str | None) -> None:
    """A method (or the transform a learner runs over: ``method.transform``) that needs dense task vectors cannot run
    on LoRA factors: say so before loading anything."""
    first_pass = getattr(method, "first_pass", None)
    for name in [method.name] + ([first_pass.name] if first_pass is not None else []):
        if kind == "lora" and get_spec(name).needs.dense:
            raise ConfigError(
                f"method {name!r} needs dense task vectors; LoRA-native experts (experts=lora) give factors only. "
                "Use experts=hf with the same adapter folders (densified on load), or a method that takes LoRA "
                "factors (adamerge methods)"
            )


def union_tokenizer(cfg: DictConfig, pool) -> dict:
    """Experts added tokens (``adamerge.core.vocab``): the data is tokenized with the merged vocabulary, in which an
    added token may have another id than in the expert's own tokenizer."""
    vocab = getattr(pool, "vocab", None)  # LoRA pools have none
    if vocab is None or "tokenizer" not in cfg.data:
        return {}
    log.info("data: tokenized with the union of the experts' vocabularies (%d added tokens)", len(vocab.added))
    return {"tokenizer": vocab.tokenizer}


def chat_prompts(cfg: DictConfig, evaluator) -> dict:
    """``data.chat_template=null`` (when the tokenizer has one) is for language models: an evaluator that reads raw
    text (a classifier) keeps its calibration text raw too, even on a chat model's tokenizer. ``true`` is obeyed."""
    if "chat_template" in cfg.data and cfg.data.chat_template is None and not evaluator.chat_prompts:
        return {"chat_template": False}
    return {}


def run(cfg: DictConfig) -> dict:
    """Run one merge as configured; returns the summary table, the output dir, the coefficient record and the
    calibration objective (what sweeps minimise). One output directory holds one run (``claim_run_dir``)."""
    if rank_zero_only.rank != 0:  # data-parallel ranks train; rank 0 alone owns the directory, judges and writes
        return merge_and_judge(cfg, Path(cfg.paths.output_dir))
    with claim_run_dir(cfg.paths.output_dir, resume=cfg.ckpt_path is not None) as out_dir:
        return merge_and_judge(cfg, out_dir)


def merge_and_judge(cfg: DictConfig, out_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method)  # typed options, checked before any work
    check_pool(method, pool_kind(cfg.experts._target_))
    evaluator = instantiate(cfg.evaluator)
    pool = instantiate(cfg.experts)
    check_pool(method, pool_kind(pool))
    data = instantiate(
        cfg.data, num_steps=method.calibration_steps, **union_tokenizer(cfg, pool), **chat_prompts(cfg, evaluator)
    )
    check_tasks(pool.experts, data.task_names)
    data.setup("fit")
    if cfg.evaluate:
        evaluator.check(data)

    rows = {}
    if cfg.evaluate and rank_zero_only.rank == 0:
        rows |= reference_rows(merged_model(pool, granularity="task"), evaluator, data, cfg.reference_lambda)
    result = method.merge(Run(cfg, pool, data))
    if rank_zero_only.rank != 0:
        return {"table": [], "output_dir": str(out_dir), "coefficients": result.record, "calibration_loss": None}

    table, objective = [], None
    if cfg.evaluate:
        if result.init_coefficients is not None:
            init = result.model.merged_tensors(result.init_coefficients)
            rows[f"{method.name} (init, before training)"] = evaluator.evaluate(result.model, init, data)
        rows[method.name] = evaluator.evaluate(result.model, result.params, data)
        if result.task_params is not None:  # each task judged through its own merge (e.g. its TALL mask)
            per_task = rows[f"{method.name} (per-task)"] = {}
            for task, params in result.task_params.items():  # keyed by what the evaluator judges for that expert
                if task in data.eval:
                    per_task |= evaluator.evaluate(result.model, params, data, [task])
        table = summarize(rows, evaluator.metrics)
        log.info("results (%s):\n%s", out_dir, to_markdown(table, evaluator.primary))
        log_results(result.trainer, table)
    if cfg.calibration_batches:
        objective = calibration_loss(cfg, result.model, result.params, data, cfg.calibration_batches)
        log.info("calibration objective of the merge: %.6g (%d batches per task)", objective, cfg.calibration_batches)
    # Results, coefficients and the merged model appear together, or (killed midway) not at all.
    with staged_outputs(out_dir) as stage:
        if table:
            write_results(table, stage, evaluator.primary)
        write_json(stage / "coefficients.json", result.record)
        metric = evaluator.primary
        coefficients = result.record if result.coefficients is not None else None
        pictures = write_run_plots(
            stage, table, coefficients, metric.name, metric.higher_is_better, out_dir, method.name
        )
        if result.write_artifacts is not None:
            result.write_artifacts(stage)
        if cfg.export:
            result.model.export(stage / "merged", result.params, result.record, pool.base_source)
    if result.trainer is not None:
        log_images(result.trainer.loggers, [out_dir / p.name for p in pictures], step=result.trainer.global_step)
    return {"table": table, "output_dir": str(out_dir), "coefficients": result.record, "calibration_loss": objective}


def log_results(trainer, table: list[dict]) -> None:
    """Send the results table to the run's loggers (metrics for all; a table for W&B)."""
    if trainer is None or not trainer.loggers:
        return
    metrics = {f"results/{row['method']}/{k}": v for row in table for k, v in row.items() if isinstance(v, float)}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        if hasattr(logger, "log_table"):
            columns = list(dict.fromkeys(k for row in table for k in row))
            logger.log_table("results", columns=columns, data=[[row.get(c) for c in columns] for row in table])
        logger.save()
