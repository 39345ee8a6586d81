"""Parent process, the dispatcher thread: hands tasks to workers, reads their acks, supervises.

Data flow:

    run()/run_async()            dispatcher thread ("taskorch-dispatcher")        worker i
    -----------------            -----------------------------------------        --------
    cloudpickle the call
    Backlog.offer() --pending--> take()  -- CALLS frame, private socketpair ----> run attempts
    (wake pipe if asleep)        <------- STARTED / RETRYING / outcome frames ---- (tenacity)
                                 update Backlog counts, resolve Futures
                                 watch pidfds: a death re-queues or retries
                                 timers: hard timeouts, retry backoff, stop deadline

The actors:

- Producers only touch the ``Backlog`` (one lock, one deque append) and write one byte to the
  wake pipe when the dispatcher is not already due to look at the backlog.
- The dispatcher is the only thread that talks to workers, spawns them (``PR_SET_PDEATHSIG``
  in the workers is tied to the spawning thread, so this thread outlives every worker) and
  kills them. It blocks in one place, ``selector.select(timeout)``, whose wakeup sources are:
  the wake pipe (new tasks, stop()), each worker's channel (events), each worker's exit fd
  (death), and the timeout (the nearest hard-timeout deadline, SIGKILL escalation, retry
  backoff, respawn retry, or stop deadline). There is no fixed polling tick.
- Workers run calls in the order handed over. A worker holds its running call plus a
  prefetch sized from its recent task durations (``_parent_worker.PREFETCH_*``), so tiny
  tasks stream without a round trip each while a slow task never holds many others back.

Crash isolation: every worker has its own channel, so a death concerns one worker. The calls
it held but had not started go back to the front of the backlog with no attempt charged (they
never ran); the call it was running is charged one attempt and retried after the policy's
backoff while the budget lasts, else fails with ``WorkerCrashedError``. A replacement worker
is started at once. A call that started may have had side effects: after a crash a task runs
at least once, not exactly once.

The thread is a daemon (a stuck stop must never keep the interpreter alive; the atexit hook
stops every orchestrator first). Its body is guarded: if it ever fails, it kills the workers,
fails every unresolved future with ``OrchestratorBrokenError`` and logs the error.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import threading
import time
from typing import Any

from taskorch._errors import (
    OrchestratorBrokenError,
    TaskAbandonedError,
    TaskTimeoutError,
    WorkerCrashedError,
    _signal_name,
)
from taskorch._parent.backend import seconds_until_first
from taskorch._parent.backlog import Backlog, BackoffQueue
from taskorch._parent.breaker import Breaker, reject_beyond
from taskorch._parent.task import Resolution, TaskState, WorkItem, resolve_all
from taskorch._parent.process import PREFETCH_BYTES, SLOW_AFTER, WorkerProcess
from taskorch._policy import BreakerMode, CircuitBreaker, Policy
from taskorch._wire import (
    FAILED,
    READY,
    RECALLED,
    RETIRING,
    RETRYING,
    STARTED,
    SUCCEEDED,
    Event,
)

log = logging.getLogger("taskorch")

#: A worker that ignores SIGTERM after a hard timeout gets SIGKILL this much later.
SIGKILL_AFTER = 0.5
#: After stop() with nothing left to run, idle workers get this long to exit on their own
#: before they are killed, even if stop's own timeout is shorter.
IDLE_EXIT_GRACE = 2.0
#: Consecutive workers that fail to start (the spawn raises, or the process dies before its
#: READY event) before the orchestrator declares itself broken, e.g. because the interpreter
#: cannot start or import taskorch. Each failure delays the next spawn by RESPAWN_DELAY.
MAX_START_FAILURES = 3
RESPAWN_DELAY = 1.0

_TIMEOUT_TYPE = f"{TaskTimeoutError.__module__}.{TaskTimeoutError.__qualname__}"

# Events that show a worker making progress (a RECALLED answer does not).
_PROGRESS = frozenset({STARTED, RETRYING, SUCCEEDED, FAILED, READY})



class Dispatcher:
    def __init__(
        self,
        backlog: Backlog,
        worker_count: int,
        default_policy: Policy,
        default_policy_bytes: bytes,
        *,
        kill_grace: float,
        max_tasks_per_worker: int | None,
        max_memory_per_worker: float | None,
        circuit_breaker: CircuitBreaker | None,
    ) -> None:
        self._backlog = backlog
        self._worker_count = worker_count
        self._default_policy_bytes = default_policy_bytes
        self._kill_grace = kill_grace
        self._max_tasks_per_worker = max_tasks_per_worker
        self._max_memory_per_worker = max_memory_per_worker
        self._breaker = Breaker(circuit_breaker) if circuit_breaker is not None else None
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
        # Dispatcher thread only, except `pids` (a tuple swapped atomically, read by anyone).
        self._workers: dict[int, WorkerProcess] = {}
        self._slots = itertools.count(1)
        self._delayed = BackoffQueue()  # crash retries waiting out their backoff
        self._respawn_at: float | None = None
        self._rebalance_at: float | None = None  # when to look again for calls to recall
        self._start_failures = 0
        self.pids: tuple[int, ...] = ()
        self.drained: bool | None = None  # set when the thread ends
        self.finished = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run_guarded, name="taskorch-dispatcher", daemon=True)

    # -- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; it spawns the workers. Raises if any of them could not be started
        (the interpreter cannot be spawned: nothing would work)."""
        self.thread.start()
        self._started.wait()
        if self._start_error is not None:
            self.finished.wait()
            raise OrchestratorBrokenError(
                f"could not start worker processes: {self._start_error}"
            ) from self._start_error

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

    # -- the thread ------------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            try:
                for _ in range(self._worker_count):
                    self._spawn()
            except BaseException as exc:
                self._start_error = exc
                self._backlog.mark_broken(f"could not start worker processes: {exc}")
                self._kill_everything()
                return
            finally:
                self._started.set()
            self._run()
        except BaseException as exc:
            log.critical("taskorch dispatcher failed; failing every unresolved task", exc_info=True)
            self._backlog.mark_broken(f"the dispatcher thread failed: {exc!r}")
            self._settle_and_kill(OrchestratorBrokenError(
                f"the orchestrator's dispatcher thread failed ({exc!r}); see the 'taskorch' log"
            ))
        finally:
            self._close_channels()
            if self.drained is None:
                self.drained = False
            self.finished.set()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select(self._next_timeout()):
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
            now = time.monotonic()
            self._fire_timers(now)
            self._dispatch()
            if self._finish_if_done(now):
                return

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
        resolutions: list[Resolution] = []
        retries: list[tuple[WorkItem, Event]] = []
        now = time.monotonic()
        backlog = self._backlog
        with backlog.lock:
            for event in events:
                tag = event[0]
                if tag in _PROGRESS:
                    worker.last_progress = now
                if tag == STARTED:
                    item = self._inflight_item(worker, event[1])
                    item.attempts = item.future.attempts = event[2]
                    item.attempt_started = now
                    item.started_on = worker
                    backlog.start_locked(item)
                elif tag == RETRYING:
                    item = self._inflight_item(worker, event[1])
                    item.attempt_started = 0.0  # backing off: no attempt runs
                    backlog.retried += 1
                    if event[5]:
                        backlog.timeouts += 1
                    retries.append((item, event))
                elif tag == SUCCEEDED or tag == FAILED:
                    item = worker.inflight.popleft()
                    if item.task_id != event[1]:
                        raise AssertionError(f"worker {worker.pid} reported task {event[1]}, expected {item!r}")
                    worker.inflight_bytes -= len(item.payload)
                    item.attempts = item.future.attempts = event[2]
                    item.future.seconds = event[3]
                    worker.record_duration(event[3] / max(1, event[2]))
                    if self._breaker is not None:
                        self._breaker.record(item.task_id, tag == FAILED, now)
                    if tag == SUCCEEDED:
                        backlog.finish_locked(item, TaskState.SUCCEEDED)
                        resolutions.append((item, "result", event[4]))
                    else:
                        if event[5] == _TIMEOUT_TYPE:
                            backlog.timeouts += 1
                        backlog.finish_locked(item, TaskState.FAILED)
                        resolutions.append((item, "error", event[4:]))
                elif tag == RETIRING:
                    worker.retiring = event[1]
                elif tag == RECALLED:
                    self._take_back_locked(worker, set(event[1]))
                    worker.recall_sent = False
                elif tag == READY:
                    pass  # events_seen, set above, is what matters
        for item, event in retries:
            log.info("task %d: attempt %d failed (%s); retrying in %.3f s",
                     item.task_id, event[2], event[3], event[4])
        if worker.retiring is not None:
            self._begin_retirement(worker, worker.retiring)
            if not worker.inflight:
                worker.send_shutdown()
        self._resolve(resolutions)

    @staticmethod
    def _inflight_item(worker: WorkerProcess, task_id: int) -> WorkItem:
        head = worker.inflight[0]
        if head.task_id != task_id:
            raise AssertionError(f"worker {worker.pid} started task {task_id}, expected {head!r}")
        return head

    def _resolve(self, resolutions: list[Resolution]) -> None:
        resolve_all(resolutions)

    # -- dispatching -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._dispatch_round():
            pass

    def _dispatch_round(self) -> bool:
        """Hand waiting tasks to workers with room. True: tasks arrived meanwhile that a
        worker could take, so go round again (their producers saw `dispatcher_will_look` set
        and wrote no wakeup)."""
        backlog = self._backlog
        # New tasks the circuit breaker lets start now (None: no limit). Crash retries of
        # tasks that already started are not counted against it.
        admit = self._breaker.admit(time.monotonic()) if self._breaker is not None else None
        if admit is not None and self._breaker is not None and self._breaker.config.mode is BreakerMode.FAIL:
            self._reject_beyond(admit)
        now = time.monotonic()
        # Idle workers first; list() because retiring one may spawn another.
        rooms = sorted(((w, w.room(now)) for w in list(self._workers.values())),
                       key=lambda wr: len(wr[0].inflight))
        takers = sum(room > 0 for _, room in rooms)
        with backlog.lock:
            # No worker takes more than its share of what waits: prefetch must not starve
            # a worker that is idle now.
            share = -(-len(backlog.pending) // takers) if takers else 0
            submitted_before = backlog.submitted
        for worker, room in rooms:
            room = min(room, share)
            if self._max_tasks_per_worker:  # never hand a worker more than its quota
                room = min(room, self._max_tasks_per_worker - worker.handed)
            if room <= 0:
                continue
            batch: list[WorkItem] = []
            size = worker.inflight_bytes
            probes: list[int] = []
            with backlog.lock:
                pending = backlog.pending
                while pending and len(batch) < room:
                    item = pending[0]
                    if (batch or worker.inflight) and size + len(item.payload) > PREFETCH_BYTES:
                        break  # only an idle worker takes a large call (see _parent_worker)
                    if item.state is TaskState.QUEUED and admit is not None:
                        if len(probes) >= admit:
                            break  # held back by the circuit breaker (HOLD mode)
                        probes.append(item.task_id)
                    pending.popleft()
                    item.worker = worker
                    size += len(item.payload)
                    batch.append(item)
            if admit is not None and self._breaker is not None:
                admit -= len(probes)
                self._breaker.admitted(probes)
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
        with backlog.lock:
            # Will something other than a producer's wakeup bring us back to `pending`?
            # Yes if it is non-empty: capacity only frees through events we will read (or,
            # with the circuit open in HOLD mode, through the breaker's timer).
            waiting = bool(backlog.pending)
            backlog.dispatcher_will_look = waiting
            arrived = backlog.submitted != submitted_before
            if self._breaker is not None:
                backlog.breaker_state = self._breaker.state.value
        if waiting and arrived and any(w.room(now) > 0 for w in self._workers.values()):
            return True
        self._rebalance_at = None if waiting else self._recall_for_idle_workers(now)
        return False

    def _recall_for_idle_workers(self, now: float) -> float | None:
        """Nothing waits in the backlog, yet a worker idles while another holds calls it has
        not started behind a long task: recall them, so the idle worker can take them. Returns
        when to look again (a holder that is not yet SLOW_AFTER late)."""
        workers = self._workers.values()
        if not any(w.events_seen and not w.inflight and w.room(now) > 0 for w in workers):
            return None  # no worker that is up and idle
        again: float | None = None
        for worker in workers:
            if worker.recall_sent or worker.unstarted() == 0 or worker.kill_reason is not None:
                continue
            due = worker.last_progress + SLOW_AFTER
            if now >= due:
                log.debug("recalling %d calls from busy worker pid %d", worker.unstarted(), worker.pid)
                worker.send_recall()
            elif again is None or due < again:
                again = due
        return again

    def _take_back_locked(self, worker: WorkerProcess, task_ids: set[int]) -> None:
        """Calls ``worker`` never started go back to the front of the backlog, in order."""
        back = [item for item in worker.inflight if item.task_id in task_ids]
        if not back:
            return
        worker.inflight = type(worker.inflight)(i for i in worker.inflight if i.task_id not in task_ids)
        for item in reversed(back):
            worker.inflight_bytes -= len(item.payload)
            item.worker = item.started_on = None
            self._backlog.pending.appendleft(item)
            if self._breaker is not None:
                self._breaker.release(item.task_id)
        self._backlog.dispatcher_will_look = True

    def _reject_beyond(self, admit: int) -> None:
        """FAIL mode, circuit not closed: new tasks beyond the probes fail without running."""
        assert self._breaker is not None
        self._resolve(reject_beyond(self._backlog, self._breaker, admit))

    # -- worker life -----------------------------------------------------------------------

    def _spawn(self) -> WorkerProcess:
        slot = next(self._slots)
        worker = WorkerProcess.spawn(
            slot, self._default_policy_bytes, self._max_memory_per_worker
        )
        try:
            self._selector.register(worker.conn, selectors.EVENT_READ, ("conn", worker))
            self._selector.register(worker.exit_fd, selectors.EVENT_READ, ("exit", worker))
        except BaseException:
            self._unregister(worker.conn)
            worker.kill()
            worker.close()
            raise
        self._workers[slot] = worker
        self.pids = tuple(w.pid for w in self._workers.values())
        with self._backlog.lock:
            self._backlog.workers = len(self._workers)
        log.debug("started worker %d (pid %d)", slot, worker.pid)
        return worker

    def _top_up(self, reason: str) -> None:
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
            with self._backlog.lock:
                self._backlog.worker_restarts += 1

    def _begin_retirement(self, worker: WorkerProcess, reason: str) -> None:
        """Recycle ``worker``: no more calls for it; its replacement starts now, so queued work
        keeps flowing while it finishes what it holds (CPython gh-115634 hung here)."""
        if worker.replacement_started:
            return
        worker.retiring = reason
        worker.replacement_started = True
        log.info("recycling worker pid %d: %s", worker.pid, reason)
        self._top_up(f"recycling: {reason}")
        if not worker.inflight:
            worker.send_shutdown()

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

        resolutions: list[Resolution] = []
        backlog = self._backlog
        with backlog.lock:
            backlog.workers = len(self._workers)
            items = list(worker.inflight)
            worker.inflight.clear()
            # Only the head can have started here; the rest never ran: back to the front of
            # the backlog, in order, with no attempt charged.
            crashed = items.pop(0) if items and items[0].started_on is worker else None
            for item in reversed(items):
                item.worker = None
                backlog.pending.appendleft(item)
                if self._breaker is not None:
                    self._breaker.release(item.task_id)
            if crashed is not None:
                crashed.worker = crashed.started_on = None
                crashed.attempt_started = 0.0
                backlog.crashes += 1
                error = self._attempt_error(worker, crashed, exitcode)
                if isinstance(error, TaskTimeoutError):
                    backlog.timeouts += 1
                if self._retryable(crashed, error):
                    backlog.retried += 1
                    delay = crashed.policy.backoff_before(crashed.attempts + 1)
                    self._delayed.push(crashed, delay)
                else:
                    backlog.finish_locked(crashed, TaskState.FAILED)
                    resolutions.append((crashed, "exception", error))
                    if self._breaker is not None:
                        self._breaker.record(crashed.task_id, True, time.monotonic())
            if items:
                backlog.dispatcher_will_look = True

        planned = worker.retiring is not None and exitcode == 0 and crashed is None
        if crashed is not None:
            log.warning(
                "worker pid %d %s while running task %d (attempt %d of %d): %s",
                worker.pid, _how(exitcode), crashed.task_id, crashed.attempts,
                crashed.policy.max_attempts,
                "retrying" if crashed.state is TaskState.RUNNING else "task failed",
            )
        elif not planned:
            log.warning("worker pid %d %s while running no task%s", worker.pid, _how(exitcode),
                        f" ({len(items)} calls it held go to other workers)" if items else "")
        # A worker that exits on its own before READY could not start (an import error, say);
        # one killed by a signal then (an impatient operator, a chaos test) is just replaced.
        if not worker.events_seen and exitcode is not None and exitcode >= 0 and not planned:
            self._start_failures += 1
            log.error("worker pid %d died while starting (%d in a row)", worker.pid, self._start_failures)
            self._check_broken()
            if self._backlog.broken is None:
                self._respawn_at = time.monotonic() + RESPAWN_DELAY
        self._resolve(resolutions)
        self._top_up(f"worker pid {worker.pid} {_how(exitcode)}")
        self._check_broken()

    def _attempt_error(self, worker: WorkerProcess, item: WorkItem, exitcode: int | None) -> BaseException:
        if worker.kill_reason is not None and worker.kill_item is item:
            return TaskTimeoutError(
                f"attempt {item.attempts} ran past its {item.policy.timeout:g} s timeout and did "
                f"not respond to the in-process interrupt (stuck in C code or blocking signals); "
                f"its worker (pid {worker.pid}) was terminated {self._kill_grace:g} s later"
            )
        return WorkerCrashedError(worker.pid, exitcode, item.attempts)

    @staticmethod
    def _retryable(item: WorkItem, error: BaseException) -> bool:
        if item.attempts >= item.policy.max_attempts:
            return False
        return isinstance(error, WorkerCrashedError) or isinstance(error, item.policy.retry_on)

    def _check_broken(self) -> None:
        if self._start_failures < MAX_START_FAILURES or self._backlog.broken is not None:
            return
        reason = (
            f"{self._start_failures} worker processes in a row failed to start; check that the "
            "interpreter can start and import taskorch (see the 'taskorch' log)"
        )
        log.error("orchestrator broken: %s", reason)
        self._backlog.mark_broken(reason)
        self._respawn_at = None
        self._settle_and_kill(OrchestratorBrokenError(reason))

    def _finishing(self) -> bool:
        backlog = self._backlog
        with backlog.lock:
            return backlog.closed and not backlog.pending and not self._delayed and not any(
                w.inflight for w in self._workers.values()
            )

    # -- timers --------------------------------------------------------------------------

    def _next_timeout(self) -> float | None:
        deadlines = [
            self._delayed.next_due(), self._respawn_at, self._rebalance_at,
            self._breaker.next_change() if self._breaker is not None else None,
            self._backlog.stop_deadline,
        ]
        for worker in self._workers.values():
            deadlines.append(worker.sigkill_at)
            if worker.kill_reason is None:
                deadlines.append(self._hard_deadline(worker))
        return seconds_until_first(deadlines)

    def _hard_deadline(self, worker: WorkerProcess) -> float | None:
        if not worker.inflight:
            return None
        item = worker.inflight[0]
        timeout = item.policy.timeout
        if timeout is None or item.started_on is not worker or not item.attempt_started:
            return None  # no timeout, not started here yet, or backing off between attempts
        deadline = item.attempt_started + timeout + self._kill_grace
        if worker.mid_frame():
            # An outcome is arriving (a large result takes several reads): no kill while its
            # bytes keep coming; a sender stalled for kill_grace is killed as before.
            deadline = max(deadline, worker.last_read + self._kill_grace)
        return deadline

    def _fire_timers(self, now: float) -> None:
        for worker in list(self._workers.values()):
            if worker.sigkill_at is not None and now >= worker.sigkill_at:
                log.warning("worker pid %d ignored SIGTERM; sending SIGKILL", worker.pid)
                worker.sigkill_at = None
                worker.kill()
            deadline = self._hard_deadline(worker)
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
        self._delayed.release_due(now, self._backlog)
        if self._respawn_at is not None and now >= self._respawn_at:
            self._respawn_at = None
            self._top_up("retrying a failed start")

    # -- stopping --------------------------------------------------------------------------

    def _finish_if_done(self, now: float) -> bool:
        backlog = self._backlog
        if not backlog.closed and backlog.broken is None:
            return False
        if self._finishing() or (backlog.broken is not None and backlog.closed):
            deadline = max(backlog.stop_deadline or now, now + IDLE_EXIT_GRACE)
            self._shut_down_workers(deadline)
            self.drained = backlog.broken is None
            return True
        if backlog.stop_deadline is not None and now >= backlog.stop_deadline:
            self._settle_and_kill(None)  # stop()'s timeout expired: abandon
            self.drained = False
            return True
        return False

    def _shut_down_workers(self, deadline: float) -> None:
        for worker in self._workers.values():
            worker.retiring = "shutdown"
            worker.send_shutdown()
        while self._workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in self._selector.select(remaining):
                if key.data is not None and key.data[0] == "exit":
                    worker = key.data[1]
                    if worker.slot in self._workers:
                        self._on_worker_exit(worker)
                elif key.data is None:
                    self._drain_wake_pipe()
                elif key.data[1].slot in self._workers:
                    key.data[1].receive()  # nothing is running: only EOF can come
                    if key.data[1].eof:
                        self._unregister(key.data[1].conn)
        self._kill_everything()

    def _settle_and_kill(self, error: BaseException | None) -> None:
        """Kill every worker, read what they sent before dying, then settle every task that
        is still unresolved (see ``_fail_everything``)."""
        for worker in self._workers.values():
            worker.kill()
        for worker in list(self._workers.values()):
            events = worker.drain()  # outcomes that arrived before the kill still count
            if events:
                self._handle_events(worker, events)
        self._fail_everything(error)
        self._kill_everything()

    def _fail_everything(self, error: BaseException | None) -> None:
        """Settle every unresolved task: queued ones are cancelled, running ones abandoned
        (``error`` None) or failed with ``error``."""
        resolutions: list[Resolution] = []
        backlog = self._backlog
        with backlog.lock:
            items: list[WorkItem] = list(backlog.pending)
            backlog.pending.clear()
            items += self._delayed.take_all()
            for worker in self._workers.values():
                items += worker.inflight
                worker.inflight.clear()
            for item in items:
                if error is not None:
                    backlog.finish_locked(item, TaskState.FAILED)
                    resolutions.append((item, "exception", error))
                elif item.state is TaskState.RUNNING:
                    backlog.finish_locked(item, TaskState.ABANDONED)
                    where = ("its worker was terminated" if item.started_on is not None
                             else "it was waiting to retry after a crash")
                    resolutions.append((item, "exception", TaskAbandonedError(
                        f"stop()'s timeout expired while task {item.task_id} was running "
                        f"(attempt {item.attempts}); {where}"
                    )))
                else:
                    backlog.finish_locked(item, TaskState.CANCELLED)
                    resolutions.append((item, "cancel", None))
        self._resolve(resolutions)

    def _kill_everything(self) -> None:
        for worker in list(self._workers.values()):
            self._unregister(worker.exit_fd)
            self._unregister(worker.conn)
            worker.kill()
            worker.reap()
            worker.close()
        self._workers.clear()
        self.pids = ()
        with self._backlog.lock:
            self._backlog.workers = 0

    def _close_channels(self) -> None:
        self._selector.close()
        with self._wake_lock:
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "vanished"
    name = _signal_name(exitcode)
    return f"was killed by {name}" if name else f"exited with code {exitcode}"
