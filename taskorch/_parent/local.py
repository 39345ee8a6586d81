"""Parent process, the dispatcher thread: the local pool, worker processes on this machine.

The task life (start, retry, outcome, crash charge, breaker, stop) is the core's
(``dispatch.DispatcherCore``), which owns this pool (``pool.WorkerPool``); this module supplies
what is local, and hands back what came as ``pool`` events:

    dispatcher thread ("taskorch-dispatcher")                         worker i (``_worker.main``)
    -----------------------------------------                         --------
    hand_over: CALLS frame, private socketpair -----------------------> run attempts (tenacity)
    wait: selector.select(timeout)  <-------------- Started / Retrying / outcome frames
      wake pipe | each worker's channel | each worker's exit fd (pidfd) | the timeout
      -> AttemptStarted / AttemptRetrying / TaskFinished / CallsReturned (Recalled)
         events, for the core
    a death: its unstarted calls CallsReturned (uncharged), its running call AttemptLost
    the worker set (``local_workers.WorkerSet``): spawning, replacing at the next
      hand_over, recycling, hard timeouts (SIGTERM, SIGKILL)

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

Crash isolation: every worker has its own channel, so a death concerns one worker: the calls it
held but had not started go back uncharged, the one it was running is charged (the core's
``rules.TaskRules.returned_locked`` / ``lost_locked``), and a replacement starts at the next
hand-over, in the same round (then the core, having applied the loss, knows whether anything is
left).
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections import deque
from typing import Iterable, Iterator

from taskorch._parent.figures import WorkerView
from taskorch._parent.local_workers import WorkerSet
from taskorch._parent.pool import (
    AttemptRetrying,
    AttemptStarted,
    CallsReturned,
    PoolEvent,
    Take,
    TaskFinished,
)
from taskorch._parent.process import PREFETCH_BYTES, SLOW_AFTER, WorkerProcess
from taskorch._parent.task import WorkItem
from taskorch._parent.terminate import TerminateRequest
from taskorch._stats import Progress
from taskorch._wire import (
    Event,
    Failed,
    Ready,
    Recalled,
    Reported,
    Retiring,
    Retrying,
    Started,
    Succeeded,
)

log = logging.getLogger("taskorch")

#: After stop() with nothing left to run, idle workers get this long to exit on their own
#: before they are killed, even if stop's own timeout is shorter.
IDLE_EXIT_GRACE = 2.0
#: The longest single wait in select(): epoll takes its timeout in int milliseconds, which a
#: stop() deadline weeks away (Executor.shutdown(wait=True) has none) would overflow.
MAX_SELECT_WAIT = 3600.0

# Events that show a worker making progress (a Recalled answer does not).
_PROGRESS = frozenset({Started, Retrying, Succeeded, Failed, Ready})
_OUTCOMES = (Succeeded, Failed)
# The per-task pool events are built without the NamedTuple's Python-level __new__.
_new = tuple.__new__


class LocalPool:
    """Worker processes on this machine, each with a private channel (``pool.WorkerPool``)."""

    thread_name = "taskorch-dispatcher"
    recalls_for_cancel = True  # a worker hands back the calls it has not started (RECALL)
    terminates = True  # a worker runs one attempt at a time: killing it kills that one

    def __init__(
        self,
        worker_count: int,
        default_policy_bytes: bytes,
        *,
        kill_grace: float,
        max_tasks_per_worker: int | None,
        max_memory_per_worker: float | None,
    ) -> None:
        self._kill_grace = kill_grace
        self._max_tasks_per_worker = max_tasks_per_worker
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
        self._out: list[PoolEvent] = []  # events to hand back from the method running now
        self._set = WorkerSet(worker_count, default_policy_bytes, max_memory_per_worker,
                              self._selector, self._out)
        self._workers = self._set.by_slot  # (the same dict: read everywhere below)
        self._finishing = False  # as the core said at the last hand_over: nothing left to run

    @property
    def pids(self) -> tuple[int, ...]:
        """Worker processes (any thread)."""
        return self._set.pids

    # -- called from other threads -------------------------------------------------------------

    def effective_worker_count(self) -> int:
        return self._set.worker_count

    def wake(self) -> None:
        with self._wake_lock:
            if self._wake_closed:
                return  # the dispatcher is done
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # full: a wakeup is pending anyway

    def worker_views(self) -> list[WorkerView]:
        return self._set.views()

    def held_calls(self) -> dict[int, int]:
        """Calls handed over and not finished, per worker pid. A snapshot taken from another
        thread without a lock, for tests and status."""
        return self._set.held_calls()

    # -- starting and waiting ----------------------------------------------------------------

    def _handing_back(self) -> list[PoolEvent]:
        """The events collected by the method that ends now, for the core."""
        out = self._out[:]  # (the list stays: the worker set appends to it too)
        self._out.clear()
        return out

    def open(self) -> list[PoolEvent]:
        for _ in range(self._set.worker_count):
            self._set.spawn()
        return self._handing_back()

    def describe_start_failure(self, exc: BaseException) -> str:
        return f"could not start worker processes: {exc}"

    def wait(self, timeout: float | None) -> list[PoolEvent]:
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
                    self._read_events(worker, events)
                if worker.eof:  # the exit fd follows
                    self._set.unregister(worker.conn)
        return self._handing_back()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- events from workers -------------------------------------------------------------

    def _read_events(self, worker: WorkerProcess, events: list[Event]) -> None:
        """What ``worker`` sent: its own records here, the task's moments for the core."""
        worker.events_seen = True
        self._set.start_failures = 0
        now = time.monotonic()
        out = self._out.append
        # A first attempt's start is held back one event: when its outcome comes next, in
        # the same read (a short task), the core gets one TaskFinished, whose rule announces
        # the start itself (``TaskRules.finished_locked``), not two events (~1 us a task).
        starting: WorkItem | None = None
        for event in events:
            if type(event) in _PROGRESS:
                worker.last_progress = now
            if starting is not None:
                if not isinstance(event, _OUTCOMES) or event.task_id != starting.task_id:
                    out(_new(AttemptStarted, (starting, 1)))
                starting = None
            if type(event) is Started:  # (exactly a ``_wire`` event type: decode_events)
                item = _head(worker, event.task_id)
                item.started_on = worker
                if event.attempt == 1:
                    starting = item
                else:
                    out(_new(AttemptStarted, (item, event.attempt)))
            elif isinstance(event, _OUTCOMES):
                item = worker.inflight.popleft()
                if item.task_id != event.task_id:
                    raise AssertionError(
                        f"worker {worker.pid} reported task {event.task_id}, expected {item!r}")
                worker.inflight_bytes -= len(item.payload)
                worker.tasks_run += 1
                worker.record_duration(float(event.seconds) / max(1, int(event.attempts)))
                out(_new(TaskFinished, (item, event)))
            elif isinstance(event, Retrying):
                out(AttemptRetrying(_head(worker, event.task_id), event.attempt, event.error,
                                    event.delay, event.timed_out))
            elif isinstance(event, Retiring):
                worker.retiring = event.reason
            elif isinstance(event, Recalled):
                self._take_back(worker, set(event.task_ids))
                worker.recall_sent = False
            elif isinstance(event, Reported):  # the latest only, on the future (any reader)
                if worker.inflight and worker.inflight[0].task_id == event.task_id:
                    worker.inflight[0].future.latest_progress = Progress(*event[1:])
            # Ready: events_seen, set above, is what matters
        if starting is not None:
            out(_new(AttemptStarted, (starting, 1)))
        if worker.retiring is not None:
            self._set.begin_retirement(worker, worker.retiring)
            if not worker.inflight:
                worker.send_shutdown()

    def _take_back(self, worker: WorkerProcess, task_ids: set[int]) -> None:
        """Calls ``worker`` never started (it says) go back to the backlog, uncharged."""
        back = [item for item in worker.inflight if item.task_id in task_ids]
        if not back:
            return
        worker.inflight = deque(i for i in worker.inflight if i.task_id not in task_ids)
        worker.inflight_bytes -= sum(len(item.payload) for item in back)
        self._out.append(CallsReturned(back))

    def _on_worker_exit(self, worker: WorkerProcess) -> None:
        self._set.unregister(worker.exit_fd)
        self._set.unregister(worker.conn)
        events = worker.drain()
        if events:
            self._read_events(worker, events)
        self._set.exited(worker, self._kill_grace, self._finishing)

    # -- handing over ------------------------------------------------------------------------

    def hand_over(self, now: float, waiting: int, take: Take,
                  finishing: bool) -> list[PoolEvent]:
        self._finishing = finishing = finishing and not self.has_inflight()
        self._set.replace_due(now, finishing)
        # Idle workers first; list() because retiring one may spawn another.
        rooms = sorted(((w, w.room(now)) for w in list(self._workers.values())),
                       key=lambda wr: len(wr[0].inflight))
        takers = sum(room > 0 for _, room in rooms)
        # No worker takes more than its share of what waits: prefetch must not starve a worker
        # that is idle now.
        share = -(-waiting // takers) if takers else 0
        for worker, room in rooms:
            room = min(room, share)
            if self._max_tasks_per_worker:  # never hand a worker more than its quota
                room = min(room, self._max_tasks_per_worker - worker.handed)
            if room <= 0:
                continue
            idle = not worker.inflight  # it is reading: its first call starts at once
            batch = take(room, PREFETCH_BYTES - worker.inflight_bytes, idle, int(idle))
            if not batch:
                continue
            for item in batch:
                item.worker = worker
            try:
                worker.send_calls(batch, now)
            except OSError:
                # It is dying: the calls count as handed over, and go back to the backlog
                # uncharged when its exit is handled.
                worker.inflight.extend(batch)
                worker.channel_open = False
            if self._max_tasks_per_worker and worker.handed >= self._max_tasks_per_worker:
                self._set.begin_retirement(worker, f"ran {worker.handed} tasks")
        self._set.replace_due(now, finishing)  # (recycled just now)
        return self._handing_back()

    def has_room(self, now: float) -> bool:
        return any(w.room(now) > 0 for w in self._workers.values())

    def has_inflight(self) -> bool:
        return any(w.inflight for w in self._workers.values())

    def recall_unstarted(self, now: float) -> float | None:
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

    def recall_prefetched(self) -> None:
        for worker in self._workers.values():
            # (A lone unstarted call went to an idle worker: it starts at once, leave it.)
            if (len(worker.inflight) > 1 and worker.unstarted() and not worker.recall_sent
                    and worker.kill_reason is None):
                worker.send_recall()

    def recall(self, items: list[WorkItem]) -> list[WorkItem]:
        # One RECALL per worker holding any of them, even if one is unanswered: that one may
        # have been sent before these calls, and would not bring them back. The worker hands
        # back every call it has not started; those nobody cancels are handed out again.
        for worker in {id(item.worker): item.worker for item in items
                       if item.worker is not None}.values():
            worker.send_recall()
        return [item for item in items if item.worker is None]

    def terminate(self, request: TerminateRequest) -> None:
        item = request.item
        worker = next((w for w in self._workers.values() if w is item.started_on), None)
        if worker is not None and worker.inflight and worker.inflight[0] is item:
            self._set.kill_attempt(worker, item, "cancel", time.monotonic())
        request.answer(True)  # killed, or it ended meanwhile: the outcome tells

    # -- timers --------------------------------------------------------------------------

    def deadlines(self) -> Iterable[float | None]:
        return self._set.deadlines(self._kill_grace)

    def fire_timers(self, now: float) -> list[PoolEvent]:
        self._set.fire_timers(now, self._kill_grace)
        return []  # (the respawn timer fires in hand_over, which the core calls next)

    # -- stopping --------------------------------------------------------------------------

    def shut_down(self, deadline: float | None) -> Iterator[list[PoolEvent]]:
        now = time.monotonic()
        deadline = max(deadline or now, now + IDLE_EXIT_GRACE)
        for worker in self._workers.values():
            worker.retiring = "shutdown"
            worker.send_shutdown()
        while self._workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            yield self.wait(remaining)  # nothing runs: EOFs and exits come
        self._set.kill_everything()
        yield self._handing_back()

    def stop_all(self) -> tuple[list[PoolEvent], list[tuple[WorkItem, str]]]:
        """Kill every worker and read what they sent before dying (outcomes that arrived
        before the kill still count); every call they held is given back."""
        for worker in self._workers.values():
            worker.kill()
        for worker in list(self._workers.values()):
            events = worker.drain()
            if events:
                self._read_events(worker, events)
        held: list[tuple[WorkItem, str]] = []
        for worker in self._workers.values():
            held += [(item, "its worker was terminated") for item in worker.inflight]
            worker.inflight.clear()
        self._set.kill_everything()
        return self._handing_back(), held

    def close(self) -> list[PoolEvent]:
        self._set.kill_everything()  # (none left, but after a failed start)
        self._selector.close()
        with self._wake_lock:
            if not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
        return self._handing_back()

    def forget_in_forked_child(self) -> None:
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
        self._set.forget_in_forked_child()
        self._out.clear()


def _head(worker: WorkerProcess, task_id: int) -> WorkItem:
    """The call ``worker`` runs now, which an event about ``task_id`` must be about."""
    head = worker.inflight[0]
    if head.task_id != task_id:
        raise AssertionError(f"worker {worker.pid} reported task {task_id}, expected {head!r}")
    return head
