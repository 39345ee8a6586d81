"""Parent process, the dispatcher thread: the ONE core that owns a task's life, for every backend.

Data flow (the backend's part in brackets):

    run()/run_async()          dispatcher thread                                  workers
    -----------------          -----------------                                  -------
    cloudpickle the call
    Backlog.offer() --pending--> _dispatch(): breaker admission, then
    (wake() if asleep)            [_hand_over: take calls, send them] ---------> run attempts
                                 [_wait_and_handle: read what came back] <----- Started /
                                   _started_locked / _retrying_locked /          Retrying /
                                   _outcome_locked / _requeue_locked /           outcome events
                                   _crash_locked  (the rules, written once)       (``_wire``)
                                 _fire_timers(): tasks due (backlog), breaker,
                                   [hard timeouts, respawns, probes]
                                 _finish_if_done(): drain, or settle at stop()'s deadline

The rules, each written once here, whatever runs the tasks:

- A call handed over but never started goes back to the front of the backlog (of its
  priority), in order, with no attempt charged (``_requeue_locked``): it never ran. A half-open
  circuit's probe slot it held frees. If a caller waits to cancel it (``future.cancel()`` of a
  queued task the dispatcher had handed over: ``_recall_for_cancel`` asked the backend to take
  it back), it ends cancelled instead; if it starts first, the cancel is refused
  (``Backlog.start_locked``).
- An attempt that started and was lost (its worker died, was killed at a hard timeout, or was
  lost with its Dask worker) is charged (``_crash_locked``): retried after the policy's backoff
  (waiting in the backlog: ``Backlog.crashed_locked``) while the task's one attempt budget
  lasts (crashes always, a hard timeout if the policy retries ``TaskTimeoutError``), else the
  task fails with that error. A call that started may
  have had side effects: after a crash a task runs at least once, not exactly once.
- The circuit breaker counts finished tasks; its state is published in ``stats()`` under the
  backlog lock, at the moment it changes, before the futures that changed it resolve.
- Metrics (once ``figures.enable`` was called): the rules record a task's queue wait at its
  first start, its run time and failure at its outcome, and a crash that ends it, into
  ``Backlog.figures``, under the lock they already hold; no I/O, nothing that waits. Readers
  copy them under the same lock (``observe``).
- At stop(): once nothing is left the workers are shut down (drained). If stop()'s deadline
  passes first, queued tasks are cancelled and running ones abandoned (``_settle``). A broken
  orchestrator (no worker can run anything) fails what it holds with
  ``OrchestratorBrokenError``.

What a backend supplies (the hooks below, marked "backend"): how to start (``_open``), how to
wait and what came back (``_wait_and_handle``, calling the ``*_locked`` rules under the backlog
lock), how to hand over (``_hand_over``), how to take calls back from a busy worker
(``_recall_unstarted``) or for a cancel (``_recall_calls``), its own timers, how to give
everything back at stop (``_take_all_inflight_locked``), how to end (``_shut_down``,
``_close``), and what to let go of in a forked child (``_forget_channels_in_child``).

Locks: the backlog's lock (see ``backlog``; taken with ``Backlog.locked()``) guards its order,
the counts and the items' states; the ``*_locked`` methods need it held. Nothing here holds
it across IPC, a process join, or user code: futures are resolved (``task.resolve_all``) after
it is released, from ``self._resolutions``, which only the dispatcher thread touches.

The thread is a daemon (a stuck stop must never keep the interpreter alive; the atexit hook
stops every orchestrator first). Its body is guarded: if it ever fails, the backend is told
to give everything back, every unresolved future fails with ``OrchestratorBrokenError``, and
the error is logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterable

from taskorch._errors import (
    OrchestratorBrokenError,
    TaskAbandonedError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission, Breaker
from taskorch._parent.figures import WorkerView
from taskorch._parent.task import Resolution, TaskState, WorkItem, resolve_all
from taskorch._policy import CircuitBreaker
from taskorch._wire import Failed, Outcome, Succeeded

log = logging.getLogger("taskorch")

#: The type name a Failed event carries for a per-attempt timeout.
TIMEOUT_TYPE = f"{TaskTimeoutError.__module__}.{TaskTimeoutError.__qualname__}"


class DispatcherCore:
    """The task life, the loop and its guard; a backend subclass supplies the hooks."""

    #: The thread's name (a stack dump then reads like a diagram).
    thread_name = "taskorch-dispatcher"
    #: Can ``_recall_calls`` take back a call handed over and not started (for a cancel)?
    recalls_for_cancel = False

    def __init__(self, backlog: Backlog, circuit_breaker: CircuitBreaker | None) -> None:
        self._backlog = backlog
        self._clock = backlog.clock  # the backlog's, for its due times and stop's deadline
        self._breaker = (
            Breaker(circuit_breaker, publish=backlog.set_breaker_state_locked,
                    clock=self._clock.monotonic)
            if circuit_breaker is not None else None
        )
        # Dispatcher thread only.
        self._rebalance_at: float | None = None  # when to look again for calls to recall
        self._resolutions: list[Resolution] = []  # collected under the lock, resolved after
        self._retries: list[tuple[WorkItem, int, str, float]] = []  # logged after the lock
        # Read by any thread.
        self.pids: tuple[int, ...] = ()  # worker processes on this machine (swapped whole)
        self.drained: bool | None = None  # set when the thread ends
        self.finished = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run_guarded, name=self.thread_name,
                                       daemon=True)

    # -- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        """Start the thread, which starts the backend (local workers must be spawned by the
        thread that outlives them); raise OrchestratorBrokenError if it could not start."""
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            self.finished.wait()
            raise OrchestratorBrokenError(
                self._describe_start_failure(self._start_error)
            ) from self._start_error

    # -- the thread ------------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            try:
                self._open()
            except BaseException as exc:
                self._start_error = exc
                self._backlog.mark_broken(self._describe_start_failure(exc))
                return  # (the backend's _close, below, releases what _open made)
            finally:
                self._started.set()
            self._run()
        except BaseException as exc:
            log.critical("taskorch dispatcher failed; failing every unresolved task", exc_info=True)
            self._backlog.mark_broken(f"the dispatcher thread failed: {exc!r}")
            try:
                self._settle(OrchestratorBrokenError(
                    f"the orchestrator's dispatcher thread failed ({exc!r}); see the 'taskorch' log"
                ))
            except BaseException:
                log.critical("could not settle the tasks", exc_info=True)
        finally:
            try:
                self._close()
            finally:
                if self.drained is None:
                    self.drained = False
                self.finished.set()

    def _run(self) -> None:
        while True:
            self._wait_and_handle(self._next_timeout())
            self._recall_for_cancel()
            self._flush()
            now = self._clock.monotonic()
            self._fire_timers(now)
            self._dispatch(now)
            self._flush()
            if self._finish_if_done(now):
                return

    def _flush(self) -> None:
        """Log the retries and resolve the futures collected under the lock (never under it:
        resolving wakes waiters and hands done-callbacks over)."""
        retries, self._retries = self._retries, []
        for item, attempt, summary, delay in retries:
            log.info("task %d: attempt %d failed (%s); retrying in %.3f s",
                     item.task_id, attempt, summary, delay)
        resolutions, self._resolutions = self._resolutions, []
        if resolutions:
            resolve_all(resolutions)

    # -- the task life: what comes back (backends call these with the backlog lock held) --------

    def _started_locked(self, item: WorkItem, attempt: int, now: float) -> None:
        """Attempt ``attempt`` of ``item`` began; the first one frees its backlog slot."""
        item.attempts = item.future.attempts = attempt
        item.attempt_started = now
        figures = self._backlog.figures
        if figures is not None and item.state is TaskState.QUEUED:
            figures.started(item, now)  # (metrics on: the queue wait; see figures.py)
        self._backlog.start_locked(item)
        if item.on_start is not None:  # (taskorch serve's journal: queues a record)
            item.on_start(item)

    def _retrying_locked(self, item: WorkItem, attempt: int, summary: str, delay: float,
                         timed_out: bool) -> None:
        """Attempt ``attempt`` failed inside the worker, which retries after ``delay``."""
        item.attempt_started = 0.0  # backing off: no attempt runs
        self._backlog.count_retry_locked(timed_out)
        self._retries.append((item, attempt, summary, delay))

    def _outcome_locked(self, item: WorkItem, event: Outcome, now: float) -> float:
        """A Succeeded or Failed event (``_wire``): the task is over. Returns its worker-side
        seconds per attempt, for the backend's prefetch estimate."""
        attempts, seconds = event.attempts, event.seconds
        backlog = self._backlog
        figures = backlog.figures
        if figures is not None and item.state is TaskState.QUEUED:
            figures.started(item, now)
        backlog.start_locked(item)  # (on Dask its Started event may not have come first)
        item.attempts = item.future.attempts = attempts
        item.future.seconds = seconds
        failed = not isinstance(event, Succeeded)
        if isinstance(event, Succeeded):
            backlog.finish_locked(item, TaskState.SUCCEEDED)
            self._resolutions.append((item, "result", event.result))
        elif isinstance(event, Failed):
            if event.type_name == TIMEOUT_TYPE:
                backlog.count_timeout_locked()
            backlog.finish_locked(item, TaskState.FAILED)
            self._resolutions.append((item, "error", event.error))
        else:
            raise AssertionError(f"not an outcome: {event!r} for {item!r}")
        if figures is not None:
            figures.finished(item, seconds, event.error if isinstance(event, Failed) else None)
        if self._breaker is not None:
            self._breaker.record(item.task_id, failed)
        return float(seconds) / max(1, int(attempts))

    def _requeue_locked(self, items: list[WorkItem]) -> None:
        """Calls handed over that never started go back to the front of the backlog (of
        their priority), in order, uncharged (they never ran); a half-open circuit's probe
        slot frees."""
        if not items:
            return
        back = []
        for item in items:
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

    def _recall_for_cancel(self) -> None:
        """Callers wait to cancel calls that were handed over: ask the backend to take them
        back (its answer comes through ``_requeue_locked``, or their start refuses it)."""
        items = self._backlog.take_recall_requests()
        refused = self._recall_calls(items) if items else []
        if refused:
            self._backlog.refuse_cancels(refused)

    def _crash_locked(self, item: WorkItem, error: BaseException) -> str:
        """The attempt of ``item`` that started was lost with its worker: charge it; retry
        after the policy's backoff while the budget lasts, else fail with ``error``. Returns
        what became of it, for the backend's log line."""
        backlog = self._backlog
        item.worker = item.started_on = None
        item.attempt_started = 0.0
        timed_out = isinstance(error, TaskTimeoutError)
        retryable = isinstance(error, WorkerCrashedError) or item.policy.retries_error(error)
        if retryable and item.attempts < item.policy.max_attempts:
            delay = item.policy.backoff_before(item.attempts + 1)
            backlog.crashed_locked(item, timed_out, retry_in=delay)  # it waits in the backlog
            return f"retrying in {delay:.3g} s"
        backlog.crashed_locked(item, timed_out)
        backlog.finish_locked(item, TaskState.FAILED)
        self._resolutions.append((item, "exception", error))
        figures = backlog.figures
        if figures is not None:
            figures.failed(item, error)
        if self._breaker is not None:
            self._breaker.record(item.task_id, True)
        return "task failed"

    def _fail_locked(self, item: WorkItem, error: BaseException) -> None:
        """The task fails with ``error`` without a retry (the backend could not run it)."""
        self._backlog.finish_locked(item, TaskState.FAILED)
        self._resolutions.append((item, "exception", error))
        figures = self._backlog.figures
        if figures is not None:
            figures.failed(item, error)
        if self._breaker is not None:
            self._breaker.record(item.task_id, True)

    # -- dispatching -----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        """Hand waiting tasks to workers with room, as the circuit breaker allows."""
        backlog = self._backlog
        if backlog.broken is not None:
            return
        while True:
            with backlog.locked():
                admission = self._admission_locked()
                arrivals = backlog.arrivals_locked()
            self._hand_over(now, admission)
            if self._breaker is not None and admission.probes:
                self._breaker.admitted(admission.probes)
            with backlog.locked():
                # Will something other than a producer's wakeup bring us back to the ready
                # tasks? Yes if any is left: capacity only frees through what the workers send
                # (or, with the circuit open in HOLD mode, through the breaker's timer).
                waiting = backlog.note_waiting_locked()
                arrived = backlog.arrivals_locked() != arrivals
            # Tasks that arrived meanwhile found the dispatcher due to look and wrote no
            # wakeup: go round again while a worker could take them.
            if not (waiting and arrived and self._has_room(now)):
                break
        self._rebalance_at = None if waiting else self._recall_unstarted(now)

    def _admission_locked(self) -> Admission:
        """New tasks the breaker lets start now; in FAIL mode with the circuit not closed,
        the new tasks beyond those fail at once (crash retries of started tasks stay)."""
        if self._breaker is None:
            return Admission(None)
        admission = self._breaker.admit()
        if admission.left is not None and self._breaker.fails_fast:
            self._resolutions += self._breaker.reject_beyond_locked(self._backlog, admission.left)
        return admission

    def _take_locked(
        self, admission: Admission, limit: int, budget: int | None = None,
        first_may_exceed: bool = True,
    ) -> list[WorkItem]:
        """Up to ``limit`` calls from the backlog, in its order, as ``admission`` allows
        (``Backlog.take_locked``: a payload ``budget``, ``first_may_exceed``)."""
        return self._backlog.take_locked(admission, limit, budget, first_may_exceed)

    # -- timers ----------------------------------------------------------------------------

    def _next_timeout(self) -> float | None:
        """Seconds until the nearest timer (the wait's timeout), 0 if one is due, None if none."""
        backlog = self._backlog
        if backlog.broken is not None and self._holds_anything():
            return 0.0  # settle at once
        deadlines = [
            backlog.next_due(), self._rebalance_at, backlog.stop_deadline,
            self._breaker.next_change() if self._breaker is not None else None,
            *self._backend_deadlines(),
        ]
        first = min((d for d in deadlines if d is not None), default=None)
        return None if first is None else max(0.0, first - self._clock.monotonic())

    def _fire_timers(self, now: float) -> None:
        backlog = self._backlog
        if backlog.broken is not None and self._holds_anything():
            self._settle(OrchestratorBrokenError(backlog.broken))
            return
        self._fire_backend_timers(now)
        backlog.release_due(now)  # (crash retries whose backoff is over, delayed tasks)

    def _holds_anything(self) -> bool:
        with self._backlog.locked():
            return self._backlog.holds_tasks_locked() or self._has_inflight()

    # -- stopping --------------------------------------------------------------------------

    def _finish_if_done(self, now: float) -> bool:
        backlog = self._backlog
        if not backlog.closed:
            return False
        if backlog.broken is not None or not self._holds_anything():
            self._shut_down(backlog.stop_deadline)
            self._flush()  # (outcomes read while the workers left)
            self.drained = backlog.broken is None
            return True
        if backlog.stop_deadline is not None and now >= backlog.stop_deadline:
            self._settle(None)  # stop()'s timeout expired: abandon
            self.drained = False
            return True
        return False

    def _settle(self, error: BaseException | None) -> None:
        """Settle every unresolved task: queued ones are cancelled, running ones abandoned
        (``error`` None: stop()'s deadline) or failed with ``error`` (broken)."""
        self._before_settle()
        backlog = self._backlog
        with backlog.locked():
            items = backlog.take_all_locked()
            held = self._take_all_inflight_locked()
            items += [item for item, _ in held]
            notes = {item.task_id: note for item, note in held}
            for item in items:
                if error is not None:
                    backlog.finish_locked(item, TaskState.FAILED)
                    self._resolutions.append((item, "exception", error))
                elif item.state is TaskState.RUNNING:
                    backlog.finish_locked(item, TaskState.ABANDONED)
                    note = notes.get(item.task_id) or "it was waiting to be retried after a crash"
                    self._resolutions.append((item, "exception", TaskAbandonedError(
                        f"stop()'s timeout expired while task {item.task_id} was running "
                        f"(attempt {item.attempts}); {note}"
                    )))
                elif not backlog.finish_locked(item, TaskState.CANCELLED):
                    self._resolutions.append((item, "cancel", None))  # (else its canceller does)
        self._after_settle()
        self._flush()

    # -- fork ------------------------------------------------------------------------------

    def forget_in_forked_child(self) -> list[WorkItem]:
        """In a forked child, at the fork (this dispatcher's thread is the parent's, absent
        here): the backend lets go of the parent's channels without a word on them. Returns
        the tasks that finished but whose futures the parent's thread had not resolved yet
        at the fork (the child's orchestrator fails them with the unfinished ones)."""
        items = [item for item, _, _ in self._resolutions]
        self._resolutions = []
        try:
            self._forget_channels_in_child()
        finally:
            self.finished.set()  # nothing of it runs here
        return items

    # -- the backend's part --------------------------------------------------------------------

    def wake(self) -> None:  # backend
        """Look at the backlog soon (new tasks, or stop() was called). Any thread."""
        raise NotImplementedError

    def effective_worker_count(self) -> int:  # backend
        """How many tasks may run at once now."""
        raise NotImplementedError

    def status_details(self) -> dict[str, Any]:
        """What ``taskorch status`` shows beyond the counts: ``workers``, one dict per worker
        process (from ``worker_views``), and ``oldest_queued_seconds``, the age of the oldest
        task accepted and not yet started, in the backlog or handed to a worker (None: none
        is). Any thread: takes the backlog's lock briefly (no I/O under it)."""
        now = time.monotonic()
        views = self.worker_views()
        oldest = self._backlog.oldest_waiting_since()
        queued_since = [] if oldest is None else [oldest]
        queued_since += [v.waiting_since for v in views if v.waiting_since is not None]
        workers = [{
            "pid": v.pid, "tasks": v.tasks_run or 0,
            "prefetched": max(0, (v.held or 0) - (v.task_id is not None)),
            "running": None if v.task_id is None else {
                "task_id": v.task_id, "attempt": v.attempt,
                "seconds": round(v.running_for or 0.0, 3)},
            "rss_mib": _rss_mib(v.pid),
        } for v in views]
        return {"workers": workers,
                "oldest_queued_seconds": round(now - min(queued_since), 3) if queued_since
                else None}

    def worker_views(self) -> list[WorkerView]:  # backend
        """The workers now, for the dashboard (any thread, no lock: a snapshot that may be a
        moment stale). By default only their pids are known."""
        return [WorkerView(pid=pid) for pid in self.pids]

    def _open(self) -> None:  # backend
        """Start the workers or connect (on the dispatcher thread); raise if nothing can run."""
        raise NotImplementedError

    def _describe_start_failure(self, exc: BaseException) -> str:  # backend
        raise NotImplementedError

    def _wait_and_handle(self, timeout: float | None) -> None:  # backend
        """Block until something comes back, a wakeup, or ``timeout``; handle what came."""
        raise NotImplementedError

    def _hand_over(self, now: float, admission: Admission) -> None:  # backend
        """Take calls (``_take_locked``) for the workers with room, and send them."""
        raise NotImplementedError

    def _has_room(self, now: float) -> bool:  # backend
        """Could a worker take another call now?"""
        raise NotImplementedError

    def _recall_unstarted(self, now: float) -> float | None:  # backend
        """Nothing waits in the backlog: take back calls a busy worker holds unstarted while
        another idles. Returns when to look again (None: no need)."""
        raise NotImplementedError

    def _recall_calls(self, items: list[WorkItem]) -> list[WorkItem]:  # backend
        """Take back ``items`` (handed over, not started when asked) for a cancel: each comes
        back through ``_requeue_locked`` if it had not started. Returns those it cannot
        recall (their cancel is refused). Only called if ``recalls_for_cancel``."""
        return items

    def _has_inflight(self) -> bool:  # backend (backlog lock held)
        """Are calls handed over and not finished?"""
        raise NotImplementedError

    def _backend_deadlines(self) -> Iterable[float | None]:  # backend
        return ()

    def _fire_backend_timers(self, now: float) -> None:  # backend
        pass

    def _before_settle(self) -> None:  # backend
        """About to settle everything: stop the workers from starting anything more."""

    def _take_all_inflight_locked(self) -> list[tuple[WorkItem, str]]:  # backend
        """Forget every call handed over; each with what stop() did to it if it runs."""
        raise NotImplementedError

    def _after_settle(self) -> None:  # backend
        """Everything was settled: cancel or kill what may still run."""

    def _shut_down(self, deadline: float | None) -> None:  # backend
        """Everything ran (or the orchestrator is broken): let the workers go (by stop()'s
        ``deadline``, a ``time.monotonic()`` value, if one was set)."""

    def _forget_channels_in_child(self) -> None:  # backend
        """In a forked child: close this process's copies of the parent's channels (never send
        on them, never shut a shared socket down)."""

    def _close(self) -> None:  # backend
        """The thread ends: release what the backend holds (channels, a client)."""


def _rss_mib(pid: int) -> float | None:
    """A process's resident memory in MiB, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
