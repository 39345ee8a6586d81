"""Parent process, dispatcher thread only: the circuit breaker's state machine.

    closed --(threshold consecutive failures, or failure ratio over the window)--> open
    open --(break_duration elapsed)--> half_open
    half_open --(a task succeeds)--> closed
    half_open --(a task fails)--> open

It counts finished tasks (a task that failed after all its retries is one failure), not
attempts: retrying is the policy's job, and the breaker answers "is the thing these tasks call
broken?". Tasks it rejects are not counted. Each transition is logged on "taskorch".

Half-open probes are tracked by task id from hand-over to outcome; a probe that comes back
unstarted (recalled by the dispatcher, or its worker died before starting it) frees its slot,
or the circuit could wait forever for an outcome that will never come.

Time comes from ``clock`` (``time.monotonic`` unless a test injects another), and every state
change goes to ``publish`` at once. The dispatcher calls ``admit``, ``record`` and
``reject_beyond_locked`` with the backlog lock held, so ``stats().breaker_state`` changes
under that lock, before the futures of the tasks that opened or closed the circuit resolve.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from taskorch._errors import CircuitOpenError
from taskorch._parent.resolve import Resolution
from taskorch._parent.task import TaskState, WorkItem
from taskorch._policy import BreakerMode, CircuitBreaker

if TYPE_CHECKING:
    from taskorch._parent.backlog import Backlog

log = logging.getLogger("taskorch")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission:
    """How many new tasks (not crash retries) may start in one dispatch round: ``left`` None
    for no limit; ``probes`` collects the task ids let through while it is limited."""

    __slots__ = ("left", "probes")

    def __init__(self, left: int | None) -> None:
        self.left = left
        self.probes: list[int] = []

    def allows(self, item: WorkItem) -> bool:
        return self.left is None or item.state is not TaskState.QUEUED or self.left > 0

    def count(self, item: WorkItem) -> None:
        if self.left is not None and item.state is TaskState.QUEUED:
            self.left -= 1
            self.probes.append(item.task_id)


class Breaker:
    def __init__(
        self, config: CircuitBreaker, *, publish: Callable[[str], None] = lambda state: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._publish = publish
        self._clock = clock
        self.state = State.CLOSED
        self._consecutive_failures = 0
        self._window: deque[tuple[float, bool]] = deque()  # (finished at, failed)
        self._window_failures = 0
        self.open_until = 0.0
        self._probes: set[int] = set()  # half-open: task ids handed over, no outcome yet

    def next_change(self) -> float | None:
        """When an open circuit turns half-open (for the dispatcher's timer)."""
        return self.open_until if self.state is State.OPEN else None

    @property
    def fails_fast(self) -> bool:
        """FAIL mode: tasks it holds back fail at once (HOLD: they wait)."""
        return self.config.mode is BreakerMode.FAIL

    def admit(self) -> Admission:
        """How many new tasks may start now."""
        if self.state is State.OPEN and self._clock() >= self.open_until:
            self._move(State.HALF_OPEN, "break duration elapsed; letting probe tasks through")
        if self.state is State.CLOSED:
            return Admission(None)
        if self.state is State.OPEN:
            return Admission(0)
        return Admission(max(0, self.config.half_open_probes - len(self._probes)))

    def admitted(self, task_ids: list[int]) -> None:
        if self.state is State.HALF_OPEN:
            self._probes.update(task_ids)

    def release(self, task_id: int) -> None:
        """A task handed over came back unstarted: if it was a probe, its slot is free."""
        self._probes.discard(task_id)

    def record(self, task_id: int, failed: bool) -> None:
        """A task finished (``failed``: after all its retries)."""
        now = self._clock()
        self._probes.discard(task_id)
        config = self.config
        if self.state is State.HALF_OPEN:
            if failed:
                self._open(now, "a probe task failed")
            else:
                self._move(State.CLOSED, "a probe task succeeded")
                self._consecutive_failures = 0
                self._window.clear()
                self._window_failures = 0
            return
        if self.state is State.OPEN:
            return  # tasks started before it opened: the circuit is already open
        self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
        if self._consecutive_failures >= config.failure_threshold:
            self._open(now, f"{self._consecutive_failures} consecutive tasks failed")
            return
        if config.failure_ratio is None:
            return
        self._window.append((now, failed))
        self._window_failures += failed
        while self._window and self._window[0][0] < now - config.sampling_window:
            self._window_failures -= self._window.popleft()[1]
        total = len(self._window)
        ratio = self._window_failures / total if total else 0.0
        if total >= config.minimum_throughput and ratio >= config.failure_ratio:
            self._open(now, f"{self._window_failures} of the last {total} tasks failed")

    def _open(self, now: float, why: str) -> None:
        self.open_until = now + self.config.break_duration
        self._probes.clear()
        self._consecutive_failures = 0
        self._window.clear()
        self._window_failures = 0
        self._move(State.OPEN, f"{why}; open for {self.config.break_duration:g} s")

    def _move(self, state: State, why: str) -> None:
        log.warning("circuit breaker %s -> %s: %s", self.state.value, state.value, why)
        self.state = state
        self._publish(state.value)

    def reject_beyond_locked(self, backlog: Backlog, admit: int) -> list[Resolution]:
        """FAIL mode, circuit not closed: the new tasks in the backlog beyond the ``admit``
        probes fail without running (the caller resolves them, after releasing the backlog
        lock it holds). Crash retries of tasks that already started stay."""
        rejected: list[Resolution] = []
        retry_in = max(0.0, self.open_until - self._clock())
        for item in backlog.take_new_beyond_locked(admit):
            backlog.finish_locked(item, TaskState.FAILED)
            rejected.append((item, "exception", CircuitOpenError(
                f"the circuit breaker is {self.state.value} after repeated task "
                f"failures: task {item.task_id} was not run; it lets tasks through "
                f"again in {retry_in:.3g} s (see the 'taskorch' log for why it opened)"
            )))
        return rejected
