"""Run pictures: block / kind labels of four model families, the heatmap's axes, the training and results charts,
the metric readers (CSV, TensorBoard, offline W&B) and the hand-off to loggers."""

import struct
import zlib
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from adamerge.artifacts.plots import (
    coefficient_figure,
    log_images,
    result_tasks,
    results_figure,
    training_figure,
    write_run_plots,
)
from adamerge.artifacts.run_reader import (
    describe_run,
    method_kind,
    primary_metric,
    read_coefficients,
    read_results,
    read_training_metrics,
)
from adamerge.artifacts.tensor_names import block_label, coefficient_grid, column_labels, tensor_kind

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

NAMES = [  # (tensor or group name, block, kind)
    # BERT
    ("bert.embeddings.word_embeddings.weight", "embeddings", "token emb weight"),
    ("bert.embeddings.LayerNorm.bias", "embeddings", "norm bias"),
    ("bert.encoder.layer.3.attention.self.query.weight", "layer 3", "attn q weight"),
    ("bert.encoder.layer.3.attention.self.query.bias", "layer 3", "attn q bias"),
    ("bert.encoder.layer.3.attention.output.dense.weight", "layer 3", "attn out weight"),
    ("bert.encoder.layer.3.attention.output.LayerNorm.weight", "layer 3", "attn norm weight"),
    ("bert.encoder.layer.3.intermediate.dense.weight", "layer 3", "mlp in weight"),
    ("bert.encoder.layer.3.output.dense.bias", "layer 3", "mlp out bias"),
    ("bert.encoder.layer.3.output.LayerNorm.weight", "layer 3", "mlp norm weight"),
    ("bert.pooler.dense.weight", "head/other", "pooler weight"),
    ("classifier.weight", "head/other", "classifier weight"),
    # Llama
    ("model.embed_tokens.weight", "embeddings", "token emb weight"),
    ("model.layers.11.self_attn.k_proj.weight", "layer 11", "attn k weight"),
    ("model.layers.11.self_attn.o_proj.weight", "layer 11", "attn out weight"),
    ("model.layers.11.mlp.gate_proj.weight", "layer 11", "mlp gate weight"),
    ("model.layers.11.mlp.up_proj.weight", "layer 11", "mlp in weight"),
    ("model.layers.11.mlp.down_proj.weight", "layer 11", "mlp out weight"),
    ("model.layers.11.input_layernorm.weight", "layer 11", "attn norm weight"),
    ("model.layers.11.post_attention_layernorm.weight", "layer 11", "mlp norm weight"),
    ("model.norm.weight", "head/other", "final norm weight"),
    ("lm_head.weight", "head/other", "lm head weight"),
    # GPT-2
    ("transformer.wte.weight", "embeddings", "token emb weight"),
    ("transformer.wpe.weight", "embeddings", "position emb weight"),
    ("transformer.h.0.ln_1.weight", "layer 0", "attn norm weight"),
    ("transformer.h.0.attn.c_attn.weight", "layer 0", "attn qkv weight"),
    ("transformer.h.0.attn.c_proj.bias", "layer 0", "attn out bias"),
    ("transformer.h.0.mlp.c_fc.weight", "layer 0", "mlp in weight"),
    ("transformer.h.0.mlp.c_proj.weight", "layer 0", "mlp out weight"),
    ("transformer.ln_f.bias", "head/other", "final norm bias"),
    # CLIP
    ("vision_model.embeddings.patch_embedding.weight", "vision embeddings", "patch emb weight"),
    ("vision_model.embeddings.class_embedding", "vision embeddings", "class emb"),
    ("vision_model.pre_layrnorm.weight", "vision embeddings", "pre norm weight"),
    ("vision_model.encoder.layers.7.self_attn.v_proj.weight", "vision layer 7", "attn v weight"),
    ("vision_model.encoder.layers.7.layer_norm1.weight", "vision layer 7", "attn norm weight"),
    ("vision_model.encoder.layers.7.mlp.fc2.bias", "vision layer 7", "mlp out bias"),
    ("vision_model.post_layernorm.weight", "vision head/other", "final norm weight"),
    ("text_model.encoder.layers.2.self_attn.q_proj.weight", "text layer 2", "attn q weight"),
    # group names of the coarser granularities, and chunks
    ("all", "all tensors", ""),
    ("bert.encoder.layer.3", "layer 3", ""),
    ("model.layers.4", "layer 4", ""),
    ("bert.embeddings.word_embeddings", "embeddings", "token emb"),
    ("model.layers.5.mlp.down_proj.weight#2", "layer 5", "mlp out weight"),
]


@pytest.mark.parametrize(("name", "block", "kind"), NAMES)
def test_block_and_kind_of_four_families(name, block, kind):
    assert (block_label(name), tensor_kind(name)) == (block, kind)


def bert_groups(layers: int = 2) -> list[str]:
    names = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight"]
    for i in range(layers):
        prefix = f"bert.encoder.layer.{i}"
        names += [f"{prefix}.attention.self.query.weight", f"{prefix}.attention.self.query.bias"]
        names += [f"{prefix}.output.dense.weight", f"{prefix}.output.LayerNorm.weight"]
    return names + ["bert.pooler.dense.weight"]


def test_grid_puts_each_tensor_in_its_block_and_kind():
    rows, columns, cells = coefficient_grid(bert_groups())
    assert columns == ["embeddings", "layer 0", "layer 1", "head/other"]
    assert rows == [
        "token emb weight",
        "norm weight",
        "attn q weight",
        "attn q bias",
        "mlp out weight",
        "mlp norm weight",
        "pooler weight",
    ]
    # layer 1's query bias: row "attn q bias", column "layer 1"
    assert cells[7] == (3, 2)
    assert len(set(cells)) == len(cells)


def test_grid_tells_apart_tensors_of_one_kind_by_their_path():
    groups = ["encoder.block.0.layer.0.layer_norm.weight", "encoder.block.0.layer.1.layer_norm.weight"]
    rows, columns, cells = coefficient_grid(groups)
    assert columns == ["layer 0"]
    assert rows == ["layer.0.layer_norm.weight", "layer.1.layer_norm.weight"]
    assert cells == [(0, 0), (1, 0)]


def test_grid_shares_a_cell_between_chunks_and_labels_whole_blocks():
    rows, _, cells = coefficient_grid(["model.layers.0.mlp.up_proj.weight#0", "model.layers.0.mlp.up_proj.weight#1"])
    assert rows == ["mlp in weight"] and cells == [(0, 0), (0, 0)]
    rows, columns, _ = coefficient_grid(
        ["bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm", "bert.encoder.layer.0"]
    )
    assert rows == ["token emb", "norm", "whole block"] and columns == ["embeddings", "layer 0"]


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_layer_wise_heatmap_names_blocks_and_kinds(tmp_path):
    groups = bert_groups()
    table = {"sst2": {g: 0.1 * i for i, g in enumerate(groups)}, "news": {g: 0.3 for g in groups}}
    fig = coefficient_figure(table, "adamerging")
    panels = [ax for ax in fig.axes if ax.get_ylabel() in table]
    assert [ax.get_ylabel() for ax in panels] == ["sst2", "news"]
    assert tick_texts(panels[-1].get_xticklabels()) == ["embeddings", "layer 0", "layer 1", "head/other"]  # shared x
    for ax in panels:
        assert "attn q bias" in tick_texts(ax.get_yticklabels())
    image = panels[0].images[0].get_array()
    assert image[3, 2] == pytest.approx(0.1 * 7)  # sst2, "attn q bias" of layer 1 (group 7)
    assert image.mask[0, 1]  # no token embedding in layer 0: masked, drawn grey


def test_block_and_task_wise_heatmaps_label_each_column():
    blocks = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    fig = coefficient_figure({"a": dict.fromkeys(blocks, 0.2), "b": dict.fromkeys(blocks, 0.4)})
    assert tick_texts(fig.axes[0].get_xticklabels()) == ["layer 0", "layer 1"]
    assert tick_texts(fig.axes[0].get_yticklabels()) == ["a", "b"]
    assert column_labels(["all", "bert.embeddings.word_embeddings.weight#1"]) == [
        "all tensors",
        "embeddings: token emb weight #1",
    ]


def write_lightning_csv(run_dir: Path, steps: int = 5) -> Path:
    """A metrics.csv shaped like Lightning's CSVLogger: one row per logging call, empty cells elsewhere."""
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    columns = [
        "coef/max",
        "coef/mean",
        "coef/min",
        "coef/std",
        "results/ties/avg",
        "step",
        "train/loss",
        "train/loss/a",
    ]
    lines = [",".join(columns)]
    for s in range(steps):
        lines.append(f"{0.3 + 0.02 * s},{0.3 + 0.01 * s},{0.3},{0.01 * s},,{s},{1.0 / (s + 1)},{0.5 / (s + 1)}")
    lines.append(f",,,,0.7,{steps},,")  # the results row logged after training
    path.write_text("\n".join(lines) + "\n")
    return path


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(path).ndim == 3


TABLE = [
    {"method": "base + heads (floor)", "a": 0.5, "b": 0.6, "avg": 0.55, "avg_normalized": 0.6, "a loss": 1.2},
    {"method": "expert (own task)", "a": 0.9, "b": 0.95, "avg": 0.925, "avg_normalized": 1.0, "a loss": 0.3},
    {"method": "task arithmetic (lam=0.3)", "a": 0.7, "b": 0.8, "avg": 0.75, "avg_normalized": 0.8, "a loss": 0.8},
    {"method": "adamerging", "a": 0.8, "b": 0.9, "avg": 0.85, "avg_normalized": 0.9, "a loss": 0.5},
]


def test_write_run_plots_writes_readable_pngs(tmp_path):
    write_lightning_csv(tmp_path)
    groups = bert_groups()
    record = {
        "granularity": "layer",
        "coefficients": {"a": dict.fromkeys(groups, 0.3), "b": dict.fromkeys(groups, 0.4)},
    }
    paths = write_run_plots(tmp_path, TABLE, record, "accuracy", True, title="adamerging")
    assert [p.name for p in paths] == ["coefficients.png", "training.png", "results.png"]
    assert all(is_png(p) for p in paths)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left no temporaries


def test_write_run_plots_of_a_static_run_draws_results_only(tmp_path):
    out, logs = tmp_path / "stage", tmp_path / "run"
    logs.mkdir()
    assert [p.name for p in write_run_plots(out, TABLE, None, "loss", False, metrics_dir=logs)] == ["results.png"]
    assert write_run_plots(tmp_path / "empty", [], None) == []


def test_results_chart_names_the_metric_and_its_direction():
    assert result_tasks(TABLE) == ["a", "b"]  # "a loss" is a's secondary metric, avg and avg_normalized are not tasks
    ax = results_figure(TABLE, "held-out loss", higher_is_better=False).axes[0]
    assert ax.get_ylabel() == "held-out loss (lower is better)"
    assert tick_texts(ax.get_xticklabels()) == ["a", "b", "avg"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [row["method"] for row in TABLE]
    assert results_figure(TABLE).axes[0].get_ylabel() == "accuracy (higher is better)"


def test_csv_metrics_are_read_per_step_without_result_rows(tmp_path):
    write_lightning_csv(tmp_path, steps=4)
    series, source = read_training_metrics(tmp_path)
    assert source == "csv logger: csv/version_0/metrics.csv"
    assert series["train/loss"] == ([0, 1, 2, 3], [1.0, 0.5, 1 / 3, 0.25])
    assert not [k for k in series if k.startswith("results/")]
    fig = training_figure(series)
    assert [ax.get_ylabel() for ax in fig.axes] == ["objective (train/loss)", "lambda"]


def test_tensorboard_metrics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "version_0"))
    for step in range(3):
        writer.add_scalar("train/loss", 2.0 - step, step)
        writer.add_scalar("coef/mean", 0.3 + 0.1 * step, step)
    writer.close()
    series, source = read_training_metrics(tmp_path)
    assert source.startswith("tensorboard logger")
    assert series["train/loss"] == ([0, 1, 2], [2.0, 1.0, 0.0])


def wandb_file(path: Path, records: list[bytes], block: int = 32768) -> None:
    """Write records in the offline W&B layout (header, 32 KiB blocks, records split across blocks)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in records:
        first = True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += b"\0" * left
                continue
            chunk, payload = payload[: left - 7], payload[left - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk), len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(out))


def test_offline_wandb_history_is_read_across_blocks(tmp_path):
    from wandb.proto import wandb_internal_pb2

    records = []
    for step in range(40):
        record = wandb_internal_pb2.Record()
        for key, value in [("train/loss", 1.0 / (step + 1)), ("trainer/global_step", step), ("_step", step)]:
            item = record.history.item.add()
            item.key, item.value_json = key, str(value)
        item = record.history.item.add()  # a long media key pushes records over block boundaries
        item.key, item.value_json = "coefficients/_type", '"images/separated"' + " " * 2000
        records.append(record.SerializeToString())
    wandb_file(tmp_path / "wandb" / "offline-run-1" / "run-1.wandb", records)
    series, source = read_training_metrics(tmp_path)
    assert source.startswith("wandb logger")
    assert list(series) == ["train/loss"]
    assert series["train/loss"][0] == list(range(40))


def test_log_images_sends_each_png_to_wandb_and_tensorboard(tmp_path):
    path = write_run_plots(tmp_path, TABLE, None)[0]

    class Wandb:
        calls = []

        def log_image(self, key, images, step=None):
            self.calls.append((key, images, step))

    class Board:
        calls = []

        def add_image(self, tag, image, global_step=None, dataformats="CHW"):
            self.calls.append((tag, image.shape[-1], dataformats))

    class TensorBoardLogger:
        experiment = Board()

    class CSVLogger:
        experiment = object()

    log_images([Wandb(), TensorBoardLogger(), CSVLogger()], [path], step=7)
    assert Wandb.calls == [("results", [str(path)], 7)]
    assert Board.calls == [("results", 3, "HWC")]


def test_describe_run_says_why_items_are_absent(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("method:\n  name: ties\n  learned: false\nlogger:\n  csv: {}\n")
    (tmp_path / "results.csv").write_text("method,a,avg\nties,0.5,0.5\n")
    about = describe_run(tmp_path)
    assert about["coefficients"].startswith("absent: ties is a static merge")
    assert about["training"].startswith("absent: ties is a static merge")
    assert read_results(tmp_path) == [{"method": "ties", "a": 0.5, "avg": 0.5}]

    learned = tmp_path / "learned"
    (learned / ".hydra").mkdir(parents=True)
    (learned / ".hydra" / "config.yaml").write_text(
        "method:\n  name: adamerging\n  learned: true\n  steps: 3\ntrainer:\n  log_every_n_steps: 10\nlogger:\n  csv: {}\n"
    )
    (learned / "csv" / "version_0").mkdir(parents=True)
    (learned / "csv" / "version_0" / "metrics.csv").write_text("results/x/avg,step\n0.5,3\n")
    assert describe_run(learned)["training"].startswith("absent: the csv logger files hold no training rows (3 steps")


def test_static_record_and_metric_line_are_read_from_the_files(tmp_path):
    (tmp_path / "coefficients.json").write_text('{"method": "dare", "options": {"drop": 0.9}}')
    (tmp_path / "results.md").write_text(
        "Task columns: loss (lower is better); avg_normalized: see ...\n\n| method |\n"
    )
    assert read_coefficients(tmp_path) is None
    assert method_kind(tmp_path) == ("dare", "static")
    assert primary_metric(tmp_path) == ("loss", False)
    assert describe_run(tmp_path)["coefficients"].startswith("absent: dare is a static merge")
    assert primary_metric(tmp_path / "old") == ("accuracy", True)  # runs written before the metric line
