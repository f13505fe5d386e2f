"""The shipped text tasks: loadable, three balanced splits, labels in range, no text in both train and test."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from adamerge.testbeds.text_tasks import SPLITS, TEXT_TASKS_DIR, available_tasks, load_task

SHIPPED = available_tasks()
# The builder balances every split exactly; allow a difference of one example between the largest and smallest class.
BALANCE_TOLERANCE = 1


def test_at_least_six_tasks_are_shipped():
    assert len(SHIPPED) >= 6, SHIPPED


@pytest.fixture(scope="module", params=SHIPPED)
def task(request):
    return request.param, load_task(request.param)


def test_splits_and_columns(task):
    name, ds = task
    assert tuple(ds) == SPLITS
    classes = json.loads((TEXT_TASKS_DIR / "tasks.json").read_text())[name]["classes"]
    for split in SPLITS:
        assert ds[split].column_names == ["text", "label"]
        assert ds[split].features["label"].names == classes
        assert len(ds[split]) > 0


def test_classes_balanced_in_every_split(task):
    _, ds = task
    for split in SPLITS:
        counts = Counter(ds[split]["label"])
        num_classes = ds[split].features["label"].num_classes
        assert len(counts) == num_classes, (split, counts)
        assert max(counts.values()) - min(counts.values()) <= BALANCE_TOLERANCE, (split, counts)


def test_labels_in_range_and_texts_nonempty(task):
    _, ds = task
    for split in SPLITS:
        num_classes = ds[split].features["label"].num_classes
        assert all(0 <= y < num_classes for y in ds[split]["label"])
        assert all(t.strip() and len(t) <= 600 for t in ds[split]["text"])


def test_no_text_shared_between_splits(task):
    _, ds = task
    train = set(ds["train"]["text"])
    assert not train & set(ds["test"]["text"])
    assert not train & set(ds["calib"]["text"])
    assert not set(ds["calib"]["text"]) & set(ds["test"]["text"])


def test_sizes_within_budget(task):
    _, ds = task
    assert len(ds["train"]) <= 1200 and len(ds["calib"]) <= 200 and len(ds["test"]) <= 400


def test_unknown_task_names_the_available_ones():
    with pytest.raises(ValueError, match=SHIPPED[0]):
        load_task("no_such_task")


def test_assets_stay_small():
    size = sum(p.stat().st_size for p in TEXT_TASKS_DIR.iterdir())
    assert size < 4 * 2**20, size


# The builder's pure helpers (scripts/ is not a package: load the file by path).
@functools.cache
def _builder():
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_text_tasks.py"
    spec = importlib.util.spec_from_file_location("build_text_tasks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_vader_binarisation_drops_the_neutral_band():
    b = _builder()
    examples = b.parse_vader_ground_truth("1\t2.0\tgreat\n2\t-0.6\tmeh\n3\t0.5\tfine\n4\t-3\tawful &amp; sad\n")
    assert [(e.text, e.label) for e in examples] == [
        ("great", "positive"),
        ("meh", "negative"),
        ("awful & sad", "negative"),
    ]


def test_email_body_drops_headers_and_decodes():
    b = _builder()
    raw = "From: a@b.c\nSubject: WIN MONEY\nContent-Transfer-Encoding: quoted-printable\n\nHello=20there,\nfriend\n"
    assert b.email_body(raw) == "Hello there, friend"


def test_man_paragraphs_skip_code_and_join_font_macros():
    b = _builder()
    roff = ".SH NAME\nfoo \\- bar\n.SH DESCRIPTION\n.BR open (2)\nopens \\fIpath\\fP.\n.PP\n.EX\nint x;\n.EE\nNext.\n"
    assert b.man_paragraphs(roff) == [
        ("NAME", "foo - bar"),
        ("DESCRIPTION", "open(2) opens path."),
        ("DESCRIPTION", "Next."),
    ]


def test_groups_never_straddle_splits_and_splits_are_balanced():
    b = _builder()
    examples = [b.Example(f"text {g} {i}", "ab"[g % 2], f"g{g}") for g in range(60) for i in range(5)]
    splits = b.assign_groups(examples, random.Random(0))
    owners = {ex.group: s for s, exs in splits.items() for ex in exs}
    assert all(owners[ex.group] == s for s, exs in splits.items() for ex in exs)
    balanced = b.balance(splits["test"], ("a", "b"), 400, random.Random(0))
    assert Counter(ex.label for ex in balanced)["a"] == Counter(ex.label for ex in balanced)["b"] > 0


def test_truncate_cuts_at_a_word_boundary():
    b = _builder()
    assert b.truncate("aaa bbb ccc", 9) == "aaa bbb"
    assert b.truncate("x" * 20, 10) == "x" * 10
