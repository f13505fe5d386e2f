"""Model-family adapters: CLIP zero-shot image classification, the vision setting of task arithmetic and AdaMerging.

The CLIP vision tower is merged; each task reads it through a frozen zero-shot head built once from the base's
text tower (class names x prompt templates). Fine-tuned vision experts, such as FusionBench's
``tanganke/clip-vit-base-patch32_<task>`` (saved as ``CLIPVisionModel``), align with the base by tensor name: the
head is the only per-task tensor, swapped in by ``MergedModel`` like a classification head.
Task arithmetic: https://arxiv.org/abs/2212.04089, AdaMerging: https://arxiv.org/abs/2310.02575
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.core.pool import ExpertPool, PoolError, make_pool

log = logging.getLogger(__name__)

# A few of CLIP's ImageNet prompts (https://github.com/openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "art of the {}.",
)
# Vision experts carry no projection (FusionBench fine-tunes the tower only), and transformers < 4.31 saved the
# position ids, which are not weights.
DEFAULT_EXCLUDE = ("visual_projection.*", "*position_ids")


class ZeroShotHead(nn.Module):
    """Frozen class embeddings ``weight`` [C, P]: logits = normalize(image_embeds) @ weight.T.

    ``weight`` is a buffer, so it never trains nor merges; ``functional_call`` swaps it per task (any C).
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, embeds: Tensor) -> Tensor:
        # Cosine logits with a logit scale of ~100: computed in float32 even under bf16 autocast.
        with torch.autocast(embeds.device.type, enabled=False):
            embeds = embeds.float()  # (B, P)
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            return embeds @ self.weight.float().T  # (B, C)


class ZeroShotImageClassifier(nn.Module):
    """CLIP vision tower + projection + zero-shot head: ``forward(pixel_values) -> logits`` [B, C].

    Parameter names are those of Hugging Face CLIP checkpoints (``vision_model.*``, ``visual_projection.weight``),
    so ``CLIPVisionModel`` experts line up by name; ``base_model_prefix`` lets the pool also match experts saved
    without the ``vision_model.`` prefix (transformers >= 5 saves ``CLIPVisionModel`` that way).

    Args:
        vision_model: ``CLIPModel.vision_model``.
        visual_projection: ``CLIPModel.visual_projection`` (hidden -> projection dim, no bias).
        head: [num_classes, projection_dim] class embeddings, see ``zero_shot_head``.
        config: the vision config, with ``projection_dim`` set; used by ``save_pretrained`` and by the pool's
            architecture check against the experts' ``config.json``.
    """

    base_model_prefix = "vision_model"

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: Tensor, config=None):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = ZeroShotHead(head)
        self.config = config

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # (B, D)
        return self.head(self.visual_projection(pooled))  # (B, P) -> (B, C)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Save tower + projection as a ``CLIPVisionModelWithProjection`` folder; heads are saved per task apart."""
        from transformers import CLIPVisionModelWithProjection

        if self.config is None:
            raise ValueError("ZeroShotImageClassifier has no config; build it with clip_zero_shot_classifier()")
        model = CLIPVisionModelWithProjection(self.config)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=True)
        model.save_pretrained(save_directory, **kwargs)


def text_embeddings(clip_model: nn.Module, tokenizer, texts: Sequence[str]) -> Tensor:
    """Projected CLIP text embeddings [len(texts), P] (not normalised)."""
    device = clip_model.logit_scale.device
    max_length = clip_model.config.text_config.max_position_embeddings
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = clip_model.get_text_features(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    )
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers < 5 returns the tensor


@torch.no_grad()
def zero_shot_head(clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """The zero-shot classifier of CLIP [num_classes, P], logit scale folded in.

    Row c = exp(logit_scale) * normalize(mean_t normalize(text(template_t.format(class_c)))), so that
    ``normalize(image_embeds) @ head.T`` are CLIP's ``logits_per_image`` (exactly so with a single template).

    Args:
        clip_model: a ``transformers.CLIPModel``.
        tokenizer: its tokenizer.
        classnames: one name per class, in label order.
        templates: prompts with one ``{}`` for the class name, e.g. ``"a photo of a {}."``.
    """
    if not classnames:
        raise ValueError("no class names given")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"templates need one '{{}}' for the class name; got {list(templates)} (config key: experts.templates)"
        )
    rows = []
    for name in classnames:
        emb = text_embeddings(clip_model, tokenizer, [t.format(name) for t in templates]).float()  # (T, P)
        mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)  # (P,)
        rows.append(mean / mean.norm())
    return torch.stack(rows) * clip_model.logit_scale.float().exp()  # (C, P)


def clip_zero_shot_classifier(clip_model: nn.Module, head: Tensor) -> ZeroShotImageClassifier:
    """The vision half of a ``CLIPModel`` (shared, not copied) with ``head``."""
    config = copy.deepcopy(clip_model.config.vision_config)
    config.projection_dim = clip_model.config.projection_dim  # the vision config's own default is not the model's
    return ZeroShotImageClassifier(clip_model.vision_model, clip_model.visual_projection, head, config)


def dataset_classnames(source, task: str, label_column: str = "label", split: str = "test") -> list[str]:
    """Class names of ``label_column`` (a ``datasets.ClassLabel``) in one split of a task's dataset."""
    import datasets

    from adamerge.engine.datasets import load_split

    dataset = load_split(source, split, task)
    feature = dataset.features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        found = "missing" if feature is None else f"a {type(feature).__name__}, not a ClassLabel"
        raise ValueError(
            f"task {task!r}: label column {label_column!r} of split {split!r} is {found}, so it has no class names; "
            f"fix data.label_column or give the names under experts.classnames.{task}"
        )
    return list(feature.names)


def clip_zero_shot_pool(
    base: str,
    experts: Mapping[str, str | Path | nn.Module | Mapping[str, Tensor]],
    tasks: Mapping[str, object] | None = None,
    label_column: str = "label",
    split: str = "test",
    templates: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_TEMPLATES,
    classnames: Mapping[str, Sequence[str]] | None = None,
    tokenizer: str | None = None,
    model_kwargs: Mapping | None = None,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    head_patterns: Iterable[str] = ("head.*",),
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    check_finite: bool = True,
) -> ExpertPool:
    """A pool of CLIP vision experts over ``ZeroShotImageClassifier``, with one zero-shot head per expert.

    Args:
        base: the ``CLIPModel`` (hub id or folder), e.g. ``openai/clip-vit-base-patch32``.
        experts: task name -> vision expert (``CLIPVisionModel`` folder or hub id, safetensors file, state dict).
        tasks: task name -> dataset source (as in ``data.tasks``) whose ``label_column`` names the classes.
        label_column / split: where the class names are read (a ``ClassLabel`` feature).
        templates: prompts for every task, or task -> prompts (tasks left out use ``DEFAULT_TEMPLATES``).
        classnames: task -> class names, used instead of the dataset's (for label columns without names).
        tokenizer: the text tokenizer (default: the base's).
        model_kwargs: extra ``CLIPModel.from_pretrained`` arguments.
        include / exclude / head_patterns / dtype / device / check_finite: as in ``make_pool``; by default every tensor of the
            vision tower is merged and the projection stays the base's.
    """
    from transformers import AutoTokenizer, CLIPModel

    tasks, classnames = dict(tasks or {}), dict(classnames or {})
    missing = [e for e in experts if e not in tasks and e not in classnames]
    if missing:
        raise PoolError(
            f"experts {missing} have no dataset to read class names from (experts.tasks = data.tasks) "
            f"nor experts.classnames; name each data task after its expert (tasks: {sorted(tasks)})"
        )
    if isinstance(templates, str):
        templates = [templates]

    clip = CLIPModel.from_pretrained(str(base), **dict(model_kwargs or {})).to(device).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or base))
    heads = {}
    for task in experts:
        names = classnames.get(task) or dataset_classnames(tasks[task], task, label_column, split)
        prompts = templates.get(task, DEFAULT_TEMPLATES) if isinstance(templates, Mapping) else templates
        heads[task] = zero_shot_head(clip, text_tokenizer, list(names), list(prompts))
        log.info("zero-shot head %r: %d classes x %d templates", task, len(names), len(prompts))

    model = clip_zero_shot_classifier(clip, next(iter(heads.values())))
    pool = make_pool(
        model,
        experts,
        include=include,
        exclude=exclude,
        head_patterns=head_patterns,
        dtype=dtype,
        device=device,
        base_source=str(base),
        check_finite=check_finite,
    )
    pool.heads = {e: dict(pool.heads.get(e, {})) | {"head.weight": heads[e]} for e in pool.experts}
    return pool
