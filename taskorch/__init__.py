"""taskorch: a resilient background task processor.

A synchronous application calls ``run(fn, ...)`` and goes on; ``fn`` runs in a worker process,
under a retry / backoff / timeout policy, out of the caller's way and past the GIL::

    from taskorch import TaskOrchestrator

    with TaskOrchestrator(worker_count=2, max_backlog=128) as orchestrator:
        future = orchestrator.run(compact, "/var/data/db.sqlite")
        ...

This module is the whole public API. The parent-side names are imported lazily, so that worker
processes, which import ``taskorch._worker`` (and so this package), stay light.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from taskorch._errors import (
    CircuitOpenError,
    DependencyFailedError,
    JournalError,
    OrchestratorBrokenError,
    OrchestratorClosedError,
    QueueFullError,
    RemoteTaskError,
    RemoteTraceback,
    SerializationError,
    ServerTimeoutError,
    ServerUnavailableError,
    TaskAbandonedError,
    TaskExpiredError,
    TaskNotFoundError,
    TaskorchError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from taskorch._options import Limit
from taskorch._policy import BreakerMode, CircuitBreaker, Features, Policy

if TYPE_CHECKING:
    from taskorch._parent.executor import Executor
    from taskorch._parent.intake import PolicyOverride
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._parent.task import TaskFuture
    from taskorch._service.client.api import Client, connect
    from taskorch._stats import Progress, Stats, StopReport, TaskInfo
    from taskorch._worker.progress import progress

__all__ = [
    "BreakerMode",
    "CircuitBreaker",
    "CircuitOpenError",
    "Client",
    "DependencyFailedError",
    "Executor",
    "Features",
    "JournalError",
    "Limit",
    "OrchestratorBrokenError",
    "OrchestratorClosedError",
    "Policy",
    "PolicyOverride",
    "Progress",
    "QueueFullError",
    "RemoteTaskError",
    "RemoteTraceback",
    "SerializationError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "Stats",
    "StopReport",
    "TaskAbandonedError",
    "TaskExpiredError",
    "TaskFuture",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskOrchestrator",
    "TaskTimeoutError",
    "TaskorchError",
    "WorkerCrashedError",
    "connect",
    "progress",
]

__version__ = "0.1.0"

logging.getLogger("taskorch").addHandler(logging.NullHandler())

_LAZY = {
    "Executor": "taskorch._parent.executor",
    "PolicyOverride": "taskorch._parent.intake",
    "TaskOrchestrator": "taskorch._parent.orchestrator",
    "TaskFuture": "taskorch._parent.task",
    "Stats": "taskorch._stats",
    "StopReport": "taskorch._stats",
    "Progress": "taskorch._stats",
    "progress": "taskorch._worker.progress",
    "TaskInfo": "taskorch._stats",
    "Client": "taskorch._service.client.api",
    "connect": "taskorch._service.client.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskorch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
