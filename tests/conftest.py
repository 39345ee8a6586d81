"""Shared fixtures: orchestrators that are always stopped, and the no-leak check after every test."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from taskorch import Policy, TaskOrchestrator

from _tasks import Gate, wait_until

# A task must never wait on the default policy's 10-minute timeout in a test.
FAST = Policy(retries=0, timeout=None)


def _is_resource_tracker(proc: psutil.Process) -> bool:
    # loky and multiprocessing each keep one resource-tracker process per interpreter.
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return True


def leftover_processes() -> list[psutil.Process]:
    me = psutil.Process()
    out = []
    for proc in me.children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or _is_resource_tracker(proc):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(proc)
    return out


def taskorch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskorch-")]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    yield
    wait_until(lambda: not leftover_processes(), timeout=10,
               what="every worker process to be gone")
    wait_until(lambda: not taskorch_threads(), timeout=10,
               what="every taskorch thread to be gone")


@pytest.fixture
def make_orchestrator() -> Iterator[Callable[..., TaskOrchestrator]]:
    made: list[TaskOrchestrator] = []

    def make(*args: Any, **kwargs: Any) -> TaskOrchestrator:
        kwargs.setdefault("policy", FAST)
        o = TaskOrchestrator(*args, **kwargs)
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop(timeout=5)


@pytest.fixture
def gates(tmp_path: Path) -> Callable[[str], Gate]:
    return lambda name: Gate(tmp_path, name)


@pytest.fixture
def fifo(tmp_path: Path) -> Callable[[str], str]:
    def make(name: str) -> str:
        path = tmp_path / name
        os.mkfifo(path)
        return str(path)

    return make
