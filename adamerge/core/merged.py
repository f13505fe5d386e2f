"""The functional merged model: theta(lam) = theta_0 + sum_k lam[k, g] * tau_k,g, run with ``functional_call``.

One module holds the frozen base, the stacked task vectors and the coefficient tensor. The experts are never
touched; each forward composes the merged tensors from the ``[K, *shape]`` stacks (one fused op per tensor) and runs
the base architecture on them. Which tensors share a coefficient column ``g`` (granularity) and how the coefficients
are parametrised: ``adamerge.core.coefficients``.

Training is fast because the merge is linear in lam: ``two_stage_backward`` writes theta(lam) into persistent leaf
buffers without autograd (``training_leaves``), runs the model's backward once per task batch into them, then maps
the accumulated dL/dW to the coefficients with one matrix-vector product per tensor, ``<dL/dW, tau_k>``
(``coefficient_grad``). The merge costs O(K P) per step, whatever the number of task batches, and allocates nothing
(fresh merged tensors every step measured 4% slower on a 2-core CPU: more than the merge itself).
``merged_tensors`` is the differentiable reference path (evaluation, ``backward=joint``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.core.activation_checkpointing import block_names, checkpointed_blocks
from adamerge.core.coefficients import DEFAULT_BLOCK_PATTERN, group_layout
from adamerge.core.export import assign_tensor
from adamerge.core.lowrank import low_rank, merge_low_rank, worth_compressing
from adamerge.core.merged_base import MergedModelBase, TensorBank

if TYPE_CHECKING:
    from adamerge.core.pool import ExpertPool


def merge_tensor(base: Tensor, tau: Tensor, lam: Tensor) -> Tensor:
    """theta_0 + sum_k lam[k, c] tau[k] over the tensor's contiguous chunks c (flattened order). lam: [K, C]."""
    if lam.shape[1] == 1:
        delta = torch.tensordot(lam[:, 0].to(tau.dtype), tau, dims=1)  # (*shape)
        return base + delta.to(base.dtype)
    flat = tau.reshape(tau.shape[0], -1)  # (K, N)
    parts = [torch.mv(piece.T, w.to(tau.dtype)) for piece, w in zip(flat.tensor_split(lam.shape[1], dim=1), lam.T)]
    return base + torch.cat(parts).reshape(base.shape).to(base.dtype)


@torch.no_grad()
def merge_into(out: Tensor, base: Tensor, tau: Tensor, lam: Tensor) -> None:
    """``merge_tensor`` written into ``out`` (contiguous, base's shape and dtype): one ``addmv`` per chunk, no graph."""
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_tau = tau.reshape(tau.shape[0], -1)
    pieces = zip(
        flat_out.tensor_split(lam.shape[1]),
        flat_base.tensor_split(lam.shape[1]),
        flat_tau.tensor_split(lam.shape[1], dim=1),
        lam.T,
    )
    for o, b, t, w in pieces:
        if t.dtype == o.dtype:
            torch.addmv(b, t.T, w.to(t.dtype), out=o)
        else:  # e.g. bf16 task vectors on an fp32 base: the delta is formed in the task vectors' dtype, as above
            torch.add(b, torch.mv(t.T, w.to(t.dtype)).to(o.dtype), out=o)


@torch.no_grad()
def merge_grad(tau: Tensor, grad: Tensor, chunks: int) -> Tensor:
    """d L / d lam [K, chunks] of ``merge_tensor`` given dL/dW: ``<grad, tau_k>`` over each contiguous chunk."""
    flat_tau, flat_grad = tau.reshape(tau.shape[0], -1), grad.reshape(-1).to(tau.dtype)
    parts = zip(flat_tau.tensor_split(chunks, dim=1), flat_grad.tensor_split(chunks))
    return torch.stack([torch.mv(t, g) for t, g in parts], dim=1).float()


@torch.no_grad()
def low_rank_merge_grad(u: Tensor, v: Tensor, grad: Tensor) -> Tensor:
    """d L / d lam [K, 1] of ``merge_low_rank``: ``<grad, U_k V_k> = sum((U_k^T grad) * V_k)``."""
    projected = torch.matmul(u.transpose(1, 2), grad.to(u.dtype))  # (K, r, n)
    return (projected * v).sum(dim=(1, 2)).float()[:, None]


def low_rank_stacks(
    task_vectors: Mapping[str, Tensor], rank: int | None, energy: float | None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors for the 2-D tensors where they save memory; the others stay dense."""
    if rank is None and energy is None:
        raise ValueError("storage=lowrank needs method.rank or method.energy")
    factors = {}
    for name, tau in task_vectors.items():
        if tau.dim() == 3:
            u, v = low_rank(tau, rank, energy)
            if worth_compressing(tau.shape[1:], u.shape[-1]):
                factors[name] = (u, v)
    return factors


class StreamedMerge(torch.autograd.Function):
    """``merge_tensor`` with the task vectors kept off the device (pinned host memory): copied in for the forward and
    again for the backward, so only one tensor's stack is on the device at a time. Same ops, same result."""

    @staticmethod
    def forward(ctx, base: Tensor, tau_host: Tensor, lam: Tensor) -> Tensor:
        ctx.tau_host = tau_host
        ctx.save_for_backward(base, lam)
        return merge_tensor(base, tau_host.to(base.device, non_blocking=True), lam)

    @staticmethod
    def backward(ctx, grad: Tensor):
        base, lam = ctx.saved_tensors
        tau = ctx.tau_host.to(grad.device, non_blocking=True)
        with torch.enable_grad():
            lam = lam.detach().requires_grad_()
            (grad_lam,) = torch.autograd.grad(merge_tensor(base, tau, lam), lam, grad)
        return None, None, grad_lam


STORAGES = ("resident", "streamed", "lowrank")


class MergedModel(MergedModelBase):
    """Frozen base + task-vector stacks + coefficients; ``forward`` runs the base architecture on theta(lam)."""

    def __init__(
        self,
        pool: ExpertPool,
        granularity: str = "layer",
        init: float | Sequence[float] | Tensor = 0.3,
        parametrization: str = "identity",
        clamp: tuple[float, float] | None = (0.0, 1.0),
        block_pattern: str = DEFAULT_BLOCK_PATTERN,
        chunks: int | Mapping[str, int] = 1,
        storage: str = "resident",
        rank: int | None = None,
        energy: float | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ):
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; choose one of {STORAGES} (config key: method.storage)")
        names = list(pool.task_vectors)
        group_names, layout = group_layout(names, granularity, block_pattern, chunks)
        super().__init__(pool.model, pool.experts, pool.heads, group_names, granularity, init, parametrization, clamp)
        self.names, self.layout = names, layout
        self.vocab = pool.vocab
        # Blocks whose activations are recomputed in the backward instead of stored (adamerge.core.activation_checkpointing).
        self.checkpointed = block_names(self.names, block_pattern) if activation_checkpointing else []
        if activation_checkpointing and not self.checkpointed:
            raise ValueError(
                f"activation checkpointing found no block matching {block_pattern!r} among the merged tensors; "
                "set method.block_pattern to the model's layer names"
            )
        if compile and activation_checkpointing:
            raise ValueError("method.compile and method.activation_checkpointing cannot be combined; choose one")
        # torch.compile of the functional forward: the swapped-in tensors are graph inputs, so new values (every step,
        # every task's head) reuse one graph; on the 2-core CPU it did not pay (README), so it is off by default.
        self.compiled = compile
        self.call = torch.compile(self.functional_forward) if compile else self.functional_forward
        self.storage = storage
        factors = low_rank_stacks(pool.task_vectors, rank, energy) if storage == "lowrank" else {}
        if factors and granularity == "chunk":
            raise ValueError("low-rank task vectors merge whole tensors; use method.granularity=layer or block")
        self.low_rank_u = TensorBank({n: u for n, (u, _) in factors.items()})
        self.low_rank_v = TensorBank({n: v for n, (_, v) in factors.items()})
        dense = {n: t for n, t in pool.task_vectors.items() if n not in factors}
        if storage in ("resident", "lowrank"):
            self.task_vectors = TensorBank(dense)
        else:  # not buffers: .to(device) leaves them on the host; pinned for asynchronous copies when CUDA exists
            pin = torch.cuda.is_available()
            self.task_vectors = {n: t.cpu().pin_memory() if pin else t.cpu() for n, t in dense.items()}
        self._leaves: dict[str, Tensor] | None = None  # training_leaves' persistent buffers
        self._leaves_place: tuple | None = None

    def merged_tensors(self, lam: Tensor | None = None) -> dict[str, Tensor]:
        """theta(lam) for every merged tensor, differentiable w.r.t. the coefficients."""
        lam = self.coefficients() if lam is None else lam
        base = dict(self.model.named_parameters())
        merge = StreamedMerge.apply if self.storage == "streamed" else merge_tensor
        dense, factors = dict(self.task_vectors.items()), self.low_rank_factors()
        return {
            name: merge(base[name], dense[name], lam[:, cols])
            if name in dense
            else merge_low_rank(base[name], *factors[name], lam[:, cols])
            for name, cols in zip(self.names, self.layout)
        }

    def training_leaves(self, lam: Tensor) -> dict[str, Tensor]:
        """theta(lam) written into persistent buffers that are autograd leaves with no gradient yet.

        Made once (base dtype, base device) and reused every step; ``coefficient_grad`` maps their gradients back.
        """
        base = dict(self.model.named_parameters())
        place = (base[self.names[0]].device, base[self.names[0]].dtype)
        if self._leaves is None or self._leaves_place != place:  # first step, or the model moved
            self._leaves = {n: torch.empty_like(base[n], memory_format=torch.contiguous_format) for n in self.names}
            self._leaves_place = place
        buffers, dense, factors = self._leaves, dict(self.task_vectors.items()), self.low_rank_factors()
        lam = lam.detach()
        for name, cols in zip(self.names, self.layout):
            out = buffers[name]
            out.requires_grad_(False)
            if name in dense:
                merge_into(out, base[name].detach(), self._on_device(dense[name], out), lam[:, cols])
            else:
                with torch.no_grad():
                    out.copy_(merge_low_rank(base[name].detach(), *factors[name], lam[:, cols]))
            out.grad = None
            out.requires_grad_(True)
        return buffers

    def coefficient_grad(self, leaves: Mapping[str, Tensor]) -> Tensor:
        """d L / d lam [K, G] from d L / d W accumulated in the leaves (cleared here: between steps they would only
        raise the peak). A leaf without a gradient is a tensor the loss did not use."""
        dense, factors = dict(self.task_vectors.items()), self.low_rank_factors()
        total = self.coefficients.raw.new_zeros(self.coefficients.raw.shape)
        for name, cols in zip(self.names, self.layout):
            grad, leaves[name].grad = leaves[name].grad, None
            if grad is None:
                continue
            if name in dense:
                total[:, cols] += merge_grad(self._on_device(dense[name], grad), grad, len(cols)).to(total.device)
            else:
                total[:, cols] += low_rank_merge_grad(*factors[name], grad).to(total.device)
        return total

    def low_rank_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (U [K, m, r], V [K, r, n]) of the task vectors kept low rank (``storage=lowrank``)."""
        return dict(zip(self.low_rank_u.names, zip(self.low_rank_u.tensors(), self.low_rank_v.tensors())))

    def release_training_leaves(self) -> None:
        """Free the persistent leaf buffers (one model's worth of memory) once training is over."""
        self._leaves = None

    @staticmethod
    def _on_device(tau: Tensor, like: Tensor) -> Tensor:
        """A task-vector stack where ``like`` lives: a no-op when resident, a copy from pinned memory when streamed."""
        return tau.to(like.device, non_blocking=True)

    def forward(self, *args, task: str | None = None, params: Mapping[str, Tensor] | None = None, **kwargs):
        """Run the base architecture on merged tensors (``params``, default theta(lam)) with ``task``'s head."""
        params = dict(self.merged_tensors() if params is None else params)
        if task is not None:
            params |= self.head(task)
        if self.checkpointed and torch.is_grad_enabled():
            with checkpointed_blocks(self.model, self.checkpointed, params):
                return self.call(params, args, kwargs)
        return self.call(params, args, kwargs)

    def functional_forward(self, params: Mapping[str, Tensor], args: tuple, kwargs: dict):
        return functional_call(self.model, params, args, kwargs, strict=False)

    @torch.no_grad()
    def merge_and_unload(self, task: str | None = None, params: Mapping[str, Tensor] | None = None) -> nn.Module:
        """A plain copy of the base architecture holding theta(lam) (and ``task``'s head): no adamerge needed."""
        model = copy.deepcopy(self.model)
        tensors = dict(self.merged_tensors() if params is None else params)
        if task is not None:
            tensors |= self.head(task)
        for name, value in tensors.items():
            assign_tensor(model, name, value.detach())
        return model
