import pytest
import torch

from adamerge.core.coefficients import group_layout
from adamerge.core.merged import MergedModel, merge_tensor
from adamerge.core.merged_base import two_stage_backward
from adamerge.core.pool import make_pool
from tests.conftest import tiny_bert_config


def logits(merged, batch, task=None, params=None):
    return merged(**batch, task=task, params=params).logits


def test_merge_tensor_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tau = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 2.0, 2.0, 0.0]])
    # one chunk: base + 0.5*tau0 + 0.25*tau1 = [1.5, 2.5, 3.0, 5.0]
    out = merge_tensor(base, tau, torch.tensor([[0.5], [0.25]]))
    torch.testing.assert_close(out, torch.tensor([1.5, 2.5, 3.0, 5.0]))
    # two chunks [0:2] and [2:4]: lam = [[1, 0], [0, 1]] -> [1+1, 2+0, 3+2, 4+0]
    out = merge_tensor(base, tau, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 5.0, 4.0]))


def test_group_layouts():
    names = ["emb.weight", "encoder.layer.0.q.weight", "encoder.layer.0.k.weight", "encoder.layer.1.q.weight"]
    assert group_layout(names, "task") == (["all"], [[0], [0], [0], [0]])
    cols, layout = group_layout(names, "block")
    assert cols == ["emb", "encoder.layer.0", "encoder.layer.1"] and layout == [[0], [1], [1], [2]]
    cols, layout = group_layout(names, "chunk", chunks={"emb.weight": 3})
    assert cols[:3] == ["emb.weight#0", "emb.weight#1", "emb.weight#2"] and layout[1] == [3]
    with pytest.raises(ValueError, match="unknown granularity 'tensor'"):
        group_layout(names, "tensor")


@pytest.mark.parametrize("granularity", ["task", "layer", "block", "chunk"])
def test_gradient_matches_finite_differences(granularity, expert_states, batch):
    torch.manual_seed(0)
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_bert_config()).double().eval()
    experts = {
        k: {n: t.double() if t.is_floating_point() else t for n, t in s.items()} for k, s in expert_states.items()
    }
    pool = make_pool(model, experts, dtype="float64")
    merged = MergedModel(pool, granularity=granularity, init=0.3, clamp=None, chunks=2)
    merged.coefficients.double()
    merged.coefficients.raw.data.uniform_(0.1, 0.6, generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return logits(merged, batch, task="task1").square().mean()

    (grad,) = torch.autograd.grad(loss_fn(), merged.coefficients.raw)
    raw = merged.coefficients.raw
    eps = 1e-6
    numeric = torch.zeros_like(raw)
    for idx in [tuple(i) for i in torch.cartesian_prod(torch.arange(raw.shape[0]), torch.arange(min(raw.shape[1], 4)))]:
        with torch.no_grad():
            raw[idx] += eps
            up = loss_fn()
            raw[idx] -= 2 * eps
            down = loss_fn()
            raw[idx] += eps
        numeric[idx] = (up - down) / (2 * eps)
    checked = grad[:, : min(raw.shape[1], 4)]
    rel = (checked - numeric[:, : checked.shape[1]]).norm() / numeric.norm()
    assert rel < 1e-3, f"{granularity}: relative error {rel:.2e}"


def test_one_hot_reproduces_expert_and_zero_reproduces_base(base_model, expert_states, batch):
    from transformers import BertForSequenceClassification

    pool = make_pool(base_model, expert_states)
    merged = MergedModel(pool, granularity="layer", clamp=None)
    for k, name in enumerate(merged.experts):
        one_hot = torch.zeros(3, len(merged.group_names))
        one_hot[k] = 1.0
        merged.coefficients.assign(one_hot)
        expert = BertForSequenceClassification(tiny_bert_config()).eval()
        expert.load_state_dict(expert_states[name])
        torch.testing.assert_close(logits(merged, batch, task=name), expert(**batch).logits, atol=1e-5, rtol=0)
    merged.coefficients.assign(torch.zeros(3, len(merged.group_names)))
    reference = BertForSequenceClassification(tiny_bert_config()).eval()
    reference.load_state_dict({n: t for n, t in merged.model.state_dict().items()})
    torch.testing.assert_close(logits(merged, batch), reference(**batch).logits, atol=1e-6, rtol=0)


def test_merge_never_mutates_experts_or_base(base_model, expert_states, batch):
    before = {k: {n: t.clone() for n, t in s.items()} for k, s in expert_states.items()}
    base_before = {n: t.clone() for n, t in base_model.state_dict().items()}
    pool = make_pool(base_model, expert_states)
    merged = MergedModel(pool)
    logits(merged, batch, task="task0").sum().backward()
    for k in expert_states:
        for n, t in expert_states[k].items():
            assert torch.equal(t, before[k][n])
    for n, t in merged.model.state_dict().items():
        assert torch.equal(t, base_before[n]), n
    assert [p for p in merged.parameters() if p.requires_grad] == [merged.coefficients.raw]


@pytest.mark.parametrize(
    "options",
    [
        {"granularity": "task"},
        {"granularity": "layer", "clamp": None},
        {"granularity": "block", "parametrization": "sigmoid"},
        {"granularity": "chunk", "chunks": 3},
        {"granularity": "layer", "storage": "streamed"},
        {"granularity": "layer", "storage": "lowrank", "rank": 2},
        {"granularity": "block", "dtype": torch.bfloat16},
    ],
    ids=["task", "layer", "block-sigmoid", "chunk", "streamed", "lowrank", "bf16-task-vectors"],
)
def test_two_stage_backward_equals_plain_autograd(options, base_model, expert_states, batch):
    """The fast path (merge outside autograd, <dL/dW, tau_k> per tensor) against autograd through the merge."""
    options = dict(options)
    pool = make_pool(base_model, expert_states, dtype=options.pop("dtype", torch.float32))
    merged = MergedModel(pool, init=0.4, **options)
    tasks = merged.experts

    def run(params):
        for task in tasks:
            yield logits(merged, batch, task=task, params=params).logsumexp(-1).mean()

    sum(run(merged.merged_tensors())).backward()
    plain = merged.coefficients.raw.grad.clone()
    merged.coefficients.raw.grad = None
    losses = two_stage_backward(merged, run)
    assert len(losses) == 3
    torch.testing.assert_close(merged.coefficients.raw.grad, plain, atol=1e-6, rtol=1e-5)


def test_merge_and_unload_matches_functional_forward(base_model, expert_states, batch):
    pool = make_pool(base_model, expert_states)
    merged = MergedModel(pool, granularity="block", init=0.4)
    plain = merged.merge_and_unload(task="task2")
    torch.testing.assert_close(plain(**batch).logits, logits(merged, batch, task="task2"), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in plain.parameters())


def test_sigmoid_parametrisation_and_bad_init(base_model, expert_states):
    pool = make_pool(base_model, expert_states)
    merged = MergedModel(pool, granularity="task", init=0.1, parametrization="sigmoid")
    torch.testing.assert_close(merged.coefficients(), torch.full((3, 1), 0.1))
    with pytest.raises(ValueError, match="one value per expert \\(3\\)"):
        MergedModel(pool, granularity="task", init=[0.1, 0.2])
    with pytest.raises(ValueError, match="method.parametrization"):
        MergedModel(pool, parametrization="softplus")
    with pytest.raises(FloatingPointError, match="NaN"):
        merged.coefficients.assign(torch.tensor([[float("nan")], [0.1], [0.1]]))


def test_clamp_bounds_coefficients(base_model, expert_states):
    pool = make_pool(base_model, expert_states)
    merged = MergedModel(pool, granularity="task", init=[-0.5, 0.5, 1.5], clamp=(0.0, 1.0))
    torch.testing.assert_close(merged.coefficients()[:, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_coefficient_table_round_trip(base_model, expert_states):
    pool = make_pool(base_model, expert_states)
    a = MergedModel(pool, granularity="block", init=[0.1, 0.2, 0.3])
    b = MergedModel(pool, granularity="block")
    b.load_coefficient_table(a.coefficient_table())
    torch.testing.assert_close(a.coefficients(), b.coefficients())
    with pytest.raises(ValueError, match="another granularity"):
        MergedModel(pool, granularity="layer").load_coefficient_table(a.coefficient_table())


def test_streamed_task_vectors_equal_resident_exactly(base_model, expert_states, batch):
    pool = make_pool(base_model, expert_states)
    results = []
    for storage in ("resident", "streamed"):
        merged = MergedModel(pool, granularity="block", init=0.3, storage=storage)
        optimizer = torch.optim.Adam([merged.coefficients.raw], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            loss = sum(logits(merged, batch, task=t).logsumexp(-1).mean() for t in merged.experts)
            loss.backward()
            optimizer.step()
        results.append((merged.coefficients().detach(), logits(merged, batch, task="task0").detach()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="method.storage"):
        MergedModel(pool, storage="disk")
