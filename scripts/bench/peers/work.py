"""The peers section's task bodies, the same for every system: stdlib only.

Runs in the workers of every system (taskorch serve's, Celery's, RQ's, Huey's, Dramatiq's),
which import it by name (``bench.peers.work``; ``scripts/`` is on their ``PYTHONPATH``), and in
the driver, which counts the marks. Each peer's app module wraps these functions in its own
task decorator; taskorch runs them as they are.

How the benchmark learns that a task ran, the same way for every system: the task appends a
fixed-width line with its number to a mark file (O_APPEND, one write of 9 bytes, atomic on
Linux), and the driver counts lines by the file's size. That costs each task an open, a write
and a close (~10 us), the same for all; it needs no result backend, and in W4 the lines tell
which task ran twice.
"""

from __future__ import annotations

import os
import time

LINE = 9  # "%08d\n"


def noop() -> int:
    """W2: the smallest task; its result travels back through the system's own API. It is 0,
    not None: Huey stores no None result by default, so a waiting caller would never see it."""
    return 0


def mark(i: int, path: str) -> None:
    """W1: a no-op that leaves its mark."""
    _write_mark(i, path)


def cpu(loops: int, i: int, path: str) -> None:
    """W3: ~50 ms of pure Python (loops calibrated by the orchestrator), then the mark."""
    total = 0
    for k in range(loops):
        total += k * k % 7
    _write_mark(i, path)


def short(seconds: float, i: int, path: str) -> None:
    """W4: a short sleep, then the mark: a task killed before its mark did not end."""
    time.sleep(seconds)
    _write_mark(i, path)


def _write_mark(i: int, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%08d\n" % i)
    finally:
        os.close(fd)


def count_marks(path: str) -> int:
    try:
        return os.stat(path).st_size // LINE
    except FileNotFoundError:
        return 0


def read_marks(path: str) -> list[int]:
    try:
        with open(path, "rb") as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def calibrate_loops(target_s: float) -> int:
    """Loops of ``cpu`` for one ~target_s task here (median of 3 estimates)."""
    def timed(loops: int) -> float:
        t0 = time.perf_counter()
        total = 0
        for k in range(loops):
            total += k * k % 7
        return time.perf_counter() - t0

    loops = max(1000, int(200_000 * target_s / timed(200_000)))
    estimates = sorted(loops * target_s / timed(loops) for _ in range(3))
    return int(estimates[1])
