"""Progress: a log line per step everywhere, and a bar only when stderr is a terminal."""

from __future__ import annotations

import io
import logging

from rtb import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_and_log_lines_always(monkeypatch, caplog) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO):
        tracker = progress.Progress(log, "train", 4)
        tracker.advance("candidate a")
        tracker.advance("candidate b")
    bars = terminal.getvalue().splitlines()
    assert bars[0].startswith("train [######..................] 1/4")
    assert bars[1].startswith("train [############............] 2/4")
    assert "train: step 2/4 done: candidate b" in caplog.text


def test_no_bar_when_not_a_terminal(monkeypatch, caplog) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", pipe)
    with caplog.at_level(logging.INFO):
        progress.Progress(logging.getLogger("test.progress"), "predict", 2).advance("chunk 1")
    assert pipe.getvalue() == ""
    assert "predict: step 1/2 done: chunk 1" in caplog.text
