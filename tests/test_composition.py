"""Every learner over every composable static method: ``method.transform=<name>`` picks the method's preset, its
options are checked before any work, the learner's coefficients multiply the method's per-task vectors, and
objectives that align with the experts still align with the real experts."""

import copy

import pytest
import torch

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from adamerge.methods.kernels import ties_transform
from adamerge.methods.registry import REGISTRY, ConfigError, Run, build_method, composes
from adamerge.objectives.alignment import ExpertAlignment
from adamerge.pipeline import check_pool
from adamerge.testbeds.tiny import tiny_pool
from tests.test_alignment import calib  # noqa: F401 - fixture
from tests.test_config import make_cfg


def learner(*overrides):
    return build_method(make_cfg("method=adamerging", *overrides).method)


def test_a_transform_by_name_is_its_preset_and_options_override_it():
    by_name = learner("method.transform=ties").first_pass
    assert by_name.name == "ties" and by_name.density == 0.2  # conf/method/ties.yaml
    override = learner("method.transform={name: ties, density: 0.1}").first_pass
    assert override.density == 0.1
    assert learner("method.transform={name: ties, density: 0.1}").options()["transform"] == {
        "name": "ties",
        "density": 0.1,
        "weights": 1.0,
    }  # the record says what ran
    assert build_method(make_cfg("method=adamerging_pp").method).first_pass.density == 0.2


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ("tiez", r"unknown method 'tiez'"),
        ("adamerging", r"method.transform='adamerging': adamerging has no per-task transform.*methods that compose"),
        ("{name: ties, density: 2.0}", r"in method.transform under 'adamerging' \(ties\)"),
        ("{name: ties, densty: 0.1}", r"method.densty is not an option of method 'ties'"),
        ("{density: 0.1}", r"method.transform under 'adamerging' needs a name"),
    ],
)
def test_a_bad_transform_fails_when_the_method_is_built(transform, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        learner(f"method.transform={transform}")


def test_every_composable_method_is_listed_as_such():
    from adamerge.cli import list_methods

    text = list_methods()
    for spec in REGISTRY.values():
        assert (f"composes: method.transform={spec.name} under every learner" in text) == composes(spec), spec.name
    assert composes(REGISTRY["ties"]) and not composes(REGISTRY["adamerging"])


def test_the_learner_multiplies_the_transformed_vectors():
    pool = tiny_pool(num_tasks=2)
    method = learner("method.transform={name: ties, density: 0.5}")
    transformed = method.pool_for_learning(Run(None, pool, None))
    for name, tau in pool.task_vectors.items():
        torch.testing.assert_close(transformed.task_vectors[name], ties_transform(tau, 0.5))
    assert learner().pool_for_learning(Run(None, pool, None)) is pool  # no transform: the raw task vectors


def test_a_dense_transform_under_a_learner_is_refused_on_lora_experts():
    method = learner("method.transform=ties")
    with pytest.raises(ConfigError, match=r"method 'ties' needs dense task vectors"):
        check_pool(method, "lora")
    check_pool(learner(), "lora")  # AdaMerging itself takes LoRA factors


def test_alignment_over_transformed_vectors_aligns_with_the_real_experts(base_model, expert_states, calib):  # noqa: F811
    """Expert Merging over TIES vectors: the teacher targets are the real experts' outputs, not the trimmed ones'."""
    pool = make_pool(copy.deepcopy(base_model), expert_states)
    trimmed = learner("method.transform={name: ties, density: 0.1}").pool_for_learning(Run(None, pool, None))
    student = MergedModel(trimmed, granularity="layer", init=0.3)
    experts = MergedModel(pool, granularity="task")

    def first_targets(objective):
        ds = objective.datasets["task1"]
        batch = {
            "input_ids": torch.tensor([ds[0]["input_ids"]]),
            "attention_mask": torch.tensor([ds[0]["attention_mask"]]),
            "_index": torch.tensor([0]),
        }
        return objective.teacher.targets("task1", batch).logits

    kwargs = dict(layers=None, teacher="online")
    real = first_targets(ExpertAlignment(**kwargs).bind(student, datasets=calib, experts=experts))
    own = first_targets(ExpertAlignment(**kwargs).bind(student, datasets=calib))
    expert = copy.deepcopy(base_model)
    expert.load_state_dict(expert_states["task1"])
    ds = calib["task1"]
    out = expert(input_ids=torch.tensor([ds[0]["input_ids"]]), attention_mask=torch.tensor([ds[0]["attention_mask"]]))
    torch.testing.assert_close(real, out.logits, atol=1e-5, rtol=1e-5)
    assert (own - out.logits).abs().max() > 1e-3  # the trimmed expert is another model: aligning to it is wrong


def test_a_learner_over_a_transform_runs_through_the_pipeline(tmp_path):
    from adamerge.pipeline import run

    cfg = make_cfg(
        "experiment=tiny",
        "method=expert_merging",
        "method.transform=ties",
        "method.steps=3",
        "export=false",
        f"paths.output_dir={tmp_path}",
        "~logger",
    )
    result = run(cfg)
    assert result["coefficients"]["options"]["transform"]["name"] == "ties"
    rows = {row["method"]: row for row in result["table"]}
    assert "expert_merging" in rows and 0 < rows["expert_merging"]["avg"] <= 1


def test_a_transform_preset_reads_the_runs_seed():
    """conf/method/dare.yaml says seed: ${seed}: as a transform it is the run's seed, so a seed sweep varies the masks."""
    from omegaconf import OmegaConf

    pool = tiny_pool(num_tasks=2)
    method = learner("method.transform=dare")
    assert method.first_pass.seed == 0  # checked at build time with a placeholder seed
    masks = [
        method.pool_for_learning(Run(OmegaConf.create({"seed": seed}), pool, None)).task_vectors for seed in (0, 0, 1)
    ]
    name = next(iter(pool.task_vectors))
    assert torch.equal(masks[0][name], masks[1][name]) and not torch.equal(masks[0][name], masks[2][name])
