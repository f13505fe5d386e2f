"""The README's own experiment YAML with local folders and local jsonl files runs as written, through the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

from tests.conftest import perturbed, tiny_bert_config

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = ["good", "bad", "great", "awful", "news", "sport", "market", "game", "film", "plot"]


def readme_local_yaml() -> str:
    text = README.read_text()
    start = text.index("The same with local folders and local jsonl files")
    return re.search(r"```yaml\n(.*?)```", text[start:], flags=re.S).group(1)


def write_models(root: Path) -> None:
    (root / "models").mkdir()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(vocab_size=len(WORDS) + 5, num_labels=2))
    base.save_pretrained(root / "models" / "base")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root / "models" / "base")
    for seed, task in enumerate(["sst2", "ag_news"]):
        expert = BertForSequenceClassification(base.config)
        expert.load_state_dict(perturbed(base, seed + 1))
        expert.save_pretrained(root / "models" / task)


def write_data(root: Path) -> None:
    for task in ["sst2", "ag_news"]:
        folder = root / "data" / task
        folder.mkdir(parents=True)
        for split, n in [("validation", 24), ("test", 16)]:
            rows = [{"text": f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}", "label": i % 2} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_readme_experiment(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``adamerge experiment=my_merge`` from ``root``, the README's local-files YAML as conf/experiment/my_merge.yaml."""
    experiment = root / "conf" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "my_merge.yaml").write_text(readme_local_yaml())
    command = [sys.executable, "-m", "adamerge.cli", "experiment=my_merge", f"hydra.searchpath=[file://{root}/conf]"]
    command += ["hydra.run.dir=out", "~logger", *overrides]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, timeout=600)


def test_readme_local_yaml_runs_as_written(tmp_path):
    write_models(tmp_path)
    write_data(tmp_path)
    done = run_readme_experiment(tmp_path, "method.steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    results = (tmp_path / "out" / "results.md").read_text()
    assert "| adamerging |" in results and "sst2" in results and "ag_news" in results
    assert (tmp_path / "out" / "merged" / "model" / "config.json").exists()


def test_a_nan_expert_stops_a_static_merge_naming_expert_and_tensor_and_nothing_is_exported(tmp_path):
    """Seen on the landed code: method=task_arithmetic exited 0 and exported a model holding NaN."""
    write_models(tmp_path)
    write_data(tmp_path)
    poisoned = BertForSequenceClassification.from_pretrained(tmp_path / "models" / "ag_news")
    with torch.no_grad():
        poisoned.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    poisoned.save_pretrained(tmp_path / "models" / "ag_news")
    done = run_readme_experiment(tmp_path, "method=task_arithmetic")
    assert done.returncode != 0
    assert "ag_news" in done.stderr and "attention.self.query.weight" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out" / "merged").exists() and not (tmp_path / "out" / "results.md").exists()
