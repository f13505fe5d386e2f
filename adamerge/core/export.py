"""Export a merge: the merged model (``save_pretrained``, safetensors), its tokenizer/processor, the per-task heads
and the coefficients as JSON, all in one folder written atomically.

Layout::

    out/model/            # plain Hugging Face folder: AutoModel*.from_pretrained(out/"model") works
    out/heads/<task>.safetensors   # per-task head tensors, never merged (load with ``load_merged(out, task)``)
    out/coefficients.json # expert -> group -> lambda, plus granularity and experts, to reproduce the merge
    out/vocab_provenance.md  # only when experts added tokens: which experts each added row came from
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.atomic import atomic_path, write_json

log = logging.getLogger(__name__)


def coefficients_record(merged: nn.Module) -> dict:
    return {
        "experts": merged.experts,
        "granularity": merged.granularity,
        "groups": merged.group_names,
        "coefficients": merged.coefficient_table(),
    }


def save_coefficients(merged: nn.Module, path: str | Path) -> Path:
    return write_json(path, coefficients_record(merged))


def load_coefficients(merged: nn.Module, path: str | Path) -> None:
    record = json.loads(Path(path).read_text())
    if record.get("granularity") != merged.granularity:
        raise ValueError(
            f"{path} holds {record.get('granularity')!r} coefficients but the model is "
            f"{merged.granularity!r}-wise; set method.granularity={record.get('granularity')}"
        )
    merged.load_coefficient_table(record["coefficients"])


def save_preprocessor(source: str | None, out: Path) -> None:
    """Save the base's tokenizer or processor next to the model when one can be loaded; skip quietly otherwise."""
    if not source:
        return
    from transformers import AutoProcessor, AutoTokenizer

    for cls in (AutoProcessor, AutoTokenizer):
        try:
            cls.from_pretrained(source).save_pretrained(out)
            return
        except (OSError, ValueError, KeyError, TypeError):
            continue
    log.info("no tokenizer/processor found at %s; exported the model without one", source)


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    heads: Mapping[str, Mapping[str, Tensor]] | None = None,
    record: dict | None = None,
    preprocessor_source: str | None = None,
    vocab=None,
) -> Path:
    """Write ``model`` (with ``save_pretrained``), heads and a JSON record into ``out_dir`` atomically.

    With ``vocab`` (a ``VocabUnion``: experts added tokens) the union tokenizer replaces the base's and
    ``vocab_provenance.md`` says which experts each added row came from.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_path(out_dir, directory=True) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if vocab is None:
            save_preprocessor(preprocessor_source, tmp / "model")
        else:
            from adamerge.core.vocab import save_vocab

            save_vocab(vocab, tmp, tmp / "model")
        for task, tensors in (heads or {}).items():
            if tensors:
                (tmp / "heads").mkdir(exist_ok=True)
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    str(tmp / "heads" / f"{task}.safetensors"),
                )
        if record is not None:
            write_json(tmp / "coefficients.json", record)
    log.info("exported merged model to %s", out_dir)
    return out_dir


def export_merged(merged: nn.Module, out_dir: str | Path, preprocessor_source: str | None = None) -> Path:
    """Export theta(lam) of a ``MergedModelBase`` with its heads and coefficients."""
    return merged.export(out_dir, record=coefficients_record(merged), source=preprocessor_source)


def load_merged(out_dir: str | Path, task: str | None = None, model_class: str = "transformers.AutoModel") -> nn.Module:
    """Reload an export; with ``task``, that task's head is put in place."""
    from safetensors.torch import load_file

    from adamerge.core.pool import import_object

    out_dir = Path(out_dir)
    model = import_object(model_class).from_pretrained(out_dir / "model")
    if task is not None:
        head_file = out_dir / "heads" / f"{task}.safetensors"
        if not head_file.exists():
            available = sorted(p.stem for p in (out_dir / "heads").glob("*.safetensors"))
            raise FileNotFoundError(f"no head for task {task!r} in {out_dir}; available: {available}")
        for name, value in load_file(str(head_file)).items():
            assign_tensor(model, name, value)
    return model


def assign_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in ``model.<name>``: in place when the shape matches, else as a new tensor (a head with another
    number of classes)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if old.shape == value.shape:  # in place, so that a tied tensor (lm_head = embed_tokens) stays tied
        with torch.no_grad():
            old.copy_(value)
        return
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.to(old.dtype).clone(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, value.to(old.dtype).clone())
    config = getattr(model, "config", None)
    if old.shape != value.shape and hasattr(config, "num_labels") and value.dim() >= 1:
        config.num_labels = value.shape[0]
