"""torch.compile of the merged forward: same gradients as eager, one graph for every step and every task's head."""

import pytest
import torch
import torch._dynamo

from adamerge.core.merged import MergedModel
from adamerge.core.pool import make_pool
from tests.conftest import coefficient_grads


def test_compiled_forward_matches_eager_without_recompiling(base_model, expert_states, batch):
    torch._dynamo.reset()
    pool = make_pool(base_model, expert_states)
    eager = MergedModel(pool, granularity="layer", init=0.4)
    compiled = MergedModel(pool, granularity="layer", init=0.4, compile=True)
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # new coefficients on the second step: new tensor values, the same graph
        expected, got = coefficient_grads(eager, batch), coefficient_grads(compiled, batch)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        for merged in (eager, compiled):
            merged.coefficients.assign(merged.coefficients() + 0.1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_and_checkpointing_are_exclusive(base_model, expert_states):
    with pytest.raises(ValueError, match="cannot be combined"):
        MergedModel(make_pool(base_model, expert_states), compile=True, activation_checkpointing=True)


def test_concat_refuses_a_compiled_model(base_model, expert_states):
    from adamerge.engine.module import MergeModule
    from adamerge.objectives.entropy import entropy_objective

    merged = MergedModel(make_pool(base_model, expert_states), compile=True)
    with pytest.raises(ValueError, match="backward=concat cannot run a compiled model"):
        MergeModule(merged, entropy_objective, torch.optim.SGD, backward="concat")
    assert not MergeModule(merged, entropy_objective, torch.optim.SGD).can_concat({"a": {}, "b": {}})
