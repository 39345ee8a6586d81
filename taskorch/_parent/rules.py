"""Parent process, the dispatcher thread: the task life's rules, written once for every pool.

The dispatcher core (``dispatch.DispatcherCore``) applies each batch of events its pool hands
back (``pool``) in one pass under the backlog lock, each through its rule here
(``by_event``), and calls ``settle_locked`` at stop()'s deadline or when the orchestrator
breaks. The rules:

- A call handed over but never started goes back to the front of the backlog (of its
  priority), in order, with no attempt charged (``_returned_locked``): it never ran. A
  half-open circuit's probe slot it held frees. If a caller waits to cancel it
  (``future.cancel()`` of a queued task the dispatcher had handed over: ``_recall_for_cancel``
  asked the pool to take it back), it ends cancelled instead; if it starts first, the cancel
  is refused (``Backlog.start_locked``).
- An attempt that started and was lost (its worker died, was killed at a hard timeout, or was
  lost with its Dask worker) is charged (``_lost_locked``): retried after the policy's backoff
  (waiting in the backlog: ``Backlog.crashed_locked``) while the task's one attempt budget lasts
  (crashes always, a hard timeout if the policy retries ``TaskTimeoutError``), else the task
  fails with that error. A call that started may have had side effects: after a crash a task
  runs at least once, not exactly once.
- An attempt stopped through no fault of its own (``lost_uncharged_locked``: its Dask worker
  was restarted to kill another task's attempt) goes back to the front, not charged.
- A task not started by its expiry ends ``expired`` (``expired``), never run: from the
  backlog (``Backlog.release_due``), or here when its attempt is lost after that time.
- The circuit breaker counts finished tasks; its state is published in ``stats()`` under the
  backlog lock, at the moment it changes, before the futures that changed it resolve.
- Each moment (started, retrying, finished, crashed) is announced to the listeners
  (``task.TaskListener``: ``Backlog.listeners``, such as the metrics' figures, and the
  task's own ``WorkItem.listener``, such as ``taskorch serve``'s journal) under the lock the
  rule already holds; they do no I/O and never wait.
- At stop(): once nothing is left the workers are shut down (drained). If stop()'s deadline
  passes first, queued tasks are cancelled and running ones abandoned (``settle_locked``). A broken
  orchestrator (no worker can run anything) fails what it holds with
  ``OrchestratorBrokenError``.

Everything here runs with the backlog lock held, on the dispatcher thread. What must wait
for the lock's release is collected: the futures to resolve (``resolutions``), retries and
lost attempts to log; ``flush`` does it after (resolving wakes waiters and hands
done-callbacks over: never under the lock).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from taskorch._errors import (
    TaskAbandonedError,
    TaskExpiredError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Breaker
from taskorch._parent.pool import (
    AttemptLost,
    AttemptLostUncharged,
    AttemptRetrying,
    AttemptStarted,
    CallsReturned,
    CannotRun,
    TaskFinished,
    WorkersChanged,
    WorkersRestarted,
)
from taskorch._parent.resolve import Resolution, resolve_all
from taskorch._parent.task import TaskState, WorkItem
from taskorch._parent.terminate import Terminated
from taskorch._wire import Failed, Succeeded

log = logging.getLogger("taskorch")

#: The type name a Failed event carries for a per-attempt timeout.
TIMEOUT_TYPE = f"{TaskTimeoutError.__module__}.{TaskTimeoutError.__qualname__}"


class TaskRules:
    """The rules over one orchestrator's backlog (and its breaker), and what they collect for
    after the lock (dispatcher thread only)."""

    def __init__(self, backlog: Backlog, breaker: Breaker | None) -> None:
        self._backlog = backlog
        self._breaker = breaker
        self.resolutions: list[Resolution] = []  # collected under the lock, resolved after
        self.retries: list[tuple[WorkItem, int, str, float]] = []  # logged after the lock
        self.losses: list[tuple[str, str]] = []  # (note, outcome) of lost attempts, logged after
        # The rule for each kind of pool event, by its type (``PoolBroken`` is the core's).
        self.by_event: dict[type, Callable[[Any, float], None]] = {
            AttemptStarted: self.started_locked, TaskFinished: self.finished_locked,
            AttemptRetrying: self.retrying_locked, CallsReturned: self.returned_locked,
            AttemptLost: self.lost_locked, AttemptLostUncharged: self.lost_uncharged_locked,
            CannotRun: self.fail_locked,
            WorkersChanged: self.workers_changed_locked, WorkersRestarted: self.restarted_locked,
        }

    def workers_changed_locked(self, event: WorkersChanged, now: float) -> None:
        self._backlog.counts.workers = event.workers

    def restarted_locked(self, event: WorkersRestarted, now: float) -> None:
        self._backlog.counts.restarts(event.started, event.cause)

    def started_locked(self, event: AttemptStarted, now: float) -> None:
        """An attempt began; the first one frees its backlog slot."""
        item, attempt = event
        item.attempts = item.future.attempts = attempt
        item.attempt_started = now
        backlog = self._backlog
        if backlog.listeners or item.listener is not None:
            self._announce_started(item, now)
        backlog.start_locked(item)

    def _announce_started(self, item: WorkItem, now: float) -> None:
        """To the orchestrator's listeners, then the task's own."""
        for listener in self._backlog.listeners:  # (metrics on: the queue wait, at the first)
            listener.started(item, now)
        if item.listener is not None:  # (taskorch serve's journal: queues a record)
            item.listener.started(item, now)

    def retrying_locked(self, event: AttemptRetrying, now: float) -> None:
        """An attempt failed inside the worker, which retries after ``event.delay``."""
        item = event.item
        item.attempt_started = 0.0  # backing off: no attempt runs
        self._backlog.counts.retry(event.timed_out)
        self.retries.append((item, event.attempt, event.summary, event.delay))
        for listener in self._backlog.listeners:
            listener.retrying(item, event.attempt, event.summary, event.delay)

    def finished_locked(self, event: TaskFinished, now: float) -> None:
        """A Succeeded or Failed event (``_wire``): the task is over."""
        item, outcome = event
        attempts, seconds = outcome.attempts, outcome.seconds
        backlog = self._backlog
        listeners = backlog.listeners
        item.attempts = item.future.attempts = attempts  # (before a late start's announce)
        if item.state is TaskState.QUEUED:  # its start came with it (``local._read_events``)
            if listeners or item.listener is not None:  # or, on Dask, may never come
                self._announce_started(item, now)
            backlog.start_locked(item, ending=True)
        item.future.seconds = seconds
        failed = type(outcome) is not Succeeded  # (exactly a ``_wire`` type)
        if type(outcome) is Succeeded:
            backlog.finish_locked(item, TaskState.SUCCEEDED)
            self.resolutions.append((item, "result", outcome.result))
        elif isinstance(outcome, Failed):
            if outcome.type_name == TIMEOUT_TYPE:
                backlog.counts.timeouts += 1
            backlog.finish_locked(item, TaskState.FAILED)
            self.resolutions.append((item, "error", outcome.error))
        else:
            raise AssertionError(f"not an outcome: {outcome!r} for {item!r}")
        if listeners:
            error = outcome.error if isinstance(outcome, Failed) else None
            for listener in listeners:
                listener.finished(item, seconds, error)
        if self._breaker is not None:
            self._breaker.record(item.task_id, failed)

    def returned_locked(self, event: CallsReturned, now: float) -> None:
        """Calls handed over that never started go back to the front of the backlog (of
        their priority), in order, uncharged (they never ran); a half-open circuit's probe
        slot frees."""
        back = []
        for item in event.items:
            item.worker = item.started_on = None
            if self._breaker is not None:
                self._breaker.release(item.task_id)
            if item.cancel_request is not None:
                # A caller waits to cancel it: it never ran, so it is cancelled, and that
                # caller cancels its future (finish_locked answers the request).
                self._backlog.finish_locked(item, TaskState.CANCELLED)
            else:
                back.append(item)
        self._backlog.put_back_locked(back)

    def lost_locked(self, event: AttemptLost, now: float) -> None:
        """The attempt that started was lost with its worker: charge it; retry after the
        policy's backoff while the budget lasts, else fail. What became of it ends the
        pool's warning (logged after the lock)."""
        item, error, note = event
        backlog = self._backlog
        item.worker = item.started_on = None
        item.attempt_started = 0.0
        if isinstance(error, Terminated):  # killed for a cancel: never retried
            if not backlog.finish_locked(item, TaskState.CANCELLED):
                self.resolutions.append((item, "cancel", None))
            self.losses.append((note, "task cancelled"))
            return
        timed_out = isinstance(error, TaskTimeoutError)
        retryable = isinstance(error, WorkerCrashedError) or item.policy.retries_error(error)
        if item.expires_at is not None and now >= item.expires_at:
            backlog.crashed_locked(item, timed_out)
            backlog.finish_locked(item, TaskState.EXPIRED)
            self.expired(item)
            self.losses.append((note, "task expired: not retried"))
            return
        if retryable and item.attempts < item.policy.max_attempts:
            delay = item.policy.backoff_before(item.attempts + 1)
            backlog.crashed_locked(item, timed_out, retry_in=delay)  # it waits in the backlog
            for listener in backlog.listeners:
                listener.crashed(item, error, False)
            self.losses.append((note, f"retrying in {delay:.3g} s"))
            return
        backlog.crashed_locked(item, timed_out)
        self.fail_locked(CannotRun(item, error), now)
        self.losses.append((note, "task failed"))

    def lost_uncharged_locked(self, event: AttemptLostUncharged, now: float) -> None:
        """The attempt that started was stopped through no fault of its own (its Dask worker
        was restarted to kill another task's attempt): the task goes back to the front of the
        backlog at once, that attempt not charged (the next one has its number again). It may
        have had side effects, as after a crash. (Between two attempts, no attempt ran:
        nothing to give back.)"""
        item, note = event
        if item.attempt_started:
            item.attempts = item.future.attempts = item.attempts - 1
        item.worker = item.started_on = None
        item.attempt_started = 0.0
        self._backlog.put_back_locked([item])
        self.losses.append((note, "run again, not charged"))

    def expired(self, item: WorkItem) -> None:
        """``item`` ended ``expired`` (the backlog's expiry, or here): its future fails."""
        self.resolutions.append((item, "exception", TaskExpiredError(
            f"task {item.task_id} was not started by its expiry (options(expires=...)); it "
            f"never ran{' after its crashed attempt' if item.attempts else ''}")))

    def fail_locked(self, event: CannotRun, now: float) -> None:
        """The task fails with ``error`` without a retry (its last attempt was lost, or the
        pool could not run it)."""
        item, error = event
        self._backlog.finish_locked(item, TaskState.FAILED)
        self.resolutions.append((item, "exception", error))
        for listener in self._backlog.listeners:
            listener.crashed(item, error, True)
        if self._breaker is not None:
            self._breaker.record(item.task_id, True)

    def settle_locked(self, items: list[WorkItem], held: list[tuple[WorkItem, str]],
                      error: BaseException | None) -> None:
        """Settle ``items``, every unresolved task: queued ones are cancelled, running ones
        abandoned (``error`` None: stop()'s deadline; ``held`` says what stop() did to those
        the pool held) or failed with ``error`` (broken)."""
        backlog = self._backlog
        notes = {item.task_id: note for item, note in held}
        for item in items:
            if error is not None:
                backlog.finish_locked(item, TaskState.FAILED)
                self.resolutions.append((item, "exception", error))
            elif item.state is TaskState.RUNNING:
                backlog.finish_locked(item, TaskState.ABANDONED)
                note = notes.get(item.task_id) or "it was waiting to be retried after a crash"
                self.resolutions.append((item, "exception", TaskAbandonedError(
                    f"stop()'s timeout expired while task {item.task_id} was running "
                    f"(attempt {item.attempts}); {note}"
                )))
            elif not backlog.finish_locked(item, TaskState.CANCELLED):
                self.resolutions.append((item, "cancel", None))  # (else its canceller does)

    def flush(self) -> None:
        """Log the retries and lost attempts, and resolve the futures collected under the lock
        (after it is released)."""
        if self.retries:
            retries, self.retries = self.retries, []
            for item, attempt, summary, delay in retries:
                log.info("task %d: attempt %d failed (%s); retrying in %.3f s",
                         item.task_id, attempt, summary, delay)
        if self.losses:
            losses, self.losses = self.losses, []
            for note, outcome in losses:
                log.warning("%s%s", note, outcome)
        resolutions, self.resolutions = self.resolutions, []
        if resolutions:
            resolve_all(resolutions)
