"""lm-evaluation-harness tasks as an evaluator: any lm-eval task list judges the merge in memory, no export round trip.

The merge runs inside the base's own Hugging Face module: ``host`` swaps the merged tensors in for the duration of
one lm-eval run and puts the base's parameters back after (no copy: the module points at the merged tensors; a merged
model whose params are not plain tensors, e.g. LoRA factors, is materialized once with ``merge_and_unload``). lm-eval's
``HFLM`` drives that module as it would any loaded checkpoint, so log-likelihood, multiple-choice and generation tasks
all work, built in or local (``include_path``: a folder of task YAMLs, e.g. over local jsonl files, offline).

Rows of the results table: lm-eval task names are not expert names, so the floor, task arithmetic and every merge are
judged on all ``tasks``; the row "expert (own task)" holds an lm-eval task only where ``expert_tasks`` names the expert
it belongs to (its normalized score, ``adamerge.evaluation.results``, is NaN elsewhere and left out of the average).
Requires the ``[lm-eval]`` extra: ``pip install 'adamerge[lm-eval]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call itself swaps with

from adamerge.core.merged import MergedModel
from adamerge.core.merged_base import MergedModelBase
from adamerge.evaluation.protocol import Evaluator, Metric, Scores

log = logging.getLogger(__name__)

INSTALL = "pip install 'adamerge[lm-eval]'"


def require_lm_eval():
    """The ``lm_eval`` package, or an error saying how to install it (before any model is loaded)."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"evaluator=lm_eval needs lm-evaluation-harness: {INSTALL}") from error
    return lm_eval


def metric_direction(name: str, overrides: Mapping[str, bool]) -> bool:
    """Whether higher is better for ``name`` (``acc`` or ``acc,none``): the override, else lm-eval's registry."""
    base = name.split(",")[0]
    if name in overrides or base in overrides:
        return bool(overrides.get(name, overrides.get(base)))
    from lm_eval.api.registry import is_higher_better

    direction = is_higher_better(base)
    if direction is None:
        raise ValueError(
            f"lm-eval does not know whether higher {base!r} is better; "
            f"set evaluator.higher_is_better: {{{base}: true}} (or false)"
        )
    return direction


def pick_metric(results: Mapping[str, Any], name: str, task: str) -> float:
    """One metric from an lm-eval task's results, whose keys are ``<metric>,<filter>`` (e.g. ``acc,none``).

    ``name`` is either the full key or the bare metric: that matches the key with filter ``none``, or the only key
    of that metric. Ambiguity (several filters, e.g. gsm8k's) is an error, never a guess.
    """
    if name in results:
        return float(results[name])
    keys = [k for k in results if k.split(",")[0] == name]
    if f"{name},none" in keys:
        return float(results[f"{name},none"])
    if len(keys) == 1:
        return float(results[keys[0]])
    available = sorted(k for k in results if "," in k and "_stderr" not in k)
    if not keys:
        raise KeyError(f"lm-eval task {task!r} has no metric {name!r} (it has {available}); fix evaluator.metrics")
    raise KeyError(
        f"lm-eval task {task!r} reports {name!r} under several filters {keys}; name one in evaluator.metrics"
    )


def task_scores(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], metrics: Sequence[str]) -> Scores:
    """adamerge's ``{task: {metric: value}}`` from ``results["results"]`` of an lm-eval run."""
    return {task: {m: pick_metric(results[task], m, task) for m in metrics} for task in tasks}


def host(model: MergedModelBase, params: Any) -> tuple[nn.Module, AbstractContextManager]:
    """The Hugging Face module that runs the merge ``params`` for lm-eval, and the context it runs it in.

    A ``MergedModel``'s params are ``{name: merged tensor}``: inside the context they stand in for the base's
    parameters by reference (tied weights follow), as ``functional_call`` swaps them for one forward, and the base's
    own parameters are back on exit. Any other merged model is materialized once (``merge_and_unload``: one extra copy
    of the model). The module is handed out before the context opens: lm-eval re-ties its weights when it wraps it,
    which must happen on the base's own parameters.
    """
    if isinstance(model, MergedModel):
        return model.model, _reparametrize_module(model.model, dict(params), tie_weights=True, strict=False)
    return model.merge_and_unload(params=params).eval(), nullcontext()


class LMEval(Evaluator):
    """lm-evaluation-harness tasks on the merged model (in memory); the first of ``metrics`` is the primary one.

    Args:
        tasks: lm-eval task (or group) names, e.g. ``[hellaswag, arc_easy]`` or local ones from ``include_path``.
        include_path: a folder of local task YAMLs (added to lm-eval's index).
        include_defaults: also index lm-eval's built-in tasks (about 15k names, ~20 s); false when every task is
            local.
        metrics: lm-eval metric names as the results table columns, without (``acc``) or with (``exact_match,
            strict-match``) lm-eval's filter.
        higher_is_better: metric -> direction, for metrics lm-eval's registry does not know.
        expert_tasks: lm-eval task -> the expert it belongs to: the row "expert (own task)" judges that expert on
            that task (the ceiling of the normalized score); tasks without one have no expert reference.
        tokenizer: a tokenizer name/folder or object; None = the data's (``data.tokenizer``).
        batch_size: lm-eval's batch size (an int, or ``auto``).
        limit: at most this many documents per task (a float < 1: that fraction); None = all.
        num_fewshot: few-shot examples per prompt; None = each task's own default (0 if it has none).
        fewshot_seed: the seed of lm-eval's few-shot sampler (lm-eval's default); the global RNGs are left alone.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        include_path: str | None = None,
        include_defaults: bool = True,
        metrics: Sequence[str] = ("acc",),
        higher_is_better: Mapping[str, bool] | None = None,
        expert_tasks: Mapping[str, str] | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 16,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        fewshot_seed: int = 1234,
    ):
        require_lm_eval()
        self.tasks = list(tasks or [])
        if not self.tasks:
            raise ValueError("no lm-eval tasks given; list them under evaluator.tasks")
        if include_path is not None and not Path(include_path).is_dir():
            raise ValueError(f"evaluator.include_path {include_path!r} is not a folder of lm-eval task YAMLs")
        if not metrics:
            raise ValueError("no metric given; list lm-eval metric names under evaluator.metrics (e.g. [acc])")
        self.expert_tasks = dict(expert_tasks or {})
        unknown = set(self.expert_tasks) - set(self.tasks)
        if unknown:
            raise ValueError(f"evaluator.expert_tasks names {sorted(unknown)}, not in evaluator.tasks {self.tasks}")
        overrides = dict(higher_is_better or {})
        self.metrics = tuple(Metric(m, metric_direction(m, overrides)) for m in metrics)
        self.include_path, self.include_defaults = include_path, include_defaults
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_size, self.limit, self.num_fewshot, self.fewshot_seed = batch_size, limit, num_fewshot, fewshot_seed
        self._task_manager = None

    @property
    def task_manager(self):
        """lm-eval's task index (built once: indexing the built-in tasks takes seconds)."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)
        return self._task_manager

    def check(self, data) -> None:
        if self.tokenizer is None and getattr(data, "tokenizer", None) is None:
            raise ValueError("evaluator=lm_eval needs a tokenizer: set evaluator.tokenizer (or data.tokenizer)")
        experts = set(data.task_names)
        strangers = {t: e for t, e in self.expert_tasks.items() if e not in experts}
        if strangers:
            raise ValueError(f"evaluator.expert_tasks maps to {strangers}, not experts of this run ({sorted(experts)})")
        missing = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if missing:
            where = f"in {self.include_path!r}" if self.include_path else "(no evaluator.include_path)"
            builtin = "" if self.include_defaults else " with evaluator.include_defaults=false"
            raise ValueError(f"lm-eval knows no task {missing} {where}{builtin}; fix evaluator.tasks")

    def selected(self, tasks: Iterable[str] | None) -> list[str]:
        """The lm-eval tasks to run for ``tasks``: all of them for None, else those named or mapped to a named expert."""
        if tasks is None:
            return list(self.tasks)
        names = set(tasks)
        return [t for t in self.tasks if t in names or self.expert_tasks.get(t) in names]

    def evaluate(self, model: MergedModelBase, params: Any, data, tasks: Iterable[str] | None = None) -> Scores:
        """``{lm-eval task: {metric: value}}`` for the merge ``params``: one lm-eval run over the selected tasks."""
        names = self.selected(tasks)
        if not names:
            return {}
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        model.eval()
        try:
            module, running = host(model, params)
            lm = HFLM(pretrained=module, tokenizer=self.tokenizer or data.tokenizer, batch_size=self.batch_size)
            log.info("lm-eval: %s on %d task(s)", type(module).__name__, len(names))
            with running:
                results = evaluate(
                    lm=lm, task_dict=self.load_tasks(names), limit=self.limit, bootstrap_iters=0, log_samples=False
                )
        finally:
            model.train(was_training)
        return task_scores(results["results"], names, [m.name for m in self.metrics])

    def load_tasks(self, names: Sequence[str]) -> dict:
        """lm-eval's task dict for ``names``, with this evaluator's few-shot count and sampler seed."""
        loaded_tasks = self.task_manager.load(list(names))
        for task in loaded_tasks["tasks"].values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.fewshot_seed)
        return loaded_tasks


def load_tokenizer(tokenizer: Any):
    """A tokenizer object from a name/folder (``AutoTokenizer``); objects and None pass through."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)
