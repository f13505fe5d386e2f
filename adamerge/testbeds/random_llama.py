"""Llama-architecture models with random weights and synthetic experts on them, for step-time and memory checks at
LLM scale: timing and memory depend on shapes, not on trained weights, so nothing is downloaded.

Shapes (``LLAMA_SHAPES``): ``tiny`` (seconds on a CPU), ``smollm2-135m`` (SmolLM2-135M's), ``1b`` (TinyLlama-1.1B's)
and ``7b`` (Llama-2-7B's). Models are built directly on the target device and dtype, so a 7B never passes through
host memory. Dense experts are base + seeded noise, so a task vector is the noise itself: ``noise_task_vectors``
makes the ``[K, *shape]`` stacks in memory, one tensor at a time (no expert checkpoint is ever written), and
``ExpertPool(model, experts, stacks)`` takes them as they are. LoRA experts are random factors
(``random_lora_adapters``), for ``make_lora_pool``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adamerge.core.adapters import LoraAdapter, LoraFactors

LLAMA_SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOISE = 0.01  # task vector = NOISE x the base tensor's std: a fine-tune's order of magnitude


def llama_config(shape: str):
    """The ``LlamaConfig`` of a named shape (``LLAMA_SHAPES``)."""
    from transformers import LlamaConfig

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(LLAMA_SHAPES)}")
    kwargs = dict(max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return LlamaConfig(**(kwargs | LLAMA_SHAPES[shape]))


def random_llama(
    shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with random weights, allocated and initialised on ``device`` in ``dtype``;
    ``device="meta"`` gives the shapes only (for ``adamerge.estimate.memory_plan``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM._from_config(llama_config(shape), dtype=dtype).eval()


def noise_row(theta: Tensor, index: int, k: int, seed: int = 0, dtype: torch.dtype | None = None) -> Tensor:
    """Expert ``k``'s task vector for the model's ``index``-th parameter ``theta``: seeded noise of ``NOISE`` x its
    std, made on ``theta``'s device; the same for any caller (adamerge's stacks, FusionBench's expert copies)."""
    g = torch.Generator(theta.device).manual_seed(seed * 1_000_003 + index * 1009 + k)
    size = NOISE * theta.detach().float().std().clamp_min(1e-3).item() if theta.numel() > 1 else NOISE
    noise = torch.randn(theta.shape, generator=g, device=theta.device, dtype=dtype or theta.dtype)
    return noise.mul_(size)


def noise_task_vectors(
    model: nn.Module,
    num_experts: int,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    out: Tensor | None = None,
) -> dict[str, Tensor]:
    """``[K, *shape]`` task-vector stacks of every parameter, made on the model's device one tensor at a time and
    stored on ``device`` (default: the model's; ``"cpu"`` for ``storage=streamed``, so K models never sit on the
    accelerator at once), or as consecutive views of the flat tensor ``out`` (one allocation, page-locked at once)."""
    stacks, offset = {}, 0
    for index, (name, theta) in enumerate(model.named_parameters()):
        shape = (num_experts, *theta.shape)
        if out is None:
            stack = torch.empty(shape, dtype=dtype, device=device or theta.device)
        else:
            stack = out[offset : offset + shape[0] * theta.numel()].view(shape)
            offset += stack.numel()
        for k in range(num_experts):
            stack[k].copy_(noise_row(theta, index, k, seed, dtype))
        stacks[name] = stack
    return stacks


def random_lora_adapters(
    model: nn.Module,
    num_experts: int,
    rank: int = 16,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, LoraAdapter]:
    """``num_experts`` LoRA adapters of ``rank`` on every ``nn.Linear`` named by ``targets`` (alpha = 2 r); A as
    PEFT initialises it, B small and non-zero (a trained adapter's), made on the model's device."""
    g = torch.Generator().manual_seed(seed)
    linears = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets
    ]
    if not linears:
        raise ValueError(f"no nn.Linear named one of {list(targets)} in the model")
    adapters = {}
    for k in range(num_experts):
        modules = {}
        for name, linear in linears:
            out_features, in_features = linear.weight.shape
            A = torch.randn(rank, in_features, generator=g) / in_features**0.5
            B = torch.randn(out_features, rank, generator=g) * NOISE
            to = dict(device=linear.weight.device, dtype=dtype or linear.weight.dtype)
            modules[f"{name}.weight"] = LoraFactors(A.to(**to), B.to(**to), scale=2.0)
        adapters[f"task{k}"] = LoraAdapter(f"task{k}", modules)
    return adapters


def token_batches(
    vocab_size: int, num: int, batch: int, seq: int, seed: int = 0, device: str | torch.device = "cpu"
) -> list[dict[str, Tensor]]:
    """``num`` batches of ``batch`` x ``seq`` random token ids (no padding)."""
    g = torch.Generator().manual_seed(seed + 12345)
    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)})
    return out
