"""DOGE's solvers for the shared modification delta, kept apart from the method so that each has one place.

``adamerge.methods.doge`` builds the problem (task-aware coefficients, shared subspace) and merges; this module solves it:
the data-free objective, the projection off the shared subspace, the batched projected Adam / conjugate gradient
solver and the per-layer autograd reference it is tested against.

Vectorised: tensors of equal shape are stacked into ``[L, K, m, n]`` and solved as one problem. The objective is
quadratic, so its gradient is written out (two batched passes over the stack per step); Adam is elementwise, so one
Adam over ``[L, m, n]`` follows the same path as ``L`` separate per-layer runs (:func:`solve_reference`, autograd)
up to rounding. The solve runs on the task vectors' device in fp32 (float64 stays float64; bf16 is upcast).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CG_TOL",
    "FORMS",
    "SOLVERS",
    "adam",
    "doge_objective",
    "project_out",
    "solve_batched",
    "solve_dtype",
    "solve_reference",
]

FORMS = ("row", "matrix")
SOLVERS = ("adam", "cg")
CG_TOL = 1e-5
"""CG stops (per tensor) once the residual norm falls below this fraction of its start."""


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DOGE solves in: float64 stays, everything else is upcast to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_choice(value: str, choices: tuple[str, ...], name: str, key: str) -> None:
    """Fail with the config key to fix when ``value`` is not one of ``choices`` (also used by ``adamerge.methods.doge``)."""
    if value not in choices:
        raise ValueError(f"unknown DOGE {name} {value!r}; choose one of {choices} (config key: {key}.{name})")


def project_out(g: Tensor, U: Tensor) -> Tensor:
    """``g - U U^T g``: the part of ``g [*, m, n]`` orthogonal to the columns of ``U [*, m, r]``."""
    coef = U.mT @ g  # (*, r, n)
    if g.dim() == 2:  # fused multiply-subtract: one pass over g instead of two
        return torch.addmm(g, U, coef, alpha=-1)
    if g.dim() == 3 and U.dim() == 3:
        return torch.baddbmm(g, U, coef, alpha=-1)
    return g - U @ coef


def doge_objective(tau: Tensor, lam: Tensor, delta: Tensor, form: str = "row") -> Tensor:
    """The data-free gap ``sum_j ||tau_j^T (tau_j - sum_i lam_i (tau_i + delta))||^2``, written out directly.

    Args:
        tau: stack ``[*batch, K, m, n]``.
        lam: coefficients ``[*batch, K]``.
        delta: modification ``[*batch, m, n]``.
        form: ``"row"`` (an inner product per row) or ``"matrix"`` (one per whole matrix).

    Returns:
        ``[*batch]``.
    """
    check_choice(form, FORMS, "form", "method.merge")
    merged = torch.einsum("...k,...kmn->...mn", lam, tau + delta.unsqueeze(-3))
    inner = (tau * (tau - merged.unsqueeze(-3))).sum(-1)  # (*, K, m)
    if form == "matrix":
        return inner.sum(-1).square().sum(-1)
    return inner.square().sum((-2, -1))


def _rows(T: Tensor, x: Tensor) -> Tensor:
    """``<tau_k[r], x[r]>`` for every row r and expert k: ``T [L, m, K, n]``, ``x [L, m, n]`` -> ``[L, m, K]``."""
    return torch.einsum("lmkn,lmn->lmk", T, x)  # 2-3x faster on CPU than the equivalent batched matmul


def _combine(T: Tensor, c: Tensor) -> Tensor:
    """``sum_k c[r, k] tau_k[r]`` row by row: ``c [L, m or 1, K]`` -> ``[L, m, n]``."""
    return (c.unsqueeze(-2) @ T).squeeze(-2)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-2, -1), keepdim=True)


def solve_batched(
    tau: Tensor,
    lam: Tensor,
    U: Tensor,
    form: str = "row",
    solver: str = "adam",
    steps: int = 400,
    lr: float = 1e-4,
    project_update: bool = True,
) -> Tensor:
    """Delta for ``L`` tensors of one shape at once, by projected Adam or projected conjugate gradient.

    With ``c = a - s J delta`` (``a``: the inner products at ``delta = 0``, ``s = sum_i lam_i``, ``J delta``: the
    inner products of the task vectors with ``delta``) the objective is ``||c||^2`` and its gradient
    ``-2 s J^T c``.

    Args:
        tau: stack ``[L, K, m, n]`` in the solve dtype.
        lam: coefficients ``[L, K]``.
        U: shared-subspace bases ``[L, m, r]`` (see :func:`adamerge.methods.doge.shared_subspace`).
        form: ``"row"`` or ``"matrix"`` (see :mod:`adamerge.methods.doge`).
        solver: ``"adam"`` (the paper's optimiser) or ``"cg"`` (exact minimiser).
        steps: Adam steps or CG iterations.
        lr: Adam learning rate (unused by CG).
        project_update: Adam only: also project the iterate after each step, not just the gradient.

    Returns:
        ``delta [L, m, n]``, orthogonal to ``U``.
    """
    T = tau.transpose(-3, -2).contiguous()  # (L, m, K, n): one small [K, n] matrix per row
    s = lam.sum(-1)[:, None, None]  # (L, 1, 1)
    merged = torch.einsum("lk,lkmn->lmn", lam, tau)

    def inner(x: Tensor) -> Tensor:  # J x: (L, m, K), or (L, 1, K) for the matrix form
        rows = _rows(T, x)
        return rows.sum(-2, keepdim=True) if form == "matrix" else rows

    a = inner(-merged) + (T.square().sum(-1).sum(-2, keepdim=True) if form == "matrix" else T.square().sum(-1))
    delta = torch.zeros_like(merged)
    if solver == "cg":
        rhs = s * _combine(T, a)  # normal equations s^2 J^T J delta = s J^T a, on the complement of U
        return _projected_cg(
            lambda x: project_out(s.square() * _combine(T, inner(x)), U), project_out(rhs, U), _dot(rhs, rhs), steps
        )
    delta.requires_grad_(True)
    optimizer = adam(delta, lr)
    with torch.no_grad():
        for _ in range(steps):
            residual = a - s * inner(delta)  # (L, m or 1, K): scale this, not the [L, m, n] gradient
            delta.grad = project_out(_combine(T, -2 * s * residual), U)
            optimizer.step()
            if project_update:
                delta.copy_(project_out(delta, U))
    return delta.detach()


def adam(param: Tensor, lr: float) -> torch.optim.Adam:
    """The Adam both solvers use: default betas and eps, fused where PyTorch has a fused kernel (8x on CPU)."""
    fused = param.device.type in ("cpu", "cuda")
    return torch.optim.Adam([param], lr=lr, fused=fused or None)


def _projected_cg(hessian, rhs: Tensor, scale: Tensor, steps: int) -> Tensor:
    """Conjugate gradient for ``H x = rhs``, one system per leading index, each stopped at ``CG_TOL``.

    The tolerance is relative to ``scale`` (the squared norm of the unprojected right-hand side): when ``U`` spans
    everything, the projected one is rounding noise, and CG on noise with a null Hessian diverges.
    """
    x = torch.zeros_like(rhs)
    r, p = rhs.clone(), rhs.clone()
    rs = _dot(r, r)
    stop = CG_TOL**2 * scale
    for _ in range(steps):
        active = rs > stop
        if not active.any():
            break
        hp = hessian(p)
        php = _dot(p, hp)
        alpha = torch.where(active & (php > 0), rs / php, torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = _dot(r, r)
        p = r + torch.where(active, rs_new / rs, torch.zeros_like(rs)) * p
        rs = torch.where(active, rs_new, rs)
    return x


def solve_reference(
    tau: Tensor,
    lam: Tensor,
    U: Tensor,
    form: str = "row",
    steps: int = 400,
    lr: float = 1e-4,
    project_update: bool = True,
) -> Tensor:
    """Reference: one tensor, autograd through :func:`doge_objective`, projected gradient, ``torch.optim.Adam``.

    The per-layer loop the batched solver replaces; for tests and benchmarks.

    Args:
        tau: stack ``[K, m, n]``.
        lam: coefficients ``[K]``.
        U: shared-subspace basis ``[m, r]``.
        form, steps, lr, project_update: as in :func:`solve_batched`.

    Returns:
        ``delta [m, n]``.
    """
    delta = torch.zeros(tau.shape[1:], dtype=tau.dtype, device=tau.device, requires_grad=True)
    optimizer = adam(delta, lr)
    for _ in range(steps):
        optimizer.zero_grad()
        doge_objective(tau, lam, delta, form).backward()
        with torch.no_grad():
            delta.grad = project_out(delta.grad, U)
            optimizer.step()
            if project_update:
                delta.copy_(project_out(delta, U))
    return delta.detach()
