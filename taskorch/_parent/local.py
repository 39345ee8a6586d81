"""Parent process, the dispatcher thread: the local backend, worker processes on this machine.

The task life (start, retry, outcome, crash charge, breaker, stop) is the core's
(``dispatch.DispatcherCore``); this module supplies what is local:

    dispatcher thread ("taskorch-dispatcher")                         worker i (``_worker.main``)
    -----------------------------------------                         --------
    _hand_over: CALLS frame, private socketpair ----------------------> run attempts (tenacity)
    _wait_and_handle: selector.select(timeout)  <--- Started / Retrying / outcome frames
      wake pipe | each worker's channel | each worker's exit fd (pidfd) | the timeout
    a death: its unstarted calls re-queued uncharged, its running call charged a crash
    timers: hard timeouts (SIGTERM, SIGKILL), respawn after a failed start

- The dispatcher is the only thread that talks to workers, spawns them (``PR_SET_PDEATHSIG``
  in the workers is tied to the spawning thread, so this thread outlives every worker) and
  kills them. It blocks in one place, ``selector.select(timeout)``, whose wakeup sources are:
  the wake pipe (new tasks, stop()), each worker's channel (events), each worker's exit fd
  (death), and the timeout (the core's timers, plus the nearest hard-timeout deadline,
  SIGKILL escalation, or respawn retry). There is no fixed polling tick.
- Workers run calls in the order handed over. A worker holds its running call plus a
  prefetch sized from its recent task durations (``process.PREFETCH_*``), so tiny tasks stream
  without a round trip each while a slow task never holds many others back; calls waiting
  behind a long task are recalled when another worker idles.

Crash isolation: every worker has its own channel, so a death concerns one worker: the calls
it held but had not started go back uncharged, the one it was running is charged (the core's
``_requeue_locked`` / ``_crash_locked``), and a replacement starts at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from typing import Any, Iterable

from taskorch._errors import TaskTimeoutError, WorkerCrashedError, _signal_name
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission
from taskorch._parent.dispatch import DispatcherCore
from taskorch._parent.figures import WorkerView
from taskorch._parent.process import PREFETCH_BYTES, SLOW_AFTER, WorkerProcess
from taskorch._parent.task import WorkItem
from taskorch._policy import CircuitBreaker
from taskorch._wire import (
    Event,
    Failed,
    Ready,
    Recalled,
    Retiring,
    Retrying,
    Started,
    Succeeded,
)

log = logging.getLogger("taskorch")

#: A worker that ignores SIGTERM after a hard timeout gets SIGKILL this much later.
SIGKILL_AFTER = 0.5
#: After stop() with nothing left to run, idle workers get this long to exit on their own
#: before they are killed, even if stop's own timeout is shorter.
IDLE_EXIT_GRACE = 2.0
#: Consecutive workers that fail to start (the spawn raises, or the process dies before its
#: Ready event) before the orchestrator declares itself broken, e.g. because the interpreter
#: cannot start or import taskorch. Each failure delays the next spawn by RESPAWN_DELAY.
MAX_START_FAILURES = 3
RESPAWN_DELAY = 1.0
#: The longest single wait in select(): epoll takes its timeout in int milliseconds, which a
#: stop() deadline weeks away (Executor.shutdown(wait=True) has none) would overflow.
MAX_SELECT_WAIT = 3600.0

# Events that show a worker making progress (a Recalled answer does not).
_PROGRESS = frozenset({Started, Retrying, Succeeded, Failed, Ready})


class LocalDispatcher(DispatcherCore):
    thread_name = "taskorch-dispatcher"
    recalls_for_cancel = True  # a worker hands back the calls it has not started (RECALL)

    def __init__(
        self,
        backlog: Backlog,
        worker_count: int,
        default_policy_bytes: bytes,
        *,
        kill_grace: float,
        max_tasks_per_worker: int | None,
        max_memory_per_worker: float | None,
        circuit_breaker: CircuitBreaker | None,
    ) -> None:
        super().__init__(backlog, circuit_breaker)
        self._worker_count = worker_count
        self._default_policy_bytes = default_policy_bytes
        self._kill_grace = kill_grace
        self._max_tasks_per_worker = max_tasks_per_worker
        self._max_memory_per_worker = max_memory_per_worker
        # Wake pipe: written by producers and stop() (non-blocking; a full pipe already means
        # "wake up"), drained by the dispatcher after every select. `_wake_lock` orders the
        # writes against the close at the end: wake() may be called after the dispatcher is
        # done (a late stop(), a finalizer), and a write to a closed descriptor number would
        # land in whatever file reuses it (it once put a NUL into a subprocess's stdin).
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # Dispatcher thread only.
        self._workers: dict[int, WorkerProcess] = {}
        self._slots = itertools.count(1)
        self._respawn_at: float | None = None
        self._start_failures = 0

    # -- called from other threads -------------------------------------------------------------

    def effective_worker_count(self) -> int:
        return self._worker_count

    def wake(self) -> None:
        with self._wake_lock:
            if self._wake_closed:
                return  # the dispatcher is done
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # full: a wakeup is pending anyway

    def worker_views(self) -> list[WorkerView]:
        """The workers now (see the core's): read without a lock from another thread, as
        ``held_calls``; a worker's head call may be finishing while it is read."""
        views = []
        now = time.monotonic()
        for w in list(self._workers.values()):
            current = w.inflight[0] if w.inflight else None
            running = current is not None and current.started_on is w and current.attempt_started
            waiting = list(w.inflight)[1 if running else 0:]
            views.append(WorkerView(
                pid=w.pid, tasks_run=w.tasks_run, held=len(w.inflight),
                task_id=current.task_id if running and current else None,
                task_name=(current.name or None) if running and current else None,
                attempt=current.attempts if running and current else None,
                running_for=now - current.attempt_started if running and current else None,
                retiring=w.retiring is not None,
                waiting_since=waiting[0].accepted_at if waiting else None,
            ))
        return views

    def held_calls(self) -> dict[int, int]:
        """Calls handed over and not finished, per worker pid. A snapshot taken from another
        thread without a lock (each worker's count is read at once), for tests and status."""
        return {w.pid: len(w.inflight) for w in list(self._workers.values())}

    # -- starting and waiting ----------------------------------------------------------------

    def _open(self) -> None:
        for _ in range(self._worker_count):
            self._spawn()

    def _describe_start_failure(self, exc: BaseException) -> str:
        return f"could not start worker processes: {exc}"

    def _wait_and_handle(self, timeout: float | None) -> None:
        if timeout is not None and timeout > MAX_SELECT_WAIT:
            timeout = MAX_SELECT_WAIT  # (the loop just computes the rest again)
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._drain_wake_pipe()
                continue
            kind, worker = key.data
            if worker.slot not in self._workers:
                continue  # handled earlier in this round
            if kind == "exit":
                self._on_worker_exit(worker)
            else:
                events = worker.receive()
                if events:
                    self._handle_events(worker, events)
                if worker.eof:  # the exit fd follows
                    self._unregister(worker.conn)

    def _unregister(self, fileobj: Any) -> None:
        """Forget a worker's fd before it is closed. A stale registration would shadow the
        next worker's fd, which the kernel is free to give the same number."""
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- events from workers -------------------------------------------------------------

    def _handle_events(self, worker: WorkerProcess, events: list[Event]) -> None:
        worker.events_seen = True
        self._start_failures = 0
        now = time.monotonic()
        with self._backlog.locked():
            for event in events:
                if type(event) in _PROGRESS:
                    worker.last_progress = now
                if isinstance(event, Started):
                    item = _head(worker, event.task_id)
                    item.started_on = worker
                    self._started_locked(item, event.attempt, now)
                elif isinstance(event, Retrying):
                    self._retrying_locked(_head(worker, event.task_id), event.attempt,
                                          event.error, event.delay, event.timed_out)
                elif isinstance(event, (Succeeded, Failed)):
                    item = worker.inflight.popleft()
                    if item.task_id != event.task_id:
                        raise AssertionError(
                            f"worker {worker.pid} reported task {event.task_id}, expected {item!r}")
                    worker.inflight_bytes -= len(item.payload)
                    worker.tasks_run += 1
                    worker.record_duration(self._outcome_locked(item, event, now))
                elif isinstance(event, Retiring):
                    worker.retiring = event.reason
                elif isinstance(event, Recalled):
                    self._take_back_locked(worker, set(event.task_ids))
                    worker.recall_sent = False
                # Ready: events_seen, set above, is what matters
        if worker.retiring is not None:
            self._begin_retirement(worker, worker.retiring)
            if not worker.inflight:
                worker.send_shutdown()

    def _take_back_locked(self, worker: WorkerProcess, task_ids: set[int]) -> None:
        """Calls ``worker`` never started (it says) go back to the backlog, uncharged."""
        back = [item for item in worker.inflight if item.task_id in task_ids]
        if not back:
            return
        worker.inflight = deque(i for i in worker.inflight if i.task_id not in task_ids)
        worker.inflight_bytes -= sum(len(item.payload) for item in back)
        self._requeue_locked(back)

    def _on_worker_exit(self, worker: WorkerProcess) -> None:
        self._unregister(worker.exit_fd)
        self._unregister(worker.conn)
        events = worker.drain()
        if events:
            self._handle_events(worker, events)
        exitcode = worker.reap()
        worker.close()
        del self._workers[worker.slot]
        self.pids = tuple(w.pid for w in self._workers.values())
        backlog = self._backlog
        outcome = ""
        with backlog.locked():
            backlog.set_workers_locked(len(self._workers))
            items = list(worker.inflight)
            worker.inflight.clear()
            # Only the head can have started here; the rest never ran.
            crashed = items.pop(0) if items and items[0].started_on is worker else None
            self._requeue_locked(items)
            if crashed is not None:
                error = self._attempt_error(worker, crashed, exitcode)
                outcome = self._crash_locked(crashed, error)
        planned = worker.retiring is not None and exitcode == 0 and crashed is None
        if crashed is not None:
            log.warning("worker pid %d %s while running task %d (attempt %d of %d): %s",
                        worker.pid, _how(exitcode), crashed.task_id, crashed.attempts,
                        crashed.policy.max_attempts, outcome)
        elif not planned:
            # One still starting (no Ready yet: it held nothing) or ended while the pool stops
            # costs nothing: a signal sent to the parent's whole group (timeout(1), before the
            # worker left that group) is not worth a warning.
            quiet = not worker.events_seen or not items and self._finishing()
            log.log(logging.INFO if quiet else logging.WARNING,
                    "worker pid %d %s while running no task%s", worker.pid, _how(exitcode),
                    f" ({len(items)} calls it held go to other workers)" if items else "")
        # A worker that exits on its own before Ready could not start (an import error, say);
        # one killed by a signal then (an impatient operator, a chaos test) is just replaced.
        if not worker.events_seen and exitcode is not None and exitcode >= 0 and not planned:
            self._start_failures += 1
            log.error("worker pid %d died while starting (%d in a row)", worker.pid,
                      self._start_failures)
            self._check_broken()
            if self._backlog.broken is None:
                self._respawn_at = time.monotonic() + RESPAWN_DELAY
        cause = ("recycled" if planned else "start_failure" if not worker.events_seen
                 else "timeout" if crashed is not None and worker.kill_reason == "timeout"
                 else "crash" if crashed is not None else "died_idle")
        self._top_up(f"worker pid {worker.pid} {_how(exitcode)}", cause)

    def _attempt_error(
        self, worker: WorkerProcess, item: WorkItem, exitcode: int | None,
    ) -> BaseException:
        if worker.kill_reason is not None and worker.kill_item is item:
            return TaskTimeoutError(
                f"attempt {item.attempts} ran past its {item.policy.timeout:g} s timeout and did "
                f"not respond to the in-process interrupt (stuck in C code or blocking signals); "
                f"its worker (pid {worker.pid}) was terminated {self._kill_grace:g} s later"
            )
        return WorkerCrashedError(worker.pid, exitcode, item.attempts)

    # -- handing over ------------------------------------------------------------------------

    def _hand_over(self, now: float, admission: Admission) -> None:
        backlog = self._backlog
        # Idle workers first; list() because retiring one may spawn another.
        rooms = sorted(((w, w.room(now)) for w in list(self._workers.values())),
                       key=lambda wr: len(wr[0].inflight))
        takers = sum(room > 0 for _, room in rooms)
        with backlog.locked():
            # No worker takes more than its share of what waits: prefetch must not starve
            # a worker that is idle now.
            share = -(-backlog.ready_count_locked() // takers) if takers else 0
        for worker, room in rooms:
            room = min(room, share)
            if self._max_tasks_per_worker:  # never hand a worker more than its quota
                room = min(room, self._max_tasks_per_worker - worker.handed)
            if room <= 0:
                continue
            with backlog.locked():
                batch = self._take_locked(
                    admission, room, budget=PREFETCH_BYTES - worker.inflight_bytes,
                    first_may_exceed=not worker.inflight,  # an idle worker is reading
                )
                for item in batch:
                    item.worker = worker
            if batch:
                try:
                    worker.send_calls(batch, now)
                except OSError:
                    # It is dying: the calls count as handed over, and go back to the backlog
                    # uncharged when its exit is handled.
                    worker.inflight.extend(batch)
                    worker.channel_open = False
                if self._max_tasks_per_worker and worker.handed >= self._max_tasks_per_worker:
                    self._begin_retirement(worker, f"ran {worker.handed} tasks")

    def _has_room(self, now: float) -> bool:
        return any(w.room(now) > 0 for w in self._workers.values())

    def _has_inflight(self) -> bool:
        return any(w.inflight for w in self._workers.values())

    def _recall_unstarted(self, now: float) -> float | None:
        workers = self._workers.values()
        if not any(w.events_seen and not w.inflight and w.room(now) > 0 for w in workers):
            return None  # no worker that is up and idle
        again: float | None = None
        for worker in workers:
            if worker.recall_sent or worker.unstarted() == 0 or worker.kill_reason is not None:
                continue
            due = worker.last_progress + SLOW_AFTER
            if now >= due:
                log.debug("recalling %d calls from busy worker pid %d", worker.unstarted(),
                          worker.pid)
                worker.send_recall()
            elif again is None or due < again:
                again = due
        return again

    def _recall_calls(self, items: list[WorkItem]) -> list[WorkItem]:
        # One RECALL per worker holding any of them, even if one is unanswered: that one may
        # have been sent before these calls, and would not bring them back. The worker hands
        # back every call it has not started; those nobody cancels are handed out again.
        for worker in {id(item.worker): item.worker for item in items
                       if item.worker is not None}.values():
            worker.send_recall()
        return [item for item in items if item.worker is None]

    # -- worker life -----------------------------------------------------------------------

    def _spawn(self) -> WorkerProcess:
        slot = next(self._slots)
        worker = WorkerProcess.spawn(slot, self._default_policy_bytes, self._max_memory_per_worker)
        try:
            self._selector.register(worker.conn, selectors.EVENT_READ, ("conn", worker))
            self._selector.register(worker.exit_fd, selectors.EVENT_READ, ("exit", worker))
        except BaseException:
            self._unregister(worker.conn)
            worker.kill()
            worker.reap()
            worker.close()
            raise
        self._workers[slot] = worker
        self.pids = tuple(w.pid for w in self._workers.values())
        with self._backlog.locked():
            self._backlog.set_workers_locked(len(self._workers))
        log.debug("started worker %d (pid %d)", slot, worker.pid)
        return worker

    def _top_up(self, reason: str, cause: str = "other") -> None:
        """Start replacements until ``worker_count`` workers take calls (retiring ones do not)."""
        if self._respawn_at is not None or self._finishing() or self._backlog.broken:
            return  # a retry is scheduled / nothing left to run / given up
        while sum(w.retiring is None for w in self._workers.values()) < self._worker_count:
            try:
                self._spawn()
            except Exception as exc:
                log.error("could not start a replacement worker (%s): %s; retrying in %.1f s",
                          reason, exc, RESPAWN_DELAY)
                self._respawn_at = time.monotonic() + RESPAWN_DELAY
                self._start_failures += 1
                self._check_broken()
                return
            self._backlog.count_restarts(1, cause)

    def _finishing(self) -> bool:
        """stop() was called and nothing is left to run: no replacement is needed."""
        backlog = self._backlog
        with backlog.locked():
            return backlog.closed and not backlog.holds_tasks_locked() and not any(
                w.inflight for w in self._workers.values())

    def _begin_retirement(self, worker: WorkerProcess, reason: str) -> None:
        """Recycle ``worker``: no more calls for it; its replacement starts now, so queued work
        keeps flowing while it finishes what it holds (CPython gh-115634 hung here)."""
        if worker.replacement_started:
            return
        worker.retiring = reason
        worker.replacement_started = True
        log.info("recycling worker pid %d: %s", worker.pid, reason)
        self._top_up(f"recycling: {reason}", "recycled")
        if not worker.inflight:
            worker.send_shutdown()

    def _check_broken(self) -> None:
        """Too many starts failed in a row: nothing can run (the core then settles)."""
        if self._start_failures < MAX_START_FAILURES or self._backlog.broken is not None:
            return
        reason = (
            f"{self._start_failures} worker processes in a row failed to start; check that the "
            "interpreter can start and import taskorch (see the 'taskorch' log)"
        )
        log.error("orchestrator broken: %s", reason)
        self._backlog.mark_broken(reason)
        self._respawn_at = None

    # -- timers --------------------------------------------------------------------------

    def _backend_deadlines(self) -> Iterable[float | None]:
        yield self._respawn_at
        for worker in self._workers.values():
            yield worker.sigkill_at
            if worker.kill_reason is None:
                yield hard_deadline(worker, self._kill_grace)

    def _fire_backend_timers(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if worker.sigkill_at is not None and now >= worker.sigkill_at:
                log.warning("worker pid %d ignored SIGTERM; sending SIGKILL", worker.pid)
                worker.sigkill_at = None
                worker.kill()
            deadline = hard_deadline(worker, self._kill_grace)
            if deadline is not None and worker.kill_reason is None and now >= deadline:
                item = worker.inflight[0]
                log.warning(
                    "task %d: attempt %d still running %.3g s past its %.3g s timeout; "
                    "terminating worker pid %d", item.task_id, item.attempts, self._kill_grace,
                    item.policy.timeout, worker.pid,
                )
                worker.kill_reason = "timeout"
                worker.kill_item = item
                worker.sigkill_at = now + SIGKILL_AFTER
                worker.terminate()
                # Its other calls come back uncharged: now, through RECALL, if its reader
                # thread can still run, else when its exit is handled (at most SIGKILL_AFTER
                # from now). Not taken back here: a task that survives SIGTERM and returns
                # would let the worker start them, and they would run twice.
                if worker.unstarted() and not worker.recall_sent:
                    worker.send_recall()
        if self._respawn_at is not None and now >= self._respawn_at:
            self._respawn_at = None
            self._top_up("retrying a failed start", "start_failure")

    # -- stopping --------------------------------------------------------------------------

    def _shut_down(self, deadline: float | None) -> None:
        now = time.monotonic()
        deadline = max(deadline or now, now + IDLE_EXIT_GRACE)
        for worker in self._workers.values():
            worker.retiring = "shutdown"
            worker.send_shutdown()
        while self._workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait_and_handle(remaining)  # nothing runs: EOFs and exits come
        self._kill_everything()

    def _before_settle(self) -> None:
        """Kill every worker and read what they sent before dying: outcomes that arrived
        before the kill still count."""
        for worker in self._workers.values():
            worker.kill()
        for worker in list(self._workers.values()):
            events = worker.drain()
            if events:
                self._handle_events(worker, events)

    def _take_all_inflight_locked(self) -> list[tuple[WorkItem, str]]:
        held: list[tuple[WorkItem, str]] = []
        for worker in self._workers.values():
            held += [(item, "its worker was terminated") for item in worker.inflight]
            worker.inflight.clear()
        return held

    def _after_settle(self) -> None:
        self._kill_everything()

    def _kill_everything(self) -> None:
        for worker in list(self._workers.values()):
            self._unregister(worker.exit_fd)
            self._unregister(worker.conn)
            worker.kill()
            worker.reap()
            worker.close()
        self._workers.clear()
        self.pids = ()
        with self._backlog.locked():
            self._backlog.set_workers_locked(0)

    def _close(self) -> None:
        self._kill_everything()  # (none left, but after a failed start)
        self._selector.close()
        with self._wake_lock:
            if self._wake_closed:
                return
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _forget_channels_in_child(self) -> None:
        # The copies of the parent's fds, closed through their owners so that nothing closes
        # the same number again later (nor now, if the parent had closed them: a stopped
        # orchestrator). Closing a copy never reaches the parent's workers: their channels
        # stay open in the parent (a worker sees EOF only when every copy is closed), and
        # nothing is sent on them here.
        self._wake_lock = threading.Lock()
        if not self._wake_closed:
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._selector.close()
        for worker in self._workers.values():
            worker.forget_in_forked_child()
        self._workers.clear()
        self.pids = ()


def hard_deadline(worker: WorkerProcess, kill_grace: float) -> float | None:
    """When ``worker``'s running attempt is killed, if it still runs then: its policy's
    timeout plus ``kill_grace`` after its start ack; while an outcome is arriving, no sooner
    than ``kill_grace`` after its last bytes. None: no attempt to watch."""
    if not worker.inflight:
        return None
    item = worker.inflight[0]
    timeout = item.policy.timeout
    if timeout is None or item.started_on is not worker or not item.attempt_started:
        return None  # no timeout, not started here yet, or backing off between attempts
    deadline = item.attempt_started + timeout + kill_grace
    if worker.mid_frame():
        # An outcome is arriving (a large result takes several reads): no kill while its
        # bytes keep coming; a sender stalled for kill_grace is killed as before.
        deadline = max(deadline, worker.last_read + kill_grace)
    return deadline


def _head(worker: WorkerProcess, task_id: int) -> WorkItem:
    """The call ``worker`` runs now, which an event about ``task_id`` must be about."""
    head = worker.inflight[0]
    if head.task_id != task_id:
        raise AssertionError(f"worker {worker.pid} reported task {task_id}, expected {head!r}")
    return head


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "vanished"
    name = _signal_name(exitcode)
    return f"was killed by {name}" if name else f"exited with code {exitcode}"
