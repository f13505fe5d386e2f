"""CLIP zero-shot path: a tiny CLIP, its vision experts and image datasets built here (no network), checked against
the Hugging Face implementation and run through the real ``clip_vit_b32_8tasks`` experiment config."""

from __future__ import annotations

import json
import string

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from adamerge.cli import config_dir, register_resolvers
from adamerge.core.clip import ZeroShotImageClassifier, clip_zero_shot_pool, zero_shot_head
from adamerge.core.merged import MergedModel
from adamerge.core.pool import PoolError

TASKS = {"shapes": ["circle", "square"], "digits": ["zero", "one", "two"], "scenes": ["beach", "forest", "city", "sky"]}
TEMPLATE = ["a photo of a {}."]
REAL_TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
REAL_DATASETS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def tiny_tokenizer():
    """A character-level CLIP BPE (no merges) over lowercase ASCII: enough for prompts and class names."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {c: i for i, c in enumerate(chars)} | {f"{c}</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    layers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    text = dict(
        layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=40,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)
    ).eval()


def images(n: int, seed: int, mode: str):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if mode == "RGB" else (32, 32)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Folders: a tiny CLIP base (+ processor), one CLIPVisionModel expert per task, one image dataset per task."""
    import datasets
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPVisionModel

    root = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer()
    clip = tiny_clip(tokenizer)
    clip.save_pretrained(root / "base")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "base")

    experts, data = {}, {}
    for k, (task, names) in enumerate(TASKS.items()):
        expert = CLIPVisionModel(clip.config.vision_config)
        expert.load_state_dict(clip.vision_model.state_dict())
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts[task] = root / f"expert_{task}"
        if k == 1:  # the transformers 4 layout of FusionBench's checkpoints: keys under "vision_model."
            experts[task].mkdir()
            save_file(
                {f"vision_model.{n}": t.contiguous() for n, t in expert.state_dict().items()},
                str(experts[task] / "model.safetensors"),
            )
            expert.config.to_json_file(experts[task] / "config.json")
        else:
            expert.save_pretrained(experts[task])
        n = 12
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        test = datasets.Dataset.from_dict(
            {"image": images(n, k, "L" if task == "digits" else "RGB"), "label": [i % len(names) for i in range(n)]},
            features=features,
        )
        data[task] = root / f"data_{task}"
        datasets.DatasetDict({"test": test}).save_to_disk(str(data[task]))
    return {"base": root / "base", "experts": experts, "data": data}


def make_cfg(stand_ins, tmp_path, *overrides, tiny: bool = True):
    register_resolvers()
    swaps = []
    if tiny:
        experts = ", ".join(f"{t}: '{p}'" for t, p in stand_ins["experts"].items())
        data = ", ".join(f"{t}: '{p}'" for t, p in stand_ins["data"].items())
        swaps = [
            f"experts.base='{stand_ins['base']}'",
            "~experts.experts",
            f"+experts.experts={{{experts}}}",
            "~data.tasks",
            f"+data.tasks={{{data}}}",
            "data.eval_batch_size=8",
        ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=["experiment=clip_vit_b32_8tasks", f"paths.output_dir={tmp_path}", *swaps, *overrides]
        )


def pixels(stand_ins, n: int = 5) -> torch.Tensor:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(stand_ins["base"])
    return processor(images=images(n, 99, "RGB"), return_tensors="pt")["pixel_values"]


def test_experiment_config_names_fusionbench_checkpoints_and_paper_recipe(stand_ins, tmp_path):
    cfg = make_cfg(stand_ins, tmp_path, tiny=False)
    assert cfg.experts.base == "openai/clip-vit-base-patch32"
    assert dict(cfg.experts.experts) == {t: f"tanganke/clip-vit-base-patch32_{t}" for t in REAL_TASKS}
    assert dict(cfg.data.tasks) == {t: f"tanganke/{d}" for t, d in zip(REAL_TASKS, REAL_DATASETS)}
    assert cfg.data.processor == cfg.experts.base and cfg.data.tokenizer is None and cfg.data.image_column == "image"
    assert cfg.data.calib_split == cfg.data.eval_split == cfg.experts.split == "test"
    assert dict(cfg.experts.tasks) == dict(cfg.data.tasks)
    assert (cfg.method.name, cfg.method.init, list(cfg.method.clamp)) == ("adamerging", 0.3, [0.0, 1.0])
    assert (cfg.method.optimizer.lr, cfg.method.steps, cfg.data.batch_size) == (1e-3, 500, 16)
    assert cfg.trainer.precision in ("bf16-mixed", "32-true")


def test_tiny_stand_ins_instantiate_pool_and_datamodule(stand_ins, tmp_path):
    cfg = make_cfg(stand_ins, tmp_path)
    pool = instantiate(cfg.experts)
    assert pool.experts == list(TASKS)
    # every vision tensor is merged; the projection and the head are not
    vision = [n for n, _ in pool.model.vision_model.named_parameters()]
    assert sorted(pool.task_vectors) == sorted(f"vision_model.{n}" for n in vision)
    for task, names in TASKS.items():
        assert pool.heads[task]["head.weight"].shape == (len(names), 16)
    datamodule = instantiate(cfg.data, num_steps=2)
    datamodule.setup("fit")
    assert datamodule.task_names == list(TASKS)
    assert datamodule.calib["digits"].column_names == ["pixel_values"]  # labels dropped, grayscale made RGB
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["scenes"]["pixel_values"].shape == (16, 3, 32, 32)
    assert datamodule.num_classes("scenes") == 4


def test_zero_shot_classifier_matches_hf_clip_logits(stand_ins):
    """With one template, base tower + zero-shot head = ``CLIPModel(...).logits_per_image``."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(stand_ins["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(stand_ins["base"])
    x = pixels(stand_ins)
    names = TASKS["scenes"]
    head = zero_shot_head(clip, tokenizer, names, TEMPLATE)
    model = ZeroShotImageClassifier(clip.vision_model, clip.visual_projection, head)
    text = tokenizer([TEMPLATE[0].format(n) for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = clip(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=x)
        torch.testing.assert_close(model(x), expected.logits_per_image, atol=1e-5, rtol=1e-5)
    # several templates: normalised mean of the normalised text embeddings, times the logit scale
    templates = ["a {}.", "the {}!"]
    with torch.no_grad():
        emb = [
            clip.get_text_features(
                **tokenizer([t.format(n) for n in names], padding=True, return_tensors="pt")
            ).pooler_output
            for t in templates
        ]
        emb = torch.stack([e / e.norm(dim=-1, keepdim=True) for e in emb]).mean(0)
        expected_head = emb / emb.norm(dim=-1, keepdim=True) * clip.logit_scale.exp()
    torch.testing.assert_close(zero_shot_head(clip, tokenizer, names, templates), expected_head)


def test_one_hot_merge_reproduces_each_expert(stand_ins):
    """lam = e_k runs expert k's vision weights through task k's head: equal to HF CLIP with expert k's tower."""
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel

    pool = clip_zero_shot_pool(
        str(stand_ins["base"]),
        {t: str(p) for t, p in stand_ins["experts"].items()},
        {t: str(p) for t, p in stand_ins["data"].items()},
        templates=TEMPLATE,
    )
    merged = MergedModel(pool, granularity="layer")
    tokenizer = AutoTokenizer.from_pretrained(stand_ins["base"])
    x = pixels(stand_ins)
    for k, (task, names) in enumerate(TASKS.items()):
        reference = CLIPModel.from_pretrained(stand_ins["base"]).eval()
        expert = CLIPVisionModel.from_pretrained(stand_ins["experts"][task])
        reference.vision_model.load_state_dict(expert.state_dict())
        text = tokenizer([TEMPLATE[0].format(n) for n in names], padding=True, return_tensors="pt")
        lam = torch.zeros(merged.num_experts, len(merged.group_names))
        lam[k] = 1.0
        with torch.no_grad():
            expected = reference(**text, pixel_values=x).logits_per_image
            got = merged(x, task=task, params=merged.merged_tensors(lam))
        assert got.shape == (5, len(names))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adamerging_runs_end_to_end(stand_ins, tmp_path):
    from adamerge.pipeline import run

    cfg = make_cfg(
        stand_ins,
        tmp_path,
        "method.steps=2",
        "evaluate=true",
        "export=false",
        "callbacks.checkpoint.every_n_train_steps=1",
    )
    result = run(cfg)
    rows = {row["method"]: row for row in result["table"]}
    assert {"adamerging", "base + heads (floor)", "expert (own task)"} <= set(rows)
    assert set(TASKS) <= set(rows["adamerging"])
    table = json.loads((tmp_path / "coefficients.json").read_text())["coefficients"]
    assert list(table) == list(TASKS)
    values = [v for groups in table.values() for v in groups.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and any(v != pytest.approx(0.3) for v in values)  # it learned


def test_export_is_a_hf_vision_model_plus_heads(stand_ins, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    from adamerge.core.export import export_merged

    pool = clip_zero_shot_pool(
        str(stand_ins["base"]),
        {t: str(p) for t, p in stand_ins["experts"].items()},
        {t: str(p) for t, p in stand_ins["data"].items()},
        templates=TEMPLATE,
    )
    merged = MergedModel(pool, granularity="task", init=0.3)
    export_merged(merged, tmp_path / "out", str(stand_ins["base"]))
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out" / "model")
    head = load_file(str(tmp_path / "out" / "heads" / "digits.safetensors"))["head.weight"]
    x = pixels(stand_ins)
    with torch.no_grad():
        embeds = model(pixel_values=x).image_embeds
        expected = merged(x, task="digits")
    torch.testing.assert_close(embeds / embeds.norm(dim=-1, keepdim=True) @ head.T, expected, atol=1e-5, rtol=1e-5)


def test_label_column_without_class_names_is_refused(stand_ins, tmp_path):
    import datasets

    plain = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": images(2, 0, "RGB"), "label": [0, 1]})})
    with pytest.raises(
        ValueError, match=r"task 'shapes': label column 'label' .* not a ClassLabel.*experts.classnames"
    ):
        clip_zero_shot_pool(
            str(stand_ins["base"]),
            {"shapes": str(stand_ins["experts"]["shapes"])},
            {"shapes": plain},
            templates=TEMPLATE,
        )
    with pytest.raises(PoolError, match="no dataset to read class names"):
        clip_zero_shot_pool(
            str(stand_ins["base"]), {"shapes": str(stand_ins["experts"]["shapes"])}, {}, templates=TEMPLATE
        )
    # class names given in the config replace the dataset's
    pool = clip_zero_shot_pool(
        str(stand_ins["base"]),
        {"shapes": str(stand_ins["experts"]["shapes"])},
        {"shapes": plain},
        classnames={"shapes": ["a", "b", "c"]},
        templates=TEMPLATE,
    )
    assert pool.heads["shapes"]["head.weight"].shape == (3, 16)


def test_expert_without_vision_tensors_is_refused(stand_ins):
    from safetensors.torch import load_file

    state = load_file(str(stand_ins["experts"]["shapes"] / "model.safetensors"))
    state = {n: t for n, t in state.items() if "encoder.layers.1." not in n}
    with pytest.raises(PoolError, match="expert 'shapes' has no tensor 'vision_model.encoder.layers.1"):
        clip_zero_shot_pool(
            str(stand_ins["base"]), {"shapes": state}, {"shapes": str(stand_ins["data"]["shapes"])}, templates=TEMPLATE
        )
