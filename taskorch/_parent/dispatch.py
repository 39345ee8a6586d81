"""Parent process, the dispatcher thread: the ONE core that owns a task's life, for every pool.

Data flow (the pool's part in brackets; ``pool.WorkerPool``, local processes or Dask):

    run()/run_async()          dispatcher thread                                  workers
    -----------------          -----------------                                  -------
    cloudpickle the call
    Backlog.offer() --order----> _dispatch(): breaker admission, then
    (wake() if asleep)            [pool.hand_over: take calls, send them] -------> run attempts
                                 [pool.wait: read what came back] <------------- Started /
                                   -> AttemptStarted / AttemptRetrying /         Retrying /
                                      TaskFinished / CallsReturned /             outcome events
                                      AttemptLost / ... (``pool`` events)        (``_wire``)
                                 _apply(): one pass under the backlog lock:
                                   the rules (``rules.TaskRules``), each moment
                                   announced to listeners (``task.TaskListener``)
                                 _fire_timers(): tasks due (backlog), breaker,
                                   [hard timeouts, probes]
                                 _finish_if_done(): drain, or settle at stop()'s deadline

A call crosses to the pool once (``hand_over``) and comes back once (an event); the pool
never calls the core and never takes the backlog lock, and the core never reaches into the
pool's workers.

The rules, each written once whatever runs the tasks, are ``rules.TaskRules``'s: what a call
handed back unstarted, a lost attempt, an outcome mean; the breaker's count; what stop() and a
broken orchestrator do to what is left (``TaskRules.settle_locked``, from ``_settle``).

Locks: the backlog's lock (see ``backlog``; taken with ``Backlog.locked()``) guards its order,
the counts and the items' states; the ``*_locked`` methods need it held, and ``_apply`` takes it
once per batch of pool events. Nothing here holds it across IPC, a process join, or user code:
futures are resolved (``resolve.resolve_all``) after it is released, from what the rules
collected (``TaskRules.flush``), which only the dispatcher thread touches; a pool's calls are
made without it.

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
from typing import Any

from taskorch._errors import OrchestratorBrokenError
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission, Breaker
from taskorch._parent.figures import WorkerView
from taskorch._parent.pool import PoolBroken, PoolEvent, WorkerPool
from taskorch._parent.rules import TaskRules
from taskorch._parent.task import TaskState, WorkItem
from taskorch._parent.terminate import ANSWER_WAIT, Terminations
from taskorch._policy import CircuitBreaker

log = logging.getLogger("taskorch")


class DispatcherCore:
    """The task life, the loop and its guard, over the worker pool it owns."""

    def __init__(self, backlog: Backlog, pool: WorkerPool,
                 circuit_breaker: CircuitBreaker | None) -> None:
        self._backlog = backlog
        self._clock = backlog.clock  # the backlog's, for its due times and stop's deadline
        self.pool = pool  # dispatcher thread only, but for its methods marked "any thread"
        self._breaker = (
            Breaker(circuit_breaker, publish=backlog.counts.set_breaker_state,
                    clock=self._clock.monotonic)
            if circuit_breaker is not None else None
        )
        # Dispatcher thread only.
        self._rebalance_at: float | None = None  # when to look again for calls to recall
        self._admission: Admission | None = None  # what the breaker lets start (None: any)
        self._life = TaskRules(backlog, self._breaker)  # the rules, and what they collect
        self._terminations = Terminations()  # attempts to kill for a cancel (any thread)
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

    def terminate(self, item: WorkItem) -> bool:
        """Kill ``item``'s running attempt (``terminate``); False if it runs none now or the
        pool cannot (it answers on the dispatcher thread: waited for here, up to
        ``terminate.ANSWER_WAIT``). Any thread but the dispatcher's."""
        if not self.pool.terminates:
            return False
        with self._backlog.locked():
            # A local worker holds its running item (``started_on``, through its own backoff
            # too); a Dask attempt is known by its start ack alone.
            if item.state is not TaskState.RUNNING or (item.started_on is None
                                                       and not item.attempt_started):
                return False
            request = self._terminations.request(item)
        self.wake()
        if self.finished.is_set():  # (no turn is coming: ``_run_guarded`` answered, or will)
            self._terminations.answer_all()
        return request.wait(ANSWER_WAIT)

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
                self._terminations.answer_all()  # (after ``finished``: see ``terminate``)

    def _run(self) -> None:
        pool = self.pool
        while True:
            self._apply(pool.wait(self._next_timeout()))
            self._recall_for_cancel()
            for request in self._terminations.take():
                self.pool.terminate(request)
            self._flush()
            now = self._clock.monotonic()
            self._fire_timers(now)
            self._dispatch(now)
            self._flush()
            if self._finish_if_done(now):
                return

    def _flush(self) -> None:
        """Log and resolve what the rules collected under the lock (never under it)."""
        self._life.flush()

    # -- what the pool hands back: applied in one pass under the backlog lock ------------------

    def _apply(self, events: list[PoolEvent]) -> None:
        """Apply a batch of pool events, in order, under one acquisition of the backlog lock.
        ``PoolBroken`` marks the backlog after it (``mark_broken`` takes the lock itself)."""
        if not events:
            return
        broken: list[str] = []
        now = self._clock.monotonic()
        rules = self._life.by_event
        with self._backlog.locked():
            for event in events:
                rule = rules.get(type(event))
                if rule is not None:
                    rule(event, now)
                elif isinstance(event, PoolBroken):
                    broken.append(event.reason)
                else:
                    raise AssertionError(f"not a pool event: {event!r}")
        for reason in broken:
            self._backlog.mark_broken(reason)

    def _recall_for_cancel(self) -> None:
        """Callers wait to cancel calls that were handed over: ask the pool to take them back
        (they come back ``CallsReturned``, and ``TaskRules.returned_locked`` cancels them, or
        their start refuses it)."""
        items = self._backlog.cancels.take_recall_requests()
        refused = self.pool.recall(items) if items else []
        if refused:
            self._backlog.cancels.refuse(refused)

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
            if self._breaker is not None and admission is not None and admission.probes:
                self._breaker.admitted(admission.probes)
            with backlog.locked():
                # Will something other than a producer's wakeup bring us back to the ready
                # tasks? Yes if any is left: capacity only frees through what the workers send
                # (or, with the circuit open in HOLD mode, through the breaker's timer).
                left = backlog.note_waiting_locked()
                arrived = backlog.arrivals_locked() != arrivals
                mixed = left and backlog.mixed_locked()
            # Tasks that arrived meanwhile found the dispatcher due to look and wrote no
            # wakeup: go round again while a worker could take them.
            if not (left and arrived and pool.has_room(now)):
                break
        self._rebalance_at = None if left else pool.recall_unstarted(now)
        if mixed:  # a priority waits: what busy workers prefetched must not run first
            pool.recall_prefetched()

    def _admission_locked(self) -> Admission | None:
        """New tasks the breaker lets start now (None: any number); in FAIL mode with the
        circuit not closed, the new tasks beyond those fail at once (crash retries of started
        tasks stay)."""
        if self._breaker is None:
            return None
        admission = self._breaker.admit()
        if admission.left is None:
            return None
        if self._breaker.fails_fast:
            self._life.resolutions += self._breaker.reject_beyond_locked(
                self._backlog, admission.left)
        return admission

    def _take(self, limit: int, budget: int | None = None, first_may_exceed: bool = True,
              plain_after: int | None = None) -> list[WorkItem]:
        """The pool's ``take`` (``pool.Take``): up to ``limit`` calls from the backlog, in its
        order, as this hand-over's admission allows (``Backlog.take_locked``: a payload
        ``budget``, ``first_may_exceed``; see ``process.PREFETCH_BYTES``)."""
        with self._backlog.locked():
            return self._backlog.take_locked(self._admission, limit, budget, first_may_exceed,
                                             plain_after)

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
        # Crash retries whose backoff is over, delayed tasks due; expired ones end.
        for item in backlog.release_due(now):
            self._life.expired(item)

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
            self._life.settle_locked(items, held, error)
        self._flush()

    # -- fork ------------------------------------------------------------------------------

    def forget_in_forked_child(self) -> list[WorkItem]:
        """In a forked child, at the fork (this dispatcher's thread is the parent's, absent
        here): the pool lets go of the parent's channels without a word on them. Returns
        the tasks that finished but whose futures the parent's thread had not resolved yet
        at the fork (the child's orchestrator fails them with the unfinished ones)."""
        items = [item for item, _, _ in self._life.resolutions]
        self._life.resolutions = []
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
        is), and ``next_delayed_at``, the epoch time the first delayed task is due (None:
        none waits). Any thread: takes the backlog's lock briefly (no I/O under it)."""
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
        with self._backlog.locked():
            _, next_delayed = self._backlog.delayed_locked()
        return {"workers": workers, "next_delayed_at": next_delayed,
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
