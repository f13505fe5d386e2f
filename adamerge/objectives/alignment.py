"""Expert Merging's objective: align the merged model's logits and hidden states with each expert's, on its own data.

Expert Merging (Zhang et al., ICLR 2026, https://arxiv.org/abs/2509.25712) learns layer-wise coefficients from a
handful of unlabeled calibration samples per task (5-10 in the paper). For a sample of task k::

    loss_k = alpha_k * T^2 * KL(p_k^T || q^T)                       # logits, softened at temperature T
           + alpha_k * w_h * mean_{l in layers} MSE(h_l, h_l^(k))   # hidden states of the selected layers
    step  += gamma * mean |lam - lam_init|                           # pulls the coefficients to their init

where ``p_k`` is expert k's prediction and ``q`` the merged model's. Expert k needs no model of its own: it is the
merged model at the one-hot coefficient table ``lam = e_k`` (``theta_0 + tau_k``).

The targets (expert k's logits and hidden states, computed once and cached, or recomputed online) come from
``adamerge.objectives.teachers``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from adamerge.engine.datasets import MODEL_INPUTS, collate
from adamerge.objectives.entropy import logits_of
from adamerge.objectives.teachers import LayerSpec, OnlineTeacher, build_teacher_cache, output_rows, probe_layers

TEACHERS = ("cache", "online")


def distill_kl(student: Tensor, teacher: Tensor, ids: Tensor | None, temperature: float) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), in float32.

    With top-k targets (``ids``), the teacher distribution is renormalised over its k kept ids and compared with
    the student's full-vocabulary log-probabilities at those ids (a soft cross-entropy up to the teacher's
    entropy; equal to the full KL when k = V).
    """
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    if ids is not None:
        log_q = log_q.gather(-1, ids.long())
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class ExpertAlignment:
    """Expert Merging's objective (config ``objective=expert_alignment``); ``bind`` it to the model before training.

    Args:
        temperature: softmax temperature T of the logit term (scaled by T^2).
        hidden_weight: w_h, weight of the hidden-state MSE (0 disables it).
        coef_reg: gamma, weight of mean |lam - lam_init| (added once per step, split evenly over the tasks).
        alpha: task weights alpha_k: one number for all tasks, or task -> weight (missing tasks: 1).
        layers: hidden states to align: 'all', 'middle', 'last', an int or a list (see
            ``adamerge.objectives.teachers.select_layers``).
        top_k: cache only the top-k teacher logits per row (large vocabularies); ``None`` keeps all.
        teacher: ``cache`` (targets computed once) or ``online`` (recomputed every step; the reference).
        cache_dtype: storage dtype of cached targets.
        cache_dir: a folder to keep the cache on disk (read lazily); ``None`` keeps it in memory.
        batch_size: samples per teacher forward when building the cache.
        generate: causal LMs given prompts only: each expert appends its greedy response of up to this many tokens
            to its prompts (``adamerge.objectives.generation.with_expert_responses``) and the alignment covers the responses.
            Sets with a ``response_mask`` column are left as they are. ``None``: align on the samples as given.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        hidden_weight: float = 1.0,
        coef_reg: float = 0.0,
        alpha: float | Mapping[str, float] = 1.0,
        layers: LayerSpec = "middle",
        top_k: int | None = None,
        teacher: str = "cache",
        cache_dtype: str = "bfloat16",
        cache_dir: str | None = None,
        batch_size: int = 8,
        generate: int | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (config key: objective.temperature)")
        if hidden_weight < 0 or coef_reg < 0:
            raise ValueError("objective.hidden_weight and objective.coef_reg must be >= 0")
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; choose one of {TEACHERS} (config key: objective.teacher)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {top_k} (config key: objective.top_k)")
        self.temperature, self.hidden_weight, self.coef_reg = float(temperature), float(hidden_weight), coef_reg
        self.alpha = dict(alpha) if isinstance(alpha, Mapping) else alpha
        self.layer_spec = None if hidden_weight == 0 else layers
        self.top_k, self.teacher_kind = top_k, teacher
        self.cache_dtype, self.cache_dir, self.batch_size = cache_dtype, cache_dir, batch_size
        self.generate = generate
        self.datasets: dict | None = None
        self.teacher = None
        self.merged = None
        self.lam_init: Tensor | None = None

    @property
    def model_kwargs(self) -> dict:
        """Extra kwargs for the merged model's forward (MergeModule passes them): hidden states when aligned."""
        return {"output_hidden_states": True} if self.layer_spec is not None else {}

    def bind(self, merged, datamodule=None, datasets: Mapping | None = None, pad_id: int | None = None, experts=None):
        """Attach the model (for lam and lam_init) and build the teacher from the calibration sets.

        ``experts`` is the merged model whose one-hot tables are the experts (the teachers); default ``merged``.
        A learner over transformed task vectors (``method.transform``) passes the raw pool's model here, so that
        the merge is aligned with the real experts, not with their processed task vectors.

        ``datasets`` (task -> calibration dataset) defaults to ``datamodule.calib``, which the training batches'
        ``_index`` refers to. With ``generate``, the completed sets replace ``datamodule.calib`` (and are kept in
        ``self.datasets``), so that the training batches are the prompts with the experts' responses. Returns ``self``.
        """
        if datasets is None:
            if datamodule is None:
                raise ValueError("ExpertAlignment.bind needs a datamodule or the calibration datasets")
            datamodule.setup("fit")
            datasets = datamodule.calib
            pad_id = datamodule.pad_id if pad_id is None else pad_id
        pad_id = 0 if pad_id is None else pad_id
        teachers = merged if experts is None else experts
        if self.generate:
            from adamerge.objectives.generation import with_expert_responses

            prompts = {t: d for t, d in datasets.items() if "response_mask" not in d.column_names}
            datasets = dict(datasets) | with_expert_responses(teachers, prompts, self.generate, pad_id)
            if datamodule is not None:
                datamodule.calib.update(datasets)
        self.datasets = dict(datasets)
        self.merged = merged
        self.lam_init = merged.coefficients().detach().clone()
        if self.teacher_kind == "online":
            first = next(iter(datasets))
            row = datasets[first][0]
            inputs = collate([row], [c for c in datasets[first].column_names if c in MODEL_INPUTS], pad_id)
            inputs = {k: v.to(teachers.coefficients.raw.device) for k, v in inputs.items()}
            layers = probe_layers(teachers, first, inputs, self.layer_spec)
            self.teacher = OnlineTeacher(teachers, datasets, layers, self.top_k)
        else:
            self.teacher = build_teacher_cache(
                teachers,
                datasets,
                self.layer_spec,
                self.top_k,
                self.cache_dtype,
                self.batch_size,
                pad_id,
                self.cache_dir,
            )
        return self

    def task_weight(self, task: str) -> float:
        return self.alpha.get(task, 1.0) if isinstance(self.alpha, dict) else float(self.alpha)

    def __call__(self, outputs, task: str, batch: Mapping[str, Tensor]) -> Tensor:
        if self.teacher is None:
            raise RuntimeError("ExpertAlignment is not bound: call objective.bind(merged, datamodule) before training")
        target = self.teacher.targets(task, batch)
        device = logits_of(outputs).device
        rows, positions = target.rows.to(device), target.positions.to(device)
        logits, hidden = output_rows(outputs, rows, positions, self.teacher.layers)
        ids = None if target.ids is None else target.ids.to(device)
        loss = self.temperature**2 * distill_kl(logits, target.logits.to(device), ids, self.temperature)
        if hidden is not None:
            loss = loss + self.hidden_weight * (hidden.float() - target.hidden.to(device).float()).pow(2).mean()
        loss = self.task_weight(task) * loss
        if self.coef_reg:
            lam = self.merged.coefficients()
            reg = (lam - self.lam_init.to(lam.device)).abs().mean()
            loss = loss + self.coef_reg * reg / self.merged.num_experts
        return loss
