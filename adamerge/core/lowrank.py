"""Task vectors compressed to low rank: tau_k ~= U_k V_k per 2-D tensor (truncated SVD, singular values folded into
U), so K experts of a large model fit one GPU. A rank or an energy knob decides the rank.

Error bound, used by the tests: keeping a fraction ``energy`` of each tau_k's squared Frobenius norm leaves a relative
error of at most sqrt(1 - energy) per expert, so the merged delta is off by at most
sum_k |lam_k| * sqrt(1 - energy) * ||tau_k||.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chosen_rank(singular_values: Tensor, rank: int | None, energy: float | None) -> int:
    """The smallest rank keeping ``energy`` of every expert's squared norm (common to all K), capped by ``rank``."""
    full = singular_values.shape[-1]
    r = full if rank is None else min(rank, full)
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy} (config key: method.energy)")
        share = singular_values.square().cumsum(-1) / singular_values.square().sum(-1, keepdim=True).clamp_min(1e-30)
        needed = int((share < energy - 1e-7).sum(-1).max().item()) + 1
        r = min(r, needed)
    return max(r, 1)


def low_rank(tau: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """Truncated SVD of each expert's matrix: tau [K, m, n] -> U [K, m, r] (times singular values), V [K, r, n]."""
    if tau.dim() != 3:
        raise ValueError(f"low-rank compression needs 2-D tensors per expert, got shape {tuple(tau.shape[1:])}")
    u, s, vh = torch.linalg.svd(tau.float(), full_matrices=False)  # (K, m, q), (K, q), (K, q, n)
    r = chosen_rank(s, rank, energy)
    # contiguous: a slice of vh in the same dtype would be a view keeping the whole SVD output alive
    return (u[..., :r] * s[:, None, :r]).to(tau.dtype), vh[:, :r].to(tau.dtype).contiguous()


def worth_compressing(shape: torch.Size, rank: int) -> bool:
    """Factors are smaller than the matrix only when r (m + n) < m n."""
    return len(shape) == 2 and rank * (shape[0] + shape[1]) < shape[0] * shape[1]


def merge_low_rank(base: Tensor, u: Tensor, v: Tensor, lam: Tensor) -> Tensor:
    """theta_0 + sum_k lam_k U_k V_k, as one (m, K r) @ (K r, n) product. lam: [K, 1]."""
    k, m, r = u.shape
    scaled = (u * lam[:, :1, None].to(u.dtype)).permute(1, 0, 2).reshape(m, k * r)  # (m, K r)
    return base + (scaled @ v.reshape(k * r, -1)).to(base.dtype)
