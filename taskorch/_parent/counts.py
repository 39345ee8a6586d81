"""Parent process: the backlog's counters, what ``stats()`` shows.

``Counts`` belongs to the ``Backlog`` (only ``backlog`` uses it) and is guarded by its lock:
every field is read and changed with that lock held, so ``stats()`` is one consistent moment.
"""

from __future__ import annotations

from taskorch._parent.task import TaskState
from taskorch._stats import Stats


class Counts:
    """Counters (see ``Stats``), plus the breaker's state and worker restarts by cause."""

    __slots__ = ("submitted", "queued", "running", "succeeded", "failed", "cancelled",
                 "abandoned", "expired", "retried", "dropped", "rejected", "workers",
                 "worker_restarts", "crashes", "timeouts", "breaker_state", "restarts_by_cause")

    def __init__(self) -> None:
        self.submitted = self.queued = self.running = 0
        self.succeeded = self.failed = self.cancelled = self.abandoned = self.expired = 0
        self.retried = self.dropped = self.rejected = 0
        self.workers = self.worker_restarts = self.crashes = self.timeouts = 0
        self.breaker_state = "closed"
        # Workers started to replace another, by cause (sums to worker_restarts; for metrics).
        self.restarts_by_cause: dict[str, int] = {}

    def ended(self, state: TaskState) -> None:
        """A task reached the terminal ``state`` (its queued/running count is the caller's)."""
        if state is TaskState.SUCCEEDED:
            self.succeeded += 1
        elif state is TaskState.FAILED:
            self.failed += 1
        elif state is TaskState.CANCELLED:
            self.cancelled += 1
        elif state is TaskState.ABANDONED:
            self.abandoned += 1
        elif state is TaskState.EXPIRED:
            self.expired += 1
        else:
            raise AssertionError(f"not a terminal state: {state}")

    def retry(self, timed_out: bool) -> None:
        self.retried += 1
        if timed_out:
            self.timeouts += 1

    def crash(self, timed_out: bool) -> None:
        self.crashes += 1
        if timed_out:
            self.timeouts += 1

    def set_breaker_state(self, state: str) -> None:  # (only changes under the lock)
        self.breaker_state = state

    def restarts(self, count: int, cause: str | None) -> None:
        self.worker_restarts += count
        if cause is not None:
            self.restarts_by_cause[cause] = self.restarts_by_cause.get(cause, 0) + count

    def stats(self, delayed: int = 0) -> Stats:
        return Stats(
            submitted=self.submitted, queued=self.queued, running=self.running,
            succeeded=self.succeeded, failed=self.failed, cancelled=self.cancelled,
            abandoned=self.abandoned, retried=self.retried, dropped=self.dropped,
            rejected=self.rejected, workers=self.workers,
            worker_restarts=self.worker_restarts, crashes=self.crashes,
            timeouts=self.timeouts, breaker_state=self.breaker_state,
            expired=self.expired, delayed=delayed,
        )
