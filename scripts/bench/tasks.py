"""Task functions for the benchmark (``scripts/bench.py``).

Runs in the pool workers (and in the bench parent, for the serial CPU baseline). The pools
pickle these functions by reference (``bench.tasks.noop``), so they live at module level in a
module the workers can import: the launcher puts ``scripts/`` on ``sys.path``, and the parent
puts it on ``PYTHONPATH`` for its children. Import-light on purpose: spawn-style workers (loky,
taskorch) import it (and the package's ``__init__``, which imports nothing), and whatever it
imports would be charged to their cold start and memory.
"""

from __future__ import annotations

import os
import time


def noop() -> None:
    """Section A, D, E: the smallest task there is; measures the pool, not the work."""
    return None


def echo(value: object) -> object:
    """Liveness probe: "does this pool still run a task and return its result?"."""
    return value


def pid_after(seconds: float) -> int:
    """Warm-up: hold a worker briefly, so that the others get tasks too; say which ran it."""
    time.sleep(seconds)
    return os.getpid()


def cpu(loops: int) -> int:
    """Section B: pure-Python CPU work, holding the GIL the whole time.

    The bench parent calibrates *loops* once (about 50 ms) and passes the number, so
    every pool runs the same amount of work.
    """
    acc = 0
    for i in range(loops):
        acc += i * i % 7
    return acc


def sleep_s(seconds: float) -> None:
    """Sections C and H: keeps a worker busy without using a CPU."""
    time.sleep(seconds)


def crash_or_sleep(index: int, crash_index: int, seconds: float) -> int:
    """Section F: task *crash_index* kills its worker process; the others are innocent."""
    if index == crash_index:
        os._exit(1)  # no cleanup, no exception: what a segfault or an OOM kill looks like
    time.sleep(seconds)
    return index


def hang(start_file: str, seconds: float) -> None:
    """Section G: a task that hangs (a sleep the pool must interrupt or kill).

    Writes ``time.monotonic_ns()`` to *start_file* first: CLOCK_MONOTONIC is system-wide on
    Linux, so the parent can tell when the task really started, not only when it was submitted.
    """
    with open(start_file, "w", encoding="ascii") as f:
        f.write(str(time.monotonic_ns()))
    time.sleep(seconds)
