"""Experts whose vocabularies extend the base's: chat or tool tokens added after the base's tokens, with new rows.

Such an expert has more rows than the base in its vocab-indexed tensors (input embeddings, LM head). The rows it
shares with the base merge as every other tensor does; a token it added gets one row in the merge, the mean of the
rows of the experts that added that token string, whatever the coefficients. The pool does this by extending the base
model to the union vocabulary before any task vector is formed: base tokens keep their ids, added tokens follow in
first-seen order (experts in pool order); an added token's base row is the experts' mean and every expert's task
vector is zero there, so theta(lam) holds the mean for any lam, and calibration text with chat tokens runs through
the model as is. The exported folder carries the union tokenizer and ``vocab_provenance.md``: which expert each
added row came from.

An expert whose tokenizer maps an id below the base's vocabulary size to another string than the base's is not an
extension (another tokenizer, or a reordered one): merging its rows by id would mix unrelated tokens, so it is
refused, by name, before any task vector is built. Consequence for one-expert views (``expert_params``): an added
row holds the experts' mean there too, not that expert's own row.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.readers import PoolError, SafetensorsReader, TensorReader, align_key, expert_key, local_path

log = logging.getLogger(__name__)

PROVENANCE_FILE = "vocab_provenance.md"


@dataclass
class VocabUnion:
    """The merged vocabulary: the base's tokens, then the tokens the experts added.

    Args:
        tokenizer: the union tokenizer (the base's plus the added tokens, at their union ids).
        base_size: ids below it are the base's tokens (their rows merge as usual).
        sources: added token -> {expert: the token's id in that expert's vocabulary}, in union order; the union id
            of the i-th token is ``base_size + i``.
        names: the vocab-indexed tensors (base model names) whose rows were extended.
    """

    tokenizer: Any
    base_size: int
    sources: dict[str, dict[str, int]]
    names: list[str]

    @property
    def added(self) -> list[str]:
        return list(self.sources)

    @property
    def size(self) -> int:
        return self.base_size + len(self.sources)

    def union_id(self, token: str) -> int:
        return self.base_size + self.added.index(token)


# --------------------------------------------------------------------------------------------------------------
# Tokens: pure functions over id -> string tables.
# --------------------------------------------------------------------------------------------------------------


def token_table(tokenizer) -> dict[int, str]:
    """id -> token string, added tokens included."""
    return {i: t for t, i in tokenizer.get_vocab().items()}


def check_extension(base: Mapping[int, str], expert_table: Mapping[int, str], base_size: int, expert: str) -> None:
    """Refuse an expert whose ids below ``base_size`` are not the base's tokens: its rows would merge by wrong id."""
    for i in range(base_size):
        if expert_table.get(i) != base.get(i):
            raise PoolError(
                f"expert {expert!r}: token id {i} is {expert_table.get(i)!r} in its tokenizer but {base.get(i)!r} in "
                f"the base's; its vocabulary is not an extension of the base's (added tokens must come after the "
                f"base's {base_size}), so rows cannot be merged by id. Fix {expert_key(expert)} (an expert of this "
                "base) or experts.tokenizers / experts.base_tokenizer if the wrong tokenizer was read"
            )


def added_tokens(expert_table: Mapping[int, str], base_size: int) -> dict[str, int]:
    """token -> the expert's id, for the tokens after the base's (in id order)."""
    return {expert_table[i]: i for i in sorted(i for i in expert_table if i >= base_size)}


def vocab_union_sources(
    base: Mapping[int, str], experts: Mapping[str, Mapping[int, str]]
) -> tuple[int, dict[str, dict[str, int]]]:
    """(base size, added token -> {expert: its id}): base ids kept, added tokens in first-seen order over ``experts``."""
    base_size = max(base) + 1
    sources: dict[str, dict[str, int]] = {}
    for expert, table in experts.items():
        check_extension(base, table, base_size, expert)
        for token, i in added_tokens(table, base_size).items():
            sources.setdefault(token, {})[expert] = i
    return base_size, sources


def union_tokenizer(base_tokenizer, tokenizers: Mapping[str, Any], base_size: int, sources: Mapping[str, Mapping]):
    """A copy of the base's tokenizer with the added tokens appended (as the first expert that added each defined it:
    special or not, stripping); the chat template is the base's, else the first expert's that has one."""
    from transformers import AddedToken

    union = copy.deepcopy(base_tokenizer)
    for j, (token, owners) in enumerate(sources.items()):
        expert, i = next(iter(owners.items()))
        spec = tokenizers[expert].added_tokens_decoder.get(i) or AddedToken(token, special=False)
        union.add_tokens([copy.copy(spec)], special_tokens=spec.special)
        if union.convert_tokens_to_ids(token) != base_size + j:
            raise PoolError(
                f"the union tokenizer put added token {token!r} (from expert {expert!r}) at id "
                f"{union.convert_tokens_to_ids(token)}, not {base_size + j}: the base's tokenizer has "
                f"{len(base_tokenizer)} entries but ids up to {base_size - 1}; give a base tokenizer without gaps "
                "(experts.base_tokenizer)"
            )
    templates = {e: t.chat_template for e, t in tokenizers.items() if getattr(t, "chat_template", None)}
    if not getattr(union, "chat_template", None) and templates:
        first = next(iter(templates))
        union.chat_template = templates[first]
        if len(set(templates.values())) > 1:
            log.warning("experts have different chat templates; the merged tokenizer keeps %r's", first)
    return union


def provenance_markdown(vocab: VocabUnion) -> str:
    """The table of where the merged vocabulary's rows came from, for the export folder."""
    lines = [
        "# Vocabulary of the merge",
        "",
        f"Ids 0-{vocab.base_size - 1}: the base's tokens; their rows are merged from every expert.",
        "Each added token's row is the mean of the rows of the experts that added it (the same for any coefficients).",
        "",
        "| id | token | from experts | their ids |",
        "|---:|---|---|---|",
    ]
    for token, owners in vocab.sources.items():
        cell = token.replace("|", "\\|")
        ids = ", ".join(str(i) for i in owners.values())
        lines.append(f"| {vocab.union_id(token)} | `{cell}` | {', '.join(owners)} | {ids} |")
    return "\n".join(lines) + "\n"


def save_vocab(vocab: VocabUnion, out_dir: Path, model_dir: Path) -> None:
    """The union tokenizer beside the model, and the provenance table in the export's root."""
    vocab.tokenizer.save_pretrained(model_dir)
    (out_dir / PROVENANCE_FILE).write_text(provenance_markdown(vocab))


# --------------------------------------------------------------------------------------------------------------
# Rows: which tensors are vocab-indexed, which experts extend them, the union model's rows.
# --------------------------------------------------------------------------------------------------------------


def vocab_tensor_names(model: nn.Module) -> list[str]:
    """The parameters ``resize_token_embeddings`` resizes (token embeddings, LM head and its bias; tied ones once);
    none for a model without token embeddings (vision towers, plain modules)."""
    try:
        embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if not isinstance(embeddings, nn.Embedding) or not hasattr(model, "resize_token_embeddings"):
        return []
    tensors = [embeddings.weight]
    if output is not None:
        tensors += [
            t for t in (getattr(output, "weight", None), getattr(output, "bias", None)) if isinstance(t, Tensor)
        ]
    return [n for n, p in model.named_parameters() if any(p is t for t in tensors)]


def tensor_shape(reader: TensorReader, key: str) -> tuple[int, ...]:
    """From the header where the format has one; else the (lazily loaded) tensor's."""
    return tuple(reader.shape(key) if isinstance(reader, SafetensorsReader) else reader.get(key).shape)


def row_extensions(
    base_state: Mapping[str, Tensor], readers: Mapping[str, TensorReader], names: list[str], prefix: str
) -> dict[str, int]:
    """expert -> rows of its vocab-indexed tensors, for the experts that have more than the base.

    Only a pure row extension counts (same trailing dims, more rows); any other shape difference is left to the
    architecture check of ``build_task_vectors``.
    """
    grown = {}
    for expert, reader in readers.items():
        keys = reader.keys()
        rows = {}
        for name in names:
            key = align_key(name, keys, prefix)
            if key is None:
                continue
            shape, base = tensor_shape(reader, key), base_state[name].shape
            if shape[1:] == tuple(base[1:]) and shape[0] > base[0]:
                rows[name] = shape[0]
        if rows and (len(set(rows.values())) > 1 or len(rows) < len(names)):
            raise PoolError(
                f"expert {expert!r}: its vocab-indexed tensors have {rows} rows where the base has "
                f"{ {n: base_state[n].shape[0] for n in names} }; an added vocabulary extends all of them equally. "
                f"Fix {expert_key(expert)}"
            )
        if rows:
            grown[expert] = next(iter(rows.values()))
    return grown


def mean_added_rows(vocab: VocabUnion, read: Callable[[str], Tensor]) -> Tensor:
    """[added, *trailing] float32: each added token's row averaged over the experts that added it, reading one
    expert's tensor at a time (``read(expert)``)."""
    experts = list(dict.fromkeys(e for owners in vocab.sources.values() for e in owners))
    sums, counts = None, torch.zeros(len(vocab.sources))
    for expert in experts:
        value = read(expert)
        if sums is None:
            sums = torch.zeros((len(vocab.sources), *value.shape[1:]), dtype=torch.float32)
        for j, owners in enumerate(vocab.sources.values()):
            if expert in owners:
                sums[j] += value[owners[expert]].float()
                counts[j] += 1
    return sums / counts.view(-1, *[1] * (sums.dim() - 1))


class UnionRowsReader(TensorReader):
    """An expert seen in the union vocabulary: its own rows for the base's tokens, the union base's rows after them,
    so its task vector is zero on every added token (and on padding rows)."""

    def __init__(self, reader: TensorReader, union_values: Mapping[str, Tensor], base_size: int):
        self.reader, self.union_values, self.base_size = reader, union_values, base_size

    def keys(self) -> set[str]:
        return self.reader.keys()

    def get(self, name: str) -> Tensor:
        value = self.reader.get(name)
        union = self.union_values.get(name)
        if union is None or value.shape[1:] != union.shape[1:] or value.shape[0] < self.base_size:
            return value  # not a vocabulary row extension: the architecture check names the mismatch
        out = union.detach().to(value.dtype, copy=True)
        out[: self.base_size] = value[: self.base_size]
        return out


# --------------------------------------------------------------------------------------------------------------
# Putting it together for the pool.
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(source, who: str, key: str):
    """A tokenizer object as is; a folder or hub id through ``AutoTokenizer``, the failure naming ``who`` and ``key``."""
    if not isinstance(source, str | Path):
        return source
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(local_path(str(source), key, who)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PoolError(
            f"{who}: no tokenizer could be loaded from {source} ({type(err).__name__}: {str(err)[:200]}); an added "
            f"vocabulary is merged by token string, which needs it: save the tokenizer there or set {key}"
        ) from err


def expert_tables(
    rows: Mapping[str, int],
    grown: Mapping[str, int],
    sources: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
    base_table: Mapping[int, str],
) -> tuple[dict[str, dict[int, str]], dict[str, Any]]:
    """(expert -> token table, expert -> tokenizer) for every expert of ``rows`` (expert -> its vocabulary rows); an
    expert that did not grow and has no tokenizer is taken to speak the base's vocabulary, one that grew must have one."""
    tables, loaded = {}, {}
    for expert in rows:
        key = f"experts.tokenizers.{expert}"
        source = tokenizers.get(expert, sources.get(expert))
        if expert in grown:
            if not isinstance(source, str | Path) and not hasattr(source, "get_vocab"):
                raise PoolError(
                    f"expert {expert!r} has {grown[expert]} vocabulary rows but no tokenizer to name the added ones; "
                    f"give its tokenizer (folder or object) with {key}"
                )
            loaded[expert] = load_tokenizer(source, f"expert {expert!r}", key)
        else:
            try:
                tokenizer = load_tokenizer(source, f"expert {expert!r}", key) if source is not None else None
            except PoolError:
                tokenizer = None
            if not hasattr(tokenizer, "get_vocab"):  # none, or the source is a module / state dict
                log.info("expert %r: no tokenizer; taken to have the base's vocabulary", expert)
                tables[expert] = dict(base_table)
                continue
            loaded[expert] = tokenizer
        tables[expert] = token_table(loaded[expert])
        beyond = sorted(i for i in tables[expert] if i >= rows[expert])
        if beyond:
            raise PoolError(
                f"expert {expert!r}: its tokenizer has token {tables[expert][beyond[0]]!r} at id {beyond[0]} but its "
                f"vocab-indexed tensors have {rows[expert]} rows; fix {expert_key(expert)} or {key}"
            )
    return tables, loaded


def extend_vocabulary(
    model: nn.Module,
    readers: Mapping[str, TensorReader],
    grown: Mapping[str, int],
    names: list[str],
    prefix: str,
    base_tokenizer,
    sources: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
) -> tuple[VocabUnion, dict[str, TensorReader]]:
    """Resize ``model`` to the union vocabulary (added rows: the experts' means) and wrap the readers to match.

    Args:
        model: the base model; resized in place (``resize_token_embeddings``), ``config.vocab_size`` with it.
        readers: expert -> its reader, in pool order (the union's order of added tokens).
        grown: expert -> rows, for the experts with more rows than the base (``row_extensions``).
        names: the vocab-indexed tensors (``vocab_tensor_names``).
        base_tokenizer: the base's tokenizer, or its folder / hub id (``experts.base_tokenizer``, else ``experts.base``).
        sources: expert -> its source (tokenizers are read from folders there).
        tokenizers: expert -> tokenizer or folder, overriding ``sources`` (``experts.tokenizers``).
    """
    if base_tokenizer is None:
        raise PoolError(
            f"experts {sorted(grown)} have more vocabulary rows than the base, which needs the base's tokenizer to "
            "match tokens; set experts.base to a folder or hub id with one, or experts.base_tokenizer"
        )
    base_tokenizer = load_tokenizer(base_tokenizer, "the base", "experts.base_tokenizer")
    base_table = token_table(base_tokenizer)
    base_rows = dict(model.named_parameters())[names[0]].shape[0]
    rows = {expert: grown.get(expert, base_rows) for expert in readers}
    tables, loaded = expert_tables(rows, grown, sources, tokenizers, base_table)
    base_size, added = vocab_union_sources(base_table, tables)
    if base_size > base_rows:
        raise PoolError(
            f"the base's tokenizer has {base_size} ids but its {names[0]!r} has {base_rows} rows; fix "
            "experts.base_tokenizer (the base's own tokenizer)"
        )
    vocab = VocabUnion(union_tokenizer(base_tokenizer, loaded, base_size, added), base_size, added, list(names))
    for expert in grown.keys() - {e for owners in added.values() for e in owners}:
        log.warning(
            "expert %r has more vocabulary rows than the base but no added token: its extra rows are dropped", expert
        )
    means = {
        name: mean_added_rows(vocab, lambda e, n=name: readers[e].get(align_key(n, readers[e].keys(), prefix)))
        for name in (names if added else [])
    }
    model.resize_token_embeddings(max(base_rows, vocab.size), mean_resizing=False)
    model.requires_grad_(False)  # the resized tensors are new parameters
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, mean in means.items():
            state[name][base_size : vocab.size] = mean.to(state[name].dtype)
    log.info("vocabulary: %d base tokens + %d added by the experts: %s", base_size, len(added), vocab.added)
    union_values = {name: state[name] for name in names}
    wrapped = {}
    for expert, reader in readers.items():
        keys = reader.keys()
        values = {align_key(n, keys, prefix): v for n, v in union_values.items() if align_key(n, keys, prefix)}
        wrapped[expert] = UnionRowsReader(reader, values, base_size)
    return vocab, wrapped
