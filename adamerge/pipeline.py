"""One run, as a straight line of ``instantiate`` calls: pool -> (transform) -> merge or learn -> evaluate -> export.

Every artifact goes into ``cfg.paths.output_dir`` (the Hydra run dir): results.csv/md, coefficients.json/png,
the merged model, and Lightning checkpoints of the coefficients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adamerge.artifacts.atomic import check_writable, write_json
from adamerge.artifacts.export import coefficients_record, export_model
from adamerge.artifacts.plots import coefficient_heatmap
from adamerge.core.lora_merged import LoraMergedModel
from adamerge.core.lora_pool import LoraPool
from adamerge.core.merged import MergedModel
from adamerge.engine.train import learn
from adamerge.evaluation.classification import evaluate, reference_rows, summarize, to_markdown, write_results

log = logging.getLogger(__name__)


def check_tasks(experts: list[str], tasks: list[str]) -> None:
    """Every data task needs an expert (and its head), and every expert a task to calibrate on."""
    if set(experts) != set(tasks):
        raise ValueError(
            f"tasks in data ({sorted(tasks)}) and experts ({sorted(experts)}) differ: without data "
            f"{sorted(set(experts) - set(tasks))}, without expert {sorted(set(tasks) - set(experts))}; "
            "name each data task after its expert (config keys: data.tasks, experts.experts)"
        )


def run(cfg: DictConfig) -> dict:
    """Run one merge as configured; returns the summary table rows."""
    out_dir = check_writable(cfg.paths.output_dir)
    torch.manual_seed(cfg.seed)
    method = cfg.method
    pool = instantiate(cfg.experts)
    datamodule = instantiate(cfg.data, num_steps=method.get("steps", 0) or 0)
    check_tasks(pool.experts, datamodule.task_names)
    datamodule.setup("fit")
    loaders = datamodule.eval_dataloaders()

    rows = {}
    if cfg.evaluate:
        rows |= reference_rows(merged_model(pool, granularity="task"), loaders, cfg.reference_lambda)
    if isinstance(pool, LoraPool) and (method.get("transform") or not method.learned):
        raise ValueError(
            f"method {method.name!r} needs dense task vectors; LoRA-native experts (experts=lora) "
            "support learned methods without transform; use experts=hf to densify the adapters"
        )
    if method.get("transform"):
        pool = instantiate(method.transform)(pool)

    if method.learned:
        merged = build_merged(method, pool)
        if method.get("chunking"):  # Expert Merging++: a layer-wise pass (one chunk per tensor) sets the chunks
            from adamerge.methods.chunking import chunked_model

            learn(cfg, merged, datamodule, steps=method.chunking.layer_steps, quiet=True)
            merged = chunked_model(merged, pool, instantiate(method.chunking.allocate)(merged))
        if cfg.evaluate:
            rows[f"{method.name} (init, before training)"] = evaluate(merged, merged.merged_tensors(), loaders)
        trainer = learn(cfg, merged, datamodule)
        params = merged.merged_tensors()
        record = coefficients_record(merged)
        write_json(out_dir / "coefficients.json", record)
        coefficient_heatmap(record["coefficients"], out_dir / "coefficients.png", title=method.name)
        log_image(trainer, out_dir / "coefficients.png")
    else:
        merged = merged_model(pool, granularity="task")
        params = instantiate(method.merge)(pool)
        record = {"method": method.name, "merge": OmegaConf.to_container(method.merge, resolve=True)}
        trainer = None

    table = []
    if cfg.evaluate:
        rows[method.name] = evaluate(merged, params, loaders)
        table = summarize(rows)
        write_results(table, out_dir)
        log.info("results (%s):\n%s", out_dir, to_markdown(table))
        log_results(trainer, table)
    if cfg.export:
        heads = {task: merged.head(task) for task in merged.experts}
        export_model(merged.merge_and_unload(params=params), out_dir / "merged", heads, record, pool.base_source)
    return {"table": table, "output_dir": str(out_dir), "coefficients": record}


def merged_model(
    pool,
    storage: str = "resident",
    rank=None,
    energy=None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    **kwargs,
) -> MergedModel | LoraMergedModel:
    """The functional merged model for a pool: dense task vectors, or LoRA factors composed without densifying."""
    if isinstance(pool, LoraPool):
        if storage != "resident":
            raise ValueError("LoRA factors are small and always resident; set method.storage=resident")
        if activation_checkpointing or compile:
            raise ValueError(
                "activation checkpointing and compile are for dense experts; set method.activation_checkpointing=false "
                "and method.compile=false"
            )
        return LoraMergedModel(pool, **kwargs)
    options = dict(activation_checkpointing=activation_checkpointing, compile=compile)
    return MergedModel(pool, storage=storage, rank=rank, energy=energy, **options, **kwargs)


def build_merged(method: DictConfig, pool) -> MergedModel | LoraMergedModel:
    """The learnable merged model as ``method`` configures it."""
    return merged_model(
        pool,
        granularity=method.granularity,
        init=method.init,
        parametrization=method.parametrization,
        clamp=tuple(method.clamp) if method.clamp is not None else None,
        chunks=method.get("chunks", 1),
        storage=method.storage,
        rank=method.get("rank"),
        energy=method.get("energy"),
        activation_checkpointing=method.get("activation_checkpointing", False),
        compile=method.get("compile", False),
        **({"block_pattern": method.block_pattern} if method.get("block_pattern") else {}),
    )


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


def log_image(trainer, path: Path) -> None:
    for logger in trainer.loggers if trainer is not None else []:
        if hasattr(logger, "log_image"):
            logger.log_image("coefficients", [str(path)])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            import matplotlib.image as mpimg

            logger.experiment.add_image("coefficients", mpimg.imread(path)[..., :3], dataformats="HWC")
