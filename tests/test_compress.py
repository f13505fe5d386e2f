import pytest
import torch

from adamerge.core.lowrank import low_rank, merge_low_rank
from adamerge.core.merged import MergedModel, merge_tensor
from adamerge.core.pool import make_pool


def test_exactly_low_rank_task_vectors_are_reproduced():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 20, 2, generator=g) @ torch.randn(3, 2, 30, generator=g)  # rank 2 per expert
    u, v = low_rank(tau, rank=2)
    assert u.shape == (3, 20, 2) and v.shape == (3, 2, 30)
    base, lam = torch.randn(20, 30, generator=g), torch.tensor([[0.2], [0.5], [0.9]])
    torch.testing.assert_close(merge_low_rank(base, u, v, lam), merge_tensor(base, tau, lam), atol=1e-5, rtol=0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_knob_bounds_the_merge_error(energy):
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(4, 24, 16, generator=g)
    u, v = low_rank(tau, energy=energy)
    lam = torch.tensor([[0.3], [-0.2], [0.7], [1.0]])
    base = torch.zeros(24, 16)
    error = (merge_low_rank(base, u, v, lam) - merge_tensor(base, tau, lam)).norm()
    bound = sum(abs(lam[k, 0]) * (1 - energy) ** 0.5 * tau[k].norm() for k in range(4))
    assert error <= bound + 1e-5
    assert u.shape[-1] < 16 or energy == 0.99


def test_lowrank_storage_in_the_merged_model(base_model, expert_states, batch):
    pool = make_pool(base_model, expert_states)
    dense = MergedModel(pool, granularity="layer", init=0.4)
    compressed = MergedModel(pool, granularity="layer", init=0.4, storage="lowrank", rank=4)
    assert len(compressed.low_rank_u) > 0 and all(u.shape[-1] == 4 for u in compressed.low_rank_u.tensors())
    dense_bytes = sum(t.numel() for t in dense.task_vectors.tensors())
    compressed_bytes = sum(
        t.numel()
        for bank in (compressed.task_vectors, compressed.low_rank_u, compressed.low_rank_v)
        for t in bank.tensors()
    )
    assert compressed_bytes < dense_bytes
    out = compressed(**batch, task="task0").logits
    out.sum().backward()  # gradients reach the coefficients through the factors
    assert compressed.coefficients.raw.grad.abs().sum() > 0
    # full rank keeps every tensor dense: identical to the resident path
    full = MergedModel(pool, granularity="layer", init=0.4, storage="lowrank", energy=1.0)
    torch.testing.assert_close(full(**batch, task="task0").logits, dense(**batch, task="task0").logits)
    with pytest.raises(ValueError, match="method.rank or method.energy"):
        MergedModel(pool, storage="lowrank")


def test_low_rank_factors_do_not_keep_the_whole_svd_alive():
    from adamerge.core.lowrank import low_rank

    u, v = low_rank(torch.randn(2, 64, 48), rank=4)
    assert v.shape == (2, 4, 48) and v.untyped_storage().nbytes() == v.numel() * v.element_size()
    assert u.untyped_storage().nbytes() == u.numel() * u.element_size()
