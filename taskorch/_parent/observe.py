"""Parent process, a reader's thread (a Prometheus scrape, the HTTP server): views of a running
orchestrator for metrics and the dashboard.

Nothing here runs on the dispatcher thread or makes it wait: each view copies what it needs
under the backlog lock (as ``stats()`` does), and formats, decodes and reads ``/proc`` after
releasing it. ``Observer(orchestrator)`` turns on the per-task figures (``figures.enable``);
from then on tasks are labelled and timed.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import TYPE_CHECKING, Any

from taskorch._parent.figures import Failure, enable

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._parent.scheduler import ScheduleStatus
    from taskorch._stats import Stats

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass(frozen=True)
class TaskNameFigures:
    """One task name's histograms (counts per bucket, not cumulative) and failures."""

    name: str
    run_counts: list[int]
    run_sum: float
    wait_counts: list[int]
    wait_sum: float
    failed: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything the metrics and the dashboard show, read at one moment."""

    at: float  # time.time()
    stats: Stats
    worker_count: int  # workers wanted (stats.workers: alive now)
    max_backlog: int
    restarts_by_cause: dict[str, int]
    tasks: list[TaskNameFigures]
    failures: list[Failure]  # newest first
    schedules: list[ScheduleStatus]
    intake: str  # "open", "stopping" or "broken: <why>"


class Observer:
    """Reads ``orchestrator`` for metrics and the dashboard (any thread)."""

    def __init__(self, orchestrator: TaskOrchestrator) -> None:
        self.orchestrator = orchestrator
        self._backlog = orchestrator.backlog
        self._figures = enable(self._backlog)

    def snapshot(self) -> Snapshot:
        backlog = self._backlog
        stats = backlog.stats()
        with backlog.locked():
            restarts = dict(backlog.counts.restarts_by_cause)
            tasks, raw_failures = self._figures.copy_locked()
            intake = ("open" if backlog.broken is None and not backlog.closed
                      else "stopping" if backlog.broken is None else f"broken: {backlog.broken}")
        counted = sum(restarts.values())
        if stats.worker_restarts > counted:  # a backend that does not give causes (Dask)
            restarts["other"] = restarts.get("other", 0) + stats.worker_restarts - counted
        return Snapshot(
            at=time.time(), stats=stats, worker_count=self.orchestrator.worker_count,
            max_backlog=self.orchestrator.max_backlog, restarts_by_cause=restarts,
            tasks=[TaskNameFigures(name, *figures) for name, figures in sorted(tasks.items())],
            failures=[_decode_failure(raw) for raw in reversed(raw_failures)],
            schedules=self.orchestrator.schedules(), intake=intake,
        )

    def workers(self) -> list[dict[str, Any]]:
        """The worker processes: pid, resident memory, tasks run, the task running now."""
        views = self.orchestrator.dispatcher.worker_views()
        return [dict(dataclasses.asdict(view), rss_bytes=_rss(view.pid)) for view in views]


def _decode_failure(raw: tuple[float, int, str, int, Any]) -> Failure:
    at, task_id, name, attempts, what = raw
    if isinstance(what, BaseException):
        tb = "".join(traceback.format_exception(type(what), what, what.__traceback__))
        return Failure(at, task_id, name, attempts, type(what).__qualname__, str(what), tb)
    _, type_name, message, tb = what  # _wire.encode_exception's tuple
    return Failure(at, task_id, name, attempts, str(type_name), str(message), str(tb))


def _rss(pid: int) -> int | None:
    """A process's resident memory in bytes (Linux ``/proc``), None where unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def stats_dict(stats: Stats) -> dict[str, Any]:
    return dataclasses.asdict(stats)
