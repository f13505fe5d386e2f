"""Where a tensor sits in a transformer, from its name alone: its block (embeddings, layer N, head/other) and kind
(attention q/k/v/out, mlp in/out, norms; weight or bias), for BERT, Llama, GPT-2, CLIP and similar names. The
coefficient heatmap is laid out by these."""

from __future__ import annotations

import re
from collections.abc import Sequence

# The first "<layers|layer|h|blocks|block>.<index>" in a name: the transformer block it belongs to.
LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?=\.|$|#)")
TOWERS = {"vision_model": "vision", "visual": "vision", "vision_tower": "vision", "text_model": "text"}
NORM_BEFORE_ATTN = {"ln_1", "layer_norm1", "input_layernorm", "layernorm_before", "norm1", "attention_norm"}
NORM_BEFORE_MLP = {"ln_2", "layer_norm2", "post_attention_layernorm", "layernorm_after", "norm2", "ffn_norm"}
ATTN_PARTS = {
    "attn q": {"query", "q_proj", "q", "q_lin"},
    "attn k": {"key", "k_proj", "k", "k_lin"},
    "attn v": {"value", "v_proj", "v", "v_lin"},
    "attn qkv": {"c_attn", "qkv", "query_key_value", "in_proj", "qkv_proj", "wqkv"},
    "attn out": {"o_proj", "out_proj", "c_proj", "o", "dense", "out_lin", "wo"},
}
MLP_PARTS = {
    "mlp gate": {"gate_proj", "wi_0"},
    "mlp in": {"fc1", "c_fc", "up_proj", "wi", "wi_1", "dense_h_to_4h", "lin1"},
    "mlp out": {"fc2", "c_proj", "down_proj", "wo", "dense_4h_to_h", "lin2"},
}
EMBEDDINGS = {
    "token emb": {"word_embeddings", "embed_tokens", "wte", "token_embedding", "shared"},
    "position emb": {"position_embeddings", "wpe", "position_embedding", "embed_positions"},
    "token type emb": {"token_type_embeddings"},
    "patch emb": {"patch_embedding", "patch_embeddings", "projection"},
    "class emb": {"class_embedding", "cls_token"},
}
PRE_NORMS = {"pre_layrnorm", "pre_layernorm", "ln_pre"}  # CLIP's norm between the embeddings and the first block
HEADS = {"classifier": "classifier", "lm_head": "lm head", "score": "score head", "pooler": "pooler"}


# ---------------------------------------------------------------- names -> block and kind


def split_chunk(name: str) -> tuple[str, int | None]:
    """``"w#3"`` -> ``("w", 3)`` (chunk 3 of tensor w, chunk granularity); other names -> ``(name, None)``."""
    stem, sep, chunk = name.rpartition("#")
    return (stem, int(chunk)) if sep and chunk.isdigit() else (name, None)


def _tower(prefix: str) -> str:
    """``"vision "`` / ``"text "`` / ``"decoder "`` when the name sits in one tower of a two-tower model."""
    for part in prefix.split("."):
        if part in TOWERS:
            return TOWERS[part] + " "
        if part == "decoder":
            return "decoder "
    return ""


def _is_embedding(parts: Sequence[str]) -> bool:
    return any("embed" in p or p in ("wte", "wpe", "shared", "cls_token") or p in PRE_NORMS for p in parts)


def block_label(name: str) -> str:
    """The block a coefficient group belongs to: ``embeddings``, ``layer N``, ``head/other`` or ``all tensors``.

    Works on tensor names (``bert.encoder.layer.3.attention.self.query.weight``, ``model.layers.3.mlp.up_proj.weight``,
    ``transformer.h.3.attn.c_attn.weight``, ``vision_model.encoder.layers.3.mlp.fc1.weight``), chunk names
    (``<tensor>#c``), block keys (``bert.encoder.layer.3``) and ``all`` (task-wise). Two-tower and encoder-decoder
    models get a ``vision`` / ``text`` / ``decoder`` prefix.
    """
    name, _ = split_chunk(name)
    if name == "all":
        return "all tensors"
    match = LAYER.search(name)
    if match:
        return f"{_tower(name[: match.start()])}layer {match.group(1)}"
    parts = name.split(".")
    return _tower(name) + ("embeddings" if _is_embedding(parts) else "head/other")


def _param(name: str) -> tuple[list[str], str]:
    """Module path parts and the parameter (``weight`` / ``bias``, or ``""`` for a block or module key)."""
    parts = name.split(".")
    last = parts[-1]
    if last in ("weight", "bias"):
        return parts[:-1], last
    for suffix in ("_weight", "_bias"):  # nn.MultiheadAttention's in_proj_weight
        if last.endswith(suffix):
            return parts[:-1] + [last[: -len(suffix)]], suffix[1:]
    return parts, ""


def _is_norm(part: str) -> bool:
    return "norm" in part or re.fullmatch(r"ln(_\w+)?", part) is not None


def _layer_kind(parts: Sequence[str]) -> str:
    """Kind of a tensor inside a transformer block, from its module path below the block."""
    if not parts:
        return ""
    last, low = parts[-1], [p.lower() for p in parts]
    in_attn = any("attn" in p or "attention" in p for p in low[:-1])
    if _is_norm(last.lower()):
        if last in NORM_BEFORE_ATTN:
            return "attn norm"
        if last in NORM_BEFORE_MLP:
            return "mlp norm"
        if in_attn:
            return "attn norm"  # BERT: attention.output.LayerNorm
        return "mlp norm" if any(p in ("output", "mlp", "ffn", "feed_forward") for p in low) else "norm"
    if "intermediate" in low:  # BERT's mlp in: intermediate.dense
        return "mlp in"
    if in_attn or last in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj"):
        cross = any("encoder_attn" in p or "cross" in p or "encdec" in p for p in low[:-1])
        for kind, names in ATTN_PARTS.items():
            if last in names:
                return kind.replace("attn", "cross-attn") if cross else kind
    for kind, names in MLP_PARTS.items():
        if last in names:
            return kind
    if low[-2:] == ["output", "dense"]:  # BERT's mlp out: output.dense (attention.output.dense matched above)
        return "mlp out"
    return ".".join(parts)


def _outside_kind(parts: Sequence[str]) -> str:
    """Kind of a tensor outside the transformer blocks (embeddings, final norm, pooler, heads)."""
    if not parts:
        return ""
    for part in parts:
        if part in PRE_NORMS:
            return "pre norm"
    if _is_embedding(parts):
        for kind, names in EMBEDDINGS.items():
            if any(p in names for p in parts):
                return kind
        if parts[-1] in ("embeddings", "embedding"):
            return ""  # the embeddings module itself (a block-granularity group)
        return "norm" if _is_norm(parts[-1].lower()) else parts[-1]
    for part in parts:
        if part in HEADS:
            return HEADS[part]
    if _is_norm(parts[-1].lower()):
        return "final norm"
    return ".".join(parts[-2:]) if len(parts) > 1 else parts[0]


def tensor_kind(name: str) -> str:
    """What a group is inside its block: ``attn q weight``, ``mlp out bias``, ``attn norm weight``, ``token emb
    weight``, ``final norm weight``, ``classifier weight``...; ``""`` for a whole block (``encoder.layer.3``) or ``all``.

    Unknown module names fall back to their path inside the block, so two tensors of one block never share a kind
    unless their names map to the same known role (``coefficient_grid`` separates those by their paths).
    """
    name, _ = split_chunk(name)
    if name == "all":
        return ""
    match = LAYER.search(name)
    if match:
        rest = name[match.end() :].lstrip(".")
        parts, param = _param(rest) if rest else ([], "")
        kind = _layer_kind(parts)
    else:
        parts, param = _param(name)
        kind = _outside_kind(parts)
    return " ".join(x for x in (kind, param) if x)


def coefficient_grid(groups: Sequence[str]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Rows (tensor kinds), columns (blocks) and each group's (row, column) cell, in the model's order.

    Chunks of one tensor share a cell. Two different tensors of one block with the same kind are told apart by
    their path inside the block. Blocks and kinds appear in order of first appearance in ``groups``.
    """
    blocks = [block_label(g) for g in groups]
    kinds = [tensor_kind(g) for g in groups]
    tensors = [split_chunk(g)[0] for g in groups]
    owners: dict[tuple[str, str], set[str]] = {}
    for block, kind, tensor in zip(blocks, kinds, tensors):
        owners.setdefault((block, kind), set()).add(tensor)
    for i, (block, kind, tensor) in enumerate(zip(blocks, kinds, tensors)):
        if len(owners[(block, kind)]) > 1:
            match = LAYER.search(tensor)
            kinds[i] = tensor[match.end() :].lstrip(".") if match else tensor
    kinds = [k or "whole block" for k in kinds]
    rows, columns = list(dict.fromkeys(kinds)), list(dict.fromkeys(blocks))
    return rows, columns, [(rows.index(k), columns.index(b)) for k, b in zip(kinds, blocks)]


def column_labels(groups: Sequence[str]) -> list[str]:
    """One readable label per group for a flat axis: ``layer 3``, ``embeddings: token emb weight``, ``all tensors``."""
    labels = []
    for group in groups:
        block, kind = block_label(group), tensor_kind(group)
        _, chunk = split_chunk(group)
        label = f"{block}: {kind}" if kind else block
        labels.append(label if chunk is None else f"{label} #{chunk}")
    return labels


# ---------------------------------------------------------------- figures
