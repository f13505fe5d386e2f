"""Merge kernels against values worked out by hand on 3-4 element task vectors."""

import math

import pytest
import torch
from torch.testing import assert_close

from adamerge.methods.kernels import (
    DEFAULT_DENSITY,
    DEFAULT_DROP_RATE,
    MERGES,
    TRANSFORMS,
    average,
    dare,
    dare_mask,
    dare_transform,
    disjoint_mean,
    elect_sign,
    get_merge,
    get_transform,
    identity,
    task_arithmetic,
    ties,
    ties_transform,
    trim,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Two experts, three entries.
TAU2 = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

# Three experts, four entries; the TIES example. With density 0.5 each expert keeps its 2 largest magnitudes:
#   expert 0 |4, 1, .5, 3|  -> keeps 4, -3  -> [ 4,  0, 0, -3]
#   expert 1 |2, 3, 1, .25| -> keeps -2, 3  -> [-2,  3, 0,  0]
#   expert 2 |3, 5, 2, .5|  -> keeps 3, -5  -> [ 3, -5, 0,  0]
TAU3 = t([[4.0, -1.0, 0.5, -3.0], [-2.0, 3.0, -1.0, 0.25], [3.0, -5.0, 2.0, 0.5]])
TAU3_TRIMMED = t([[4.0, 0.0, 0.0, -3.0], [-2.0, 3.0, 0.0, 0.0], [3.0, -5.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_scalar_weight():
    # 0.5 * (1+4, 2+5, 3+6) = 0.5 * (5, 7, 9)
    assert_close(task_arithmetic(TAU2, 0.5), t([2.5, 3.5, 4.5]))
    assert_close(task_arithmetic(TAU2, torch.tensor(0.5)), t([2.5, 3.5, 4.5]))


def test_task_arithmetic_per_expert_weights():
    # 1*(1, 2, 3) - 2*(4, 5, 6) = (1-8, 2-10, 3-12)
    assert_close(task_arithmetic(TAU2, t([1.0, -2.0])), t([-7.0, -8.0, -9.0]))


def test_task_arithmetic_reduces_only_the_expert_dim():
    tau = TAU2.view(2, 3, 1).expand(2, 3, 2)  # each expert is a 3x2 matrix with equal columns
    out = task_arithmetic(tau, t([1.0, -2.0]))
    assert out.shape == (3, 2)
    # each column is the per-expert result above: (-7, -8, -9)
    assert_close(out, t([[-7.0, -7.0], [-8.0, -8.0], [-9.0, -9.0]]))


def test_task_arithmetic_gradient_reaches_weights():
    w = torch.tensor([0.3, 0.7], requires_grad=True)
    (grad,) = torch.autograd.grad(task_arithmetic(TAU2, w).sum(), w)
    # d/dw_k sum_i (w_0 tau_0i + w_1 tau_1i) = sum_i tau_ki = (1+2+3, 4+5+6)
    assert_close(grad, t([6.0, 15.0]))

    s = torch.tensor(0.5, requires_grad=True)
    (grad,) = torch.autograd.grad(task_arithmetic(TAU2, s).sum(), s)
    # scalar weight: d/ds s * sum(tau) = 6 + 15
    assert_close(grad, torch.tensor(21.0))


def test_task_arithmetic_bf16_keeps_dtype_and_grad_to_fp32_weights():
    w = torch.tensor([1.0, -2.0], requires_grad=True)  # learned in fp32
    out = task_arithmetic(TAU2.bfloat16(), w)
    assert out.dtype == torch.bfloat16
    # small integers are exact in bf16: same (-7, -8, -9)
    assert_close(out, t([-7.0, -8.0, -9.0]).bfloat16())
    (grad,) = torch.autograd.grad(out.float().sum(), w)
    assert grad.dtype == torch.float32
    assert_close(grad, t([6.0, 15.0]))


def test_average():
    # ((1+4)/2, (2+5)/2, (3+6)/2)
    assert_close(average(TAU2), t([2.5, 3.5, 4.5]))


# ----------------------------------------------------------------------------------------- TIES pieces


def test_trim_half():
    tau = t([[0.1, -3.0, 2.0, -0.5], [4.0, -1.0, 0.2, -2.0]])
    # n=4, keep round(0.5*4)=2 per expert:
    #   expert 0 |.1, 3, 2, .5| -> keeps -3, 2 ; expert 1 |4, 1, .2, 2| -> keeps 4, -2
    assert_close(trim(tau, 0.5), t([[0.0, -3.0, 2.0, 0.0], [4.0, 0.0, 0.0, -2.0]]))
    # round(0.6*4) = round(2.4) = 2: same as 0.5
    assert_close(trim(tau, 0.6), trim(tau, 0.5))
    # round(0.1*4) = 0 -> at least 1: each expert keeps its single largest, -3 and 4
    assert_close(trim(tau, 0.1), t([[0.0, -3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]]))


def test_trim_density_one_returns_input():
    assert trim(TAU3, 1.0) is TAU3
    # round(0.9*4) = round(3.6) = 4 = n: everything kept as well
    assert trim(TAU3, 0.9) is TAU3


def test_trim_is_per_expert_over_whole_tensor():
    # Expert 0 as a 2x2 matrix [[4, -1], [.5, -3]]: the top 2 are taken over all 4 entries, not per row.
    tau = TAU3.view(3, 2, 2)
    assert_close(trim(tau, 0.5), TAU3_TRIMMED.view(3, 2, 2))


def test_trim_keeps_exact_count_on_ties():
    tau = torch.ones(2, 4)  # every magnitude equal
    kept = (trim(tau, 0.5) != 0).sum(1)
    # round(0.5*4) = 2 per expert, whichever two topk picks
    assert kept.tolist() == [2, 2]


def test_trim_bf16():
    out = trim(TAU3.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16
    # all values are exact in bf16, so the fp32 hand result applies
    assert_close(out, TAU3_TRIMMED.bfloat16())


def test_elect_sign():
    tau = t([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, -3.0, 0.0], [2.0, -1.0, 0.0, 0.0]])
    # column sums: 1-4+2=-1, -2+1-1=-2, 3-3+0=0, 0.5 -> signs -1, -1, 0 (exact cancel stays 0), +1
    assert_close(elect_sign(tau), t([-1.0, -1.0, 0.0, 1.0]))


def test_disjoint_mean():
    tau = t([[1.0, -2.0, 3.0, 0.0], [0.0, 1.0, -3.0, 0.0], [2.0, -1.0, -1.0, 5.0]])
    sign = t([1.0, -1.0, 1.0, -1.0])
    expected = t(
        [
            1.5,  # +: agreeing {1, 2}; the 0 of expert 1 is not counted (not (1+0+2)/3 = 1)
            -1.5,  # -: agreeing {-2, -1}
            3.0,  # +: agreeing {3}; -3 and -1 disagree
            0.0,  # -: {0, 0, 5}, none agrees
        ]
    )
    assert_close(disjoint_mean(tau, sign), expected)
    # sign 0 selects nothing
    assert_close(disjoint_mean(tau, torch.zeros(4)), torch.zeros(4))


# ----------------------------------------------------------------------------------------- TIES end to end


def test_ties_end_to_end():
    # trimmed stack TAU3_TRIMMED (see top); column sums 4-2+3=5, 3-5=-2, 0, -3 -> elected +, -, 0, -
    #   col 0 (+): {4, 3} agree, -2 does not -> 3.5
    #   col 1 (-): {-5}                      -> -5
    #   col 2 (0): nothing survived trimming -> 0
    #   col 3 (-): {-3}                      -> -3
    assert_close(ties(TAU3, density=0.5), t([3.5, -5.0, 0.0, -3.0]))


def test_ties_scalar_weight_scales_result():
    # 0.5 * (3.5, -5, 0, -3)
    assert_close(ties(TAU3, density=0.5, weights=0.5), t([1.75, -2.5, 0.0, -1.5]))
    # a negative common factor flips every sign together: still w * ties
    assert_close(ties(TAU3, density=0.5, weights=-2.0), t([-7.0, 10.0, 0.0, 6.0]))


def test_ties_per_expert_weights_weight_before_election():
    w = torch.tensor([1.0, 2.0, 1.0], requires_grad=True)
    out = ties(TAU3, density=0.5, weights=w)
    # weighted trimmed stack: [4, 0, 0, -3], [-4, 6, 0, 0], [3, -5, 0, 0]
    # column sums 4-4+3=3, 6-5=1, 0, -3 -> elected +, + (flipped by expert 1's weight), 0, -
    #   col 0: {4, 3} -> 3.5 ; col 1: {6} -> 6 ; col 2: 0 ; col 3: {-3} -> -3
    assert_close(out, t([3.5, 6.0, 0.0, -3.0]))
    (grad,) = torch.autograd.grad(out.sum(), w)
    # sum = (4 w0 + 3 w2)/2 + 3 w1 + (-3 w0) -> d/dw = (2 - 3, 3, 1.5)
    assert_close(grad, t([-1.0, 3.0, 1.5]))


def test_ties_transform_and_relation_to_ties():
    T = ties_transform(TAU3, density=0.5)
    # trimmed rows with elected signs (+, -, 0, -): expert 1's -2 (col 0) and 3 (col 1) disagree -> zeroed
    expected = t([[4.0, 0.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0], [3.0, -5.0, 0.0, 0.0]])
    assert_close(T, expected)
    # column sums (7, -5, 0, -3) over survivor counts (2, 1, 0->1, 1) = (3.5, -5, 0, -3) = ties
    count = (T != 0).sum(0).clamp(min=1)
    assert_close(T.sum(0) / count, ties(TAU3, density=0.5))


def test_ties_bf16_matches_hand_values():
    out = ties(TAU3.bfloat16(), density=0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out, t([3.5, -5.0, 0.0, -3.0]).bfloat16())


# ----------------------------------------------------------------------------------------- DARE


def test_dare_mask_fixed_seed():
    tau = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    for p in (0.3, 0.75):
        out = dare_mask(tau, p, torch.Generator().manual_seed(0))
        kept = out != 0
        assert 0 < kept.sum() < tau.numel()
        # survivors are exactly x / (1 - p) (same op, same dtype); the rest are 0
        assert torch.equal(out[kept], (tau / (1 - p))[kept])
        assert torch.equal(out[~kept], torch.zeros(int((~kept).sum())))
        # same seed -> same mask; another seed -> another mask
        assert torch.equal(dare_mask(tau, p, torch.Generator().manual_seed(0)), out)
        assert not torch.equal(dare_mask(tau, p, torch.Generator().manual_seed(1)) != 0, kept)


def test_dare_mask_bf16():
    tau = TAU3.bfloat16()
    out = dare_mask(tau, 0.5, torch.Generator().manual_seed(0))
    kept = out != 0
    assert out.dtype == torch.bfloat16
    # x / (1 - 0.5) = 2x, exact in bf16
    assert torch.equal(out[kept], 2 * tau[kept])


def test_dare_mask_zero_drop_returns_input():
    assert dare_mask(TAU3, 0.0) is TAU3


def test_dare_mask_is_unbiased():
    # N = 2000 independent masks at once: the [3, 4] stack tiled along a new leading dim (entries are independent).
    n = 2000
    for p in (0.5, 0.9):
        draws = dare_mask(TAU3.expand(n, 3, 4), p, torch.Generator().manual_seed(0))  # (N, 3, 4)
        # Each draw is x/(1-p) * Bernoulli(1-p): mean x, variance x^2 p/(1-p). The mean of N draws has
        # sd |x| sqrt(p / ((1-p) N)) = 0.022|x| (p=.5) or 0.067|x| (p=.9). Five sd: P(|z|>5) = 6e-7 per
        # entry, ~7e-6 over the 12 entries, so a correct kernel fails this for essentially no seed.
        sd = TAU3.abs() * math.sqrt(p / ((1 - p) * n))
        assert ((draws.mean(0) - TAU3).abs() <= 5 * sd).all()
        # kept fraction: Binomial(12 N, 1-p)/(12 N), sd sqrt(p(1-p)/(12 N)) <= 0.0032; five sd tolerance
        frac = (draws != 0).float().mean().item()
        assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / (12 * n))


def test_dare_is_mask_then_task_arithmetic():
    w = torch.tensor([0.5, 1.0, -1.0], requires_grad=True)
    out = dare(TAU3, drop_rate=0.5, weights=w, generator=torch.Generator().manual_seed(3))
    masked = dare_mask(TAU3, 0.5, torch.Generator().manual_seed(3))
    assert_close(out, task_arithmetic(masked, w))
    (grad,) = torch.autograd.grad(out.sum(), w)
    # d/dw_k sum_i w_k m_ki = sum_i m_ki
    assert_close(grad, masked.sum(1))


def test_dare_transform_defaults_to_dare_drop_rate():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(dare_transform(TAU3, generator=g()), dare_mask(TAU3, DEFAULT_DROP_RATE, g()))


# ----------------------------------------------------------------------------------------- registry


def test_registry_lookup_and_shapes():
    tau = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    assert get_merge("ties") is ties and get_transform("none") is identity
    for name in MERGES:
        kwargs = {"weights": 0.3} if name == "task_arithmetic" else {}
        assert get_merge(name)(tau, **kwargs).shape == (2, 5)
    for name in TRANSFORMS:
        assert get_transform(name)(tau).shape == tau.shape
    assert DEFAULT_DENSITY == 0.2


def test_unknown_names():
    with pytest.raises(
        ValueError,
        match=r"unknown merge method 'tiez'; choose one of: average, dare, task_arithmetic, ties \(config key: method\)",
    ):
        get_merge("tiez")
    with pytest.raises(ValueError, match=r"unknown task-vector transform 'drop'; choose one of: dare, none, ties"):
        get_transform("drop")


# ----------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        trim(TAU3, density)
    with pytest.raises(ValueError, match="config key: density"):
        ties(TAU3, density=density)


@pytest.mark.parametrize("drop_rate", [1.0, -0.1, 2.0])
def test_bad_drop_rate(drop_rate):
    with pytest.raises(ValueError, match=r"drop_rate must be a number in \[0, 1\)"):
        dare(TAU3, drop_rate=drop_rate)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"shape \[K\]=\[3\].*got shape \[2\]"):
        task_arithmetic(TAU3, t([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[K\]=\[3\].*got shape \[3, 1\]"):
        ties(TAU3, weights=torch.ones(3, 1))
    with pytest.raises(TypeError, match="weights must be a float or a tensor"):
        task_arithmetic(TAU3, [1.0, 2.0, 3.0])


def test_bad_tau():
    with pytest.raises(ValueError, match="at least 1 dim"):
        average(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        trim(torch.ones(2, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="K=0"):
        elect_sign(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"sign must have shape \[4\]"):
        disjoint_mean(TAU3, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_by_row_trim_and_merge_equal_the_batched_ones(monkeypatch, dtype):
    """Big tensors are trimmed and merged one expert at a time (bounded memory): bitwise the same result."""
    from adamerge.methods import kernels

    g = torch.Generator().manual_seed(3)
    tau = torch.randn(4, 40, 30, generator=g).to(dtype)
    tau[:, 0] = 0
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    monkeypatch.setattr(kernels, "ROW_BY_ROW", 10**9)
    batched = [kernels.ties(tau, 0.3), kernels.ties(tau, 0.3, weights), kernels.ties_transform(tau, 0.3)]
    monkeypatch.setattr(kernels, "ROW_BY_ROW", 1)
    rows = [kernels.ties(tau, 0.3), kernels.ties(tau, 0.3, weights), kernels.ties_transform(tau, 0.3)]
    for a, b in zip(batched, rows, strict=True):
        assert torch.equal(a, b)
