"""Parent process, the dispatcher thread: the ONE core that owns a task's life, for every pool.

Data flow (the pool's part in brackets; ``pool.WorkerPool``, local processes or Dask):

    run()/run_async()          dispatcher thread                                  workers
    -----------------          -----------------                                  -------
    cloudpickle the call
    Backlog.offer() --pending--> _dispatch(): breaker admission, then
    (wake() if asleep)            [pool.hand_over: take calls, send them] -------> run attempts
                                 [pool.wait: read what came back] <------------- STARTED /
                                   -> Started / Retrying / Finished /            RETRYING /
                                      Returned / Lost / ... (``pool`` events)    outcome events
                                 _apply(): one pass under the backlog lock:      (``_wire``)
                                   _started_locked / _retrying_locked /
                                   _finished_locked / _returned_locked /
                                   _lost_locked  (the rules, written once),
                                   announced to listeners (``task.TaskListener``)
                                 _fire_timers(): tasks due (backlog), breaker,
                                   [hard timeouts, probes]
                                 _finish_if_done(): drain, or settle at stop()'s deadline

A call crosses to the pool once (``hand_over``) and comes back once (an event); the pool
never calls the core and never takes the backlog lock, and the core never reaches into the
pool's workers.

The rules, each written once here, whatever runs the tasks:

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
- The circuit breaker counts finished tasks; its state is published in ``stats()`` under the
  backlog lock, at the moment it changes, before the futures that changed it resolve.
- Each moment (started, retrying, finished, crashed) is announced to the listeners
  (``task.TaskListener``: ``Backlog.listeners``, such as the metrics' figures, and the
  task's own ``WorkItem.listener``, such as ``taskorch serve``'s journal) under the lock the
  rule already holds; they do no I/O and never wait.
- At stop(): once nothing is left the workers are shut down (drained). If stop()'s deadline
  passes first, queued tasks are cancelled and running ones abandoned (``_settle``). A broken
  orchestrator (no worker can run anything) fails what it holds with
  ``OrchestratorBrokenError``.

Locks: the backlog's lock (see ``backlog``; taken with ``Backlog.locked()``) guards its order,
the counts and the items' states; the ``*_locked`` methods need it held, and ``_apply`` takes it
once per batch of pool events. Nothing here holds it across IPC, a process join, or user code:
futures are resolved (``task.resolve_all``) after it is released, from ``self._resolutions``,
which only the dispatcher thread touches; a pool's calls are made without it.

The thread is a daemon (a stuck stop must never keep the interpreter alive; the atexit hook
stops every orchestrator first). Its body is guarded: if it ever fails, the pool is told to
give everything back, every unresolved future fails with ``OrchestratorBrokenError``, and
the error is logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from taskorch._errors import (
    OrchestratorBrokenError,
    TaskAbandonedError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission, Breaker
from taskorch._parent.figures import WorkerView
from taskorch._parent.pool import (
    Broken,
    Failed,
    Finished,
    Lost,
    PoolEvent,
    Restarted,
    Retrying,
    Returned,
    Started,
    WorkerPool,
    WorkersChanged,
)
from taskorch._parent.task import Resolution, TaskState, WorkItem, resolve_all
from taskorch._policy import CircuitBreaker
from taskorch._wire import FAILED, SUCCEEDED

log = logging.getLogger("taskorch")

#: The type name a FAILED event carries for a per-attempt timeout.
TIMEOUT_TYPE = f"{TaskTimeoutError.__module__}.{TaskTimeoutError.__qualname__}"


class DispatcherCore:
    """The task life, the loop and its guard, over the worker pool it owns."""

    def __init__(self, backlog: Backlog, pool: WorkerPool,
                 circuit_breaker: CircuitBreaker | None) -> None:
        self._backlog = backlog
        self._clock = backlog.clock  # the backlog's, for its due times and stop's deadline
        self.pool = pool  # dispatcher thread only, but for its methods marked "any thread"
        self._breaker = (
            Breaker(circuit_breaker, publish=backlog.set_breaker_state_locked,
                    clock=self._clock.monotonic)
            if circuit_breaker is not None else None
        )
        # Dispatcher thread only.
        self._rebalance_at: float | None = None  # when to look again for calls to recall
        self._admission = Admission(None)  # what the breaker lets start in this hand-over
        self._resolutions: list[Resolution] = []  # collected under the lock, resolved after
        self._retries: list[tuple[WorkItem, int, str, float]] = []  # logged after the lock
        self._losses: list[tuple[str, str]] = []  # (note, outcome) of crashes, logged after
        # The rule for each kind of pool event (``_apply``), by its type.
        self._rules: dict[type, Callable[[Any, float], None]] = {
            Started: self._started_locked, Finished: self._finished_locked,
            Retrying: self._retrying_locked, Returned: self._returned_locked,
            Lost: self._lost_locked, Failed: self._fail_locked,
            WorkersChanged: self._workers_changed_locked, Restarted: self._restarted_locked,
        }
        # Read by any thread.
        self.drained: bool | None = None  # set when the thread ends
        self.finished = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run_guarded, name=pool.thread_name,
                                       daemon=True)

    # -- called from other threads -------------------------------------------------------------

    @property
    def pids(self) -> tuple[int, ...]:
        """Worker processes on this machine (any thread)."""
        return self.pool.pids

    @property
    def recalls_for_cancel(self) -> bool:
        return self.pool.recalls_for_cancel

    def start(self) -> None:
        """Start the thread, which opens the pool (local workers must be spawned by the
        thread that outlives them); raise OrchestratorBrokenError if it could not start."""
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            self.finished.wait()
            raise OrchestratorBrokenError(
                self.pool.describe_start_failure(self._start_error)
            ) from self._start_error

    def wake(self) -> None:
        """Look at the backlog soon (new tasks, or stop() was called). Any thread."""
        self.pool.wake()

    def effective_worker_count(self) -> int:
        """How many tasks may run at once now. Any thread."""
        return self.pool.effective_worker_count()

    def worker_views(self) -> list[WorkerView]:
        """The workers now, for the dashboard (any thread; see ``WorkerPool.worker_views``)."""
        return self.pool.worker_views()

    # -- the thread ------------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            try:
                self._apply(self.pool.open())
            except BaseException as exc:
                self._start_error = exc
                self._backlog.mark_broken(self.pool.describe_start_failure(exc))
                return  # (the pool's close, below, releases what open made)
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
                self._apply(self.pool.close())
            finally:
                if self.drained is None:
                    self.drained = False
                self.finished.set()

    def _run(self) -> None:
        pool = self.pool
        while True:
            self._apply(pool.wait(self._next_timeout()))
            self._recall_for_cancel()
            self._flush()
            now = self._clock.monotonic()
            self._fire_timers(now)
            self._dispatch(now)
            self._flush()
            if self._finish_if_done(now):
                return

    def _flush(self) -> None:
        """Log the retries and crashes, and resolve the futures collected under the lock (never
        under it: resolving wakes waiters and hands done-callbacks over)."""
        if self._retries:
            retries, self._retries = self._retries, []
            for item, attempt, summary, delay in retries:
                log.info("task %d: attempt %d failed (%s); retrying in %.3f s",
                         item.task_id, attempt, summary, delay)
        if self._losses:
            losses, self._losses = self._losses, []
            for note, outcome in losses:
                log.warning("%s%s", note, outcome)
        resolutions, self._resolutions = self._resolutions, []
        if resolutions:
            resolve_all(resolutions)

    # -- what the pool hands back: applied in one pass under the backlog lock ------------------

    def _apply(self, events: list[PoolEvent]) -> None:
        """Apply a batch of pool events, in order, under one acquisition of the backlog lock.
        ``Broken`` marks the backlog after it (``mark_broken`` takes the lock itself)."""
        if not events:
            return
        broken: list[str] = []
        now = self._clock.monotonic()
        rules = self._rules
        with self._backlog.locked():
            for event in events:
                rule = rules.get(type(event))
                if rule is not None:
                    rule(event, now)
                elif isinstance(event, Broken):
                    broken.append(event.reason)
                else:
                    raise AssertionError(f"not a pool event: {event!r}")
        for reason in broken:
            self._backlog.mark_broken(reason)

    def _workers_changed_locked(self, event: WorkersChanged, now: float) -> None:
        self._backlog.set_workers_locked(event.workers)

    def _restarted_locked(self, event: Restarted, now: float) -> None:
        self._backlog.count_restarts_locked(event.started, event.cause)

    # -- the task life: the rules (backlog lock held) ---------------------------------------------

    def _started_locked(self, event: Started, now: float) -> None:
        """An attempt began; the first one frees its backlog slot."""
        item = event.item
        item.attempts = item.future.attempts = event.attempt
        item.attempt_started = now
        self._announce_started(item, now)
        self._backlog.start_locked(item)

    def _announce_started(self, item: WorkItem, now: float) -> None:
        for listener in self._backlog.listeners:  # (metrics on: the queue wait, at the first)
            listener.started(item, now)
        if item.listener is not None:  # (taskorch serve's journal: queues a record)
            item.listener.started(item, now)

    def _retrying_locked(self, event: Retrying, now: float) -> None:
        """An attempt failed inside the worker, which retries after ``event.delay``."""
        item = event.item
        item.attempt_started = 0.0  # backing off: no attempt runs
        self._backlog.count_retry_locked(event.timed_out)
        self._retries.append((item, event.attempt, event.summary, event.delay))
        for listener in self._backlog.listeners:
            listener.retrying(item, event.attempt, event.summary, event.delay)

    def _finished_locked(self, event: Finished, now: float) -> None:
        """A SUCCEEDED or FAILED event (``_wire``): the task is over."""
        item, outcome = event
        tag, _, attempts, seconds = outcome[:4]
        backlog = self._backlog
        if item.state is TaskState.QUEUED:  # (on Dask its STARTED event may not have come)
            self._announce_started(item, now)
        backlog.start_locked(item)
        item.attempts = item.future.attempts = attempts
        item.future.seconds = seconds
        failed = tag != SUCCEEDED
        if tag == SUCCEEDED:
            backlog.finish_locked(item, TaskState.SUCCEEDED)
            self._resolutions.append((item, "result", outcome[4]))
        elif tag == FAILED:
            if outcome[5] == TIMEOUT_TYPE:
                backlog.count_timeout_locked()
            backlog.finish_locked(item, TaskState.FAILED)
            self._resolutions.append((item, "error", outcome[4:]))
        else:
            raise AssertionError(f"not an outcome: {outcome!r} for {item!r}")
        for listener in backlog.listeners:
            listener.finished(item, seconds, outcome[4:] if failed else None)
        if self._breaker is not None:
            self._breaker.record(item.task_id, failed)

    def _returned_locked(self, event: Returned, now: float) -> None:
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

    def _lost_locked(self, event: Lost, now: float) -> None:
        """The attempt that started was lost with its worker: charge it; retry after the
        policy's backoff while the budget lasts, else fail. What became of it ends the
        pool's warning (logged after the lock)."""
        item, error, note = event
        backlog = self._backlog
        item.worker = item.started_on = None
        item.attempt_started = 0.0
        timed_out = isinstance(error, TaskTimeoutError)
        retryable = isinstance(error, WorkerCrashedError) or item.policy.retries_error(error)
        if retryable and item.attempts < item.policy.max_attempts:
            delay = item.policy.backoff_before(item.attempts + 1)
            backlog.crashed_locked(item, timed_out, retry_in=delay)  # it waits in the backlog
            for listener in backlog.listeners:
                listener.crashed(item, error, False)
            self._losses.append((note, f"retrying in {delay:.3g} s"))
            return
        backlog.crashed_locked(item, timed_out)
        self._fail_locked(Failed(item, error), now)
        self._losses.append((note, "task failed"))

    def _fail_locked(self, event: Failed, now: float) -> None:
        """The task fails with ``error`` without a retry (its last attempt was lost, or the
        pool could not run it)."""
        item, error = event
        self._backlog.finish_locked(item, TaskState.FAILED)
        self._resolutions.append((item, "exception", error))
        for listener in self._backlog.listeners:
            listener.crashed(item, error, True)
        if self._breaker is not None:
            self._breaker.record(item.task_id, True)


    def _recall_for_cancel(self) -> None:
        """Callers wait to cancel calls that were handed over: ask the pool to take them back
        (they come back ``Returned``, and ``_returned_locked`` cancels them, or their start
        refuses it)."""
        items = self._backlog.take_recall_requests()
        refused = self.pool.recall(items) if items else []
        if refused:
            self._backlog.refuse_cancels(refused)

    # -- dispatching -----------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        """Hand waiting tasks to workers with room, as the circuit breaker allows."""
        backlog = self._backlog
        if backlog.broken is not None:
            return
        pool = self.pool
        while True:
            with backlog.locked():
                self._admission = admission = self._admission_locked()
                arrivals = backlog.arrivals_locked()
                ready = backlog.ready_count_locked()
                finishing = backlog.closed and not backlog.holds_tasks_locked()
            self._apply(pool.hand_over(now, ready, self._take, finishing))
            if self._breaker is not None and admission.probes:
                self._breaker.admitted(admission.probes)
            with backlog.locked():
                # Will something other than a producer's wakeup bring us back to the ready
                # tasks? Yes if any is left: capacity only frees through what the workers send
                # (or, with the circuit open in HOLD mode, through the breaker's timer).
                left = backlog.note_waiting_locked()
                arrived = backlog.arrivals_locked() != arrivals
            # Tasks that arrived meanwhile found the dispatcher due to look and wrote no
            # wakeup: go round again while a worker could take them.
            if not (left and arrived and pool.has_room(now)):
                break
        self._rebalance_at = None if left else pool.recall_unstarted(now)

    def _admission_locked(self) -> Admission:
        """New tasks the breaker lets start now; in FAIL mode with the circuit not closed,
        the new tasks beyond those fail at once (crash retries of started tasks stay)."""
        if self._breaker is None:
            return Admission(None)
        admission = self._breaker.admit()
        if admission.left is not None and self._breaker.fails_fast:
            self._resolutions += self._breaker.reject_beyond_locked(self._backlog, admission.left)
        return admission

    def _take(self, limit: int, budget: int | None = None,
              first_may_exceed: bool = True) -> list[WorkItem]:
        """The pool's ``take`` (``pool.Take``): up to ``limit`` calls from the backlog, in its
        order, as this hand-over's admission allows (``Backlog.take_locked``: a payload
        ``budget``, ``first_may_exceed``; see ``process.PREFETCH_BYTES``)."""
        with self._backlog.locked():
            return self._backlog.take_locked(self._admission, limit, budget, first_may_exceed)

    # -- timers ----------------------------------------------------------------------------

    def _next_timeout(self) -> float | None:
        """Seconds until the nearest timer (the wait's timeout), 0 if one is due, None if none."""
        backlog = self._backlog
        if backlog.broken is not None and self._holds_anything():
            return 0.0  # settle at once
        deadlines = [
            backlog.next_due(), self._rebalance_at, backlog.stop_deadline,
            self._breaker.next_change() if self._breaker is not None else None,
            *self.pool.deadlines(),
        ]
        first = min((d for d in deadlines if d is not None), default=None)
        return None if first is None else max(0.0, first - self._clock.monotonic())

    def _fire_timers(self, now: float) -> None:
        backlog = self._backlog
        if backlog.broken is not None and self._holds_anything():
            self._settle(OrchestratorBrokenError(backlog.broken))
            return
        self._apply(self.pool.fire_timers(now))
        backlog.release_due(now)  # (crash retries whose backoff is over, delayed tasks)

    def _holds_anything(self) -> bool:
        with self._backlog.locked():
            return self._backlog.holds_tasks_locked() or self.pool.has_inflight()

    # -- stopping --------------------------------------------------------------------------

    def _finish_if_done(self, now: float) -> bool:
        backlog = self._backlog
        if not backlog.closed:
            return False
        if backlog.broken is not None or not self._holds_anything():
            for events in self.pool.shut_down(backlog.stop_deadline):
                self._apply(events)  # (outcomes read while the workers leave)
            self._flush()
            self.drained = backlog.broken is None
            return True
        if backlog.stop_deadline is not None and now >= backlog.stop_deadline:
            self._settle(None)  # stop()'s timeout expired: abandon
            self.drained = False
            return True
        return False

    def _settle(self, error: BaseException | None) -> None:
        """Settle every unresolved task: queued ones are cancelled, running ones abandoned
        (``error`` None: stop()'s deadline) or failed with ``error`` (broken). What the pool
        read before it stopped still counts, in the same pass."""
        events, held = self.pool.stop_all()
        self._apply(events)
        backlog = self._backlog
        with backlog.locked():
            items = backlog.take_all_locked()
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
        self._flush()

    # -- fork ------------------------------------------------------------------------------

    def forget_in_forked_child(self) -> list[WorkItem]:
        """In a forked child, at the fork (this dispatcher's thread is the parent's, absent
        here): the pool lets go of the parent's channels without a word on them. Returns
        the tasks that finished but whose futures the parent's thread had not resolved yet
        at the fork (the child's orchestrator fails them with the unfinished ones)."""
        items = [item for item, _, _ in self._resolutions]
        self._resolutions = []
        try:
            self.pool.forget_in_forked_child()
        finally:
            self.finished.set()  # nothing of it runs here
        return items

    # -- status ----------------------------------------------------------------------------

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


def _rss_mib(pid: int) -> float | None:
    """A process's resident memory in MiB, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
