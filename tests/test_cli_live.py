"""``taskorch run`` on a terminal (issue 25): under the overall bar, a line for each task
running longer than a second, with its latest ``taskorch.progress()``; on anything else (a
file, a pipe: CI) the bar alone. The terminal is a real pseudo-terminal, the task's progress a
real report, and the task waits on a FIFO until the test has seen its line."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import _tasks as t
from _tasks import scaled, wait_until

from taskorch._stats import Progress
from taskorch.cli.live import Display, amount, describe

R = scaled(60)
TASKS = str(Path(t.__file__).resolve())


def _pty(rows: int = 24, columns: int = 120) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def test_a_long_task_shows_its_progress_under_the_bar_on_a_terminal(tmp_path: Path) -> None:
    gate = t.Gate(tmp_path, "long")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps([str(gate.started), str(gate.release_fifo)]) + "\n")
    master, slave = _pty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskorch", "run", f"{TASKS}:report_then_block", "--input",
         str(source), "--workers", "1"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env={**os.environ})
    os.close(slave)
    screen: list[bytes] = []

    def read() -> None:  # until the terminal's last user is gone (EIO)
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            screen.append(chunk)

    reader = threading.Thread(target=read, name="test-pty-reader", daemon=True)
    reader.start()
    try:
        gate.wait_started()
        wait_until(lambda: re.search(rb"input 0: \d+ s, 3/10 \(30%\) three", b"".join(screen)),
                   what="the running task's line on the terminal")
        gate.release("done")
        assert proc.wait(R) == 0, b"".join(screen).decode(errors="replace")
        reader.join(R)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    text = b"".join(screen).decode(errors="replace")
    assert '"result": "done"' in text  # the record, on the same terminal
    assert "1 input: 1 ok, 0 failed" in text
    assert "\x1b[J" in text  # the lines were drawn (and cleared) below the bar


def _args(progress: bool | None) -> argparse.Namespace:
    return argparse.Namespace(progress=progress)


def test_lines_only_on_a_terminal(tmp_path: Path) -> None:
    """Forced with --progress on a stream that is not a terminal, the bar shows alone; the
    lines need a terminal."""
    saved = sys.stderr
    try:
        sys.stderr = io.StringIO()  # not a terminal
        display = Display(_args(True), io.StringIO())
        assert display.bar is not None and not display.lines_shown
        display.close()
        master, slave = _pty()
        with open(slave, "w", closefd=True) as terminal:
            sys.stderr = terminal
            shown = Display(_args(None), io.StringIO())  # default: a terminal shows the bar
            assert shown.bar is not None and shown.lines_shown
            shown.close()
            sys.stderr = terminal
            assert Display(_args(False), io.StringIO()).bar is None  # --no-progress
        os.close(master)
    finally:
        sys.stderr = saved


def test_a_line_says_what_was_reported() -> None:
    assert describe("input 7", 12.4, Progress(40, 100, "resizing", 0.0)) == (
        "  input 7: 12 s, 40/100 (40%) resizing")
    assert describe("inputs 0-9", 3.0, Progress(5, None, None, 0.0)) == "  inputs 0-9: 3 s, 5"
    assert describe("input 1", 2.0, None) == "  input 1: 2 s, running (no progress reported)"


def test_large_and_fractional_counts_read_as_numbers() -> None:
    assert describe("rows", 5.0, Progress(1234567, 20_000_000, None, 0.0)) == (
        "  rows: 5 s, 1,234,567/20,000,000 (6%)")  # (not 1.23457e+06/2e+07)
    assert describe("bytes", 1.0, Progress(1234.5, None, "read", 0.0)) == (
        "  bytes: 1 s, 1,234.5 read")
    assert [amount(v) for v in (0.0, 0.25, 2.0 / 3, 1e-4, 1e16)] == [
        "0", "0.25", "0.67", "0.0001", "10,000,000,000,000,000"]
