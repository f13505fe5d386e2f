"""Long work shows progress on a terminal (pool loading, evaluation, static merges) and stays silent in logs."""

import logging

from adamerge.progress import progress

log = logging.getLogger("adamerge.test_progress")


def test_progress_bar_on_a_terminal_only(capsys, monkeypatch):
    log.setLevel(logging.INFO)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert list(progress(range(3), "experts", log)) == [0, 1, 2]
    assert "experts" in capsys.readouterr().err
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert list(progress(range(3), "experts", log)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_the_static_merge_and_the_evaluation_report_progress(capsys, monkeypatch):
    from adamerge.methods.static import static_merge
    from adamerge.testbeds.tiny import tiny_pool

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    logging.getLogger("adamerge.methods.static").setLevel(logging.INFO)
    static_merge(tiny_pool(num_tasks=2), "ties", density=0.2, weights=1.0)
    assert "ties" in capsys.readouterr().err
