"""A task module that makes a module-level orchestrator, as an application's module does
(tests/test_lazy_start.py): every worker that runs one of its tasks imports it."""

from __future__ import annotations

import os

import _tasks as t

import taskorch

# Made at import, in the test's process and in each worker that imports this module.
inner = taskorch.TaskOrchestrator(worker_count=2, policy=taskorch.Policy(retries=0, timeout=None))


def where(directory: str, parties: int) -> int:
    """The pid of the worker that ran this (the import above happened there), once
    ``parties`` calls run at once: a barrier of files in ``directory``, so that each of
    ``parties`` workers runs one."""
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass
    t.wait_until(lambda: len(os.listdir(directory)) >= parties, what="the other calls")
    return os.getpid()


def square_inside(x: int) -> tuple[int, int]:
    """A task that runs a task itself, on this module's orchestrator: in the worker it starts
    the inner pool there; returns (its result, how many worker processes that pool has)."""
    return inner.run(t.square, x).result(t.DEADLOCK_TIMEOUT), len(inner.worker_pids())
