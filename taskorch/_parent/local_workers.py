"""Parent process, the dispatcher thread: the local pool's worker processes as a set
(``WorkerSet``): starting them, replacing the ones that end, recycling, and giving up when
none can start.

``local.LocalPool`` reads what the workers send and hands calls over; this module keeps
``worker_count`` of them taking calls. A worker that ends is replaced at the pool's next
hand-over (``replace_due``), in the same round of the dispatcher's loop, once the core has
applied what its end meant (the calls it held, the attempt it lost): then "is anything left
to run" (``finishing``) is known, and no replacement starts for a pool that is stopping.

Only the dispatcher thread spawns, kills and reaps workers (``PR_SET_PDEATHSIG`` in the workers
is tied to the spawning thread, which outlives them all). ``pids`` and the workers' records are
read by other threads without a lock (``views``, ``held_calls``): snapshots.
"""

from __future__ import annotations

import itertools
import logging
import selectors
import time
from typing import Any, Iterable

from taskorch._errors import TaskTimeoutError, WorkerCrashedError, signal_name
from taskorch._parent.figures import WorkerView
from taskorch._parent.pool import (
    AttemptLost,
    CallsReturned,
    PoolBroken,
    PoolEvent,
    WorkersChanged,
    WorkersRestarted,
)
from taskorch._parent.process import WorkerProcess
from taskorch._parent.task import WorkItem
from taskorch._parent.terminate import Terminated

log = logging.getLogger("taskorch")

#: Consecutive workers that fail to start (the spawn raises, or the process dies before its
#: READY event) before the orchestrator declares itself broken, e.g. because the interpreter
#: cannot start or import taskorch. Each failure delays the next spawn by RESPAWN_DELAY.
MAX_START_FAILURES = 3
RESPAWN_DELAY = 1.0
#: A worker that ignores SIGTERM after a hard timeout gets SIGKILL this much later.
SIGKILL_AFTER = 0.5


class WorkerSet:
    """The worker processes of one local pool (dispatcher thread only, except ``pids``,
    ``views`` and ``held_calls``)."""

    def __init__(self, worker_count: int, default_policy_bytes: bytes,
                 max_memory_per_worker: float | None, selector: selectors.BaseSelector,
                 out: list[PoolEvent]) -> None:
        self.worker_count = worker_count
        self._default_policy_bytes = default_policy_bytes
        self._max_memory_per_worker = max_memory_per_worker
        self._selector = selector  # the pool's: each worker's channel and exit fd
        self._out = out  # the pool's events for the core (WorkersChanged, ..., PoolBroken)
        self.by_slot: dict[int, WorkerProcess] = {}
        self.pids: tuple[int, ...] = ()  # read by any thread (swapped whole)
        self._slots = itertools.count(1)
        self.respawn_at: float | None = None  # the next spawn after a failed start
        self.start_failures = 0  # in a row
        self.broken = False  # too many starts failed (a PoolBroken event was handed back)
        # Replacements to start at the next hand_over: (why, cause for metrics) each.
        self._replace: list[tuple[str, str]] = []

    # -- any thread (snapshots) ------------------------------------------------------------------

    def views(self) -> list[WorkerView]:
        """The workers now, read without a lock; a worker's head call may be finishing."""
        views = []
        now = time.monotonic()
        for w in list(self.by_slot.values()):
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
        """Calls handed over and not finished, per worker pid (each count read at once)."""
        return {w.pid: len(w.inflight) for w in list(self.by_slot.values())}

    # -- starting and replacing -------------------------------------------------------------

    def spawn(self) -> WorkerProcess:
        slot = next(self._slots)
        worker = WorkerProcess.spawn(slot, self._default_policy_bytes, self._max_memory_per_worker)
        try:
            self._selector.register(worker.conn, selectors.EVENT_READ, ("conn", worker))
            self._selector.register(worker.exit_fd, selectors.EVENT_READ, ("exit", worker))
        except BaseException:
            self.unregister(worker.conn)
            worker.kill()
            worker.reap()
            worker.close()
            raise
        self.by_slot[slot] = worker
        self.pids = tuple(w.pid for w in self.by_slot.values())
        self._out.append(WorkersChanged(len(self.by_slot)))
        log.debug("started worker %d (pid %d)", slot, worker.pid)
        return worker

    def unregister(self, fileobj: Any) -> None:
        """Forget a worker's fd before it is closed. A stale registration would shadow the
        next worker's fd, which the kernel is free to give the same number."""
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def replace_due(self, now: float, finishing: bool) -> None:
        """Start the replacements asked for since the last call (and a respawn that is due),
        unless ``finishing``: nothing is left to run. The requests are consumed either way:
        one top-up fills the pool back to ``worker_count``, whatever the number of requests,
        and while a respawn is pending (``respawn_at``) they wait for it, their restarts then
        counted under its cause ("start_failure")."""
        if self.respawn_at is not None and now >= self.respawn_at:
            self.respawn_at = None
            self._replace.append(("retrying a failed start", "start_failure"))
        replace, self._replace = self._replace, []
        for reason, cause in replace:
            self._top_up(reason, cause, finishing)

    def _top_up(self, reason: str, cause: str, finishing: bool) -> None:
        """Start replacements until ``worker_count`` workers take calls (retiring ones do not)."""
        if self.respawn_at is not None or finishing or self.broken:
            return  # a retry is scheduled / nothing left to run / given up
        while sum(w.retiring is None for w in self.by_slot.values()) < self.worker_count:
            try:
                self.spawn()
            except Exception as exc:
                log.error("could not start a replacement worker (%s): %s; retrying in %.1f s",
                          reason, exc, RESPAWN_DELAY)
                self.respawn_at = time.monotonic() + RESPAWN_DELAY
                self.start_failures += 1
                self._check_broken()
                return
            self._out.append(WorkersRestarted(1, cause))

    def begin_retirement(self, worker: WorkerProcess, reason: str) -> None:
        """Recycle ``worker``: no more calls for it; its replacement starts at the next
        hand-over (this round), so queued work keeps flowing while it finishes what it holds
        (CPython gh-115634 hung here)."""
        if worker.replacement_started:
            return
        worker.retiring = reason
        worker.replacement_started = True
        log.info("recycling worker pid %d: %s", worker.pid, reason)
        self._replace.append((f"recycling: {reason}", "recycled"))
        if not worker.inflight:
            worker.send_shutdown()

    def _check_broken(self) -> None:
        """Too many starts failed in a row: nothing can run (the core then settles)."""
        if self.start_failures < MAX_START_FAILURES or self.broken:
            return
        reason = (
            f"{self.start_failures} worker processes in a row failed to start; check that the "
            "interpreter can start and import taskorch (see the 'taskorch' log)"
        )
        log.error("orchestrator broken: %s", reason)
        self.broken = True
        self._out.append(PoolBroken(reason))
        self.respawn_at = None

    # -- ending -----------------------------------------------------------------------------

    def exited(self, worker: WorkerProcess, kill_grace: float, finishing: bool) -> None:
        """``worker``'s process ended (what it sent before is read): reap it; the calls it
        held and never started are ``CallsReturned``, the one it ran is ``AttemptLost``; then
        ``ended``.
        ``finishing``: as the core said at the last hand-over (a quiet log line then)."""
        exitcode = worker.reap()
        worker.close()
        items = list(worker.inflight)
        worker.inflight.clear()
        # Only the head can have started here; the rest never ran.
        crashed = items.pop(0) if items and items[0].started_on is worker else None
        if items:
            self._out.append(CallsReturned(items))
        planned = worker.retiring is not None and exitcode == 0 and crashed is None
        if crashed is not None:
            error = _attempt_error(worker, crashed, exitcode, kill_grace)
            self._out.append(AttemptLost(crashed, error, (
                f"worker pid {worker.pid} {how(exitcode)} while running task "
                f"{crashed.task_id} (attempt {crashed.attempts} of "
                f"{crashed.policy.max_attempts}): ")))
        elif not planned:
            # One still starting (no READY yet: it held nothing) or ended while the pool stops
            # costs nothing: a signal sent to the parent's whole group (timeout(1), before the
            # worker left that group) is not worth a warning.
            quiet = not worker.events_seen or not items and finishing and not any(
                w.inflight for w in self.by_slot.values() if w is not worker)
            log.log(logging.INFO if quiet else logging.WARNING,
                    "worker pid %d %s while running no task%s", worker.pid, how(exitcode),
                    f" ({len(items)} calls it held go to other workers)" if items else "")
        self.ended(worker, exitcode, crashed is not None, planned)

    def ended(self, worker: WorkerProcess, exitcode: int | None, crashed: bool,
              planned: bool) -> None:
        """``worker`` (reaped) is gone: forget it, count a failed start, and ask for its
        replacement (``crashed``: an attempt was lost with it; ``planned``: recycled)."""
        del self.by_slot[worker.slot]
        self.pids = tuple(w.pid for w in self.by_slot.values())
        self._out.append(WorkersChanged(len(self.by_slot)))
        # A worker that exits on its own before READY could not start (an import error, say);
        # one killed by a signal then (an impatient operator, a chaos test) is just replaced.
        if not worker.events_seen and exitcode is not None and exitcode >= 0 and not planned:
            self.start_failures += 1
            log.error("worker pid %d died while starting (%d in a row)", worker.pid,
                      self.start_failures)
            self._check_broken()
            if not self.broken:
                self.respawn_at = time.monotonic() + RESPAWN_DELAY
        cause = ("recycled" if planned else "start_failure" if not worker.events_seen
                 else "timeout" if crashed and worker.kill_reason == "timeout"
                 else "crash" if crashed else "died_idle")
        self._replace.append((f"worker pid {worker.pid} {how(exitcode)}", cause))

    # -- hard timeouts ------------------------------------------------------------------------

    def deadlines(self, kill_grace: float) -> Iterable[float | None]:
        """The respawn, SIGKILL escalations and hard timeouts to come."""
        yield self.respawn_at
        for worker in self.by_slot.values():
            yield worker.sigkill_at
            if worker.kill_reason is None:
                yield hard_deadline(worker, kill_grace)

    def fire_timers(self, now: float, kill_grace: float) -> None:
        """SIGKILL a worker that ignored SIGTERM; SIGTERM one whose attempt ran ``kill_grace``
        past its timeout (its exit, handled later, charges the attempt)."""
        for worker in list(self.by_slot.values()):
            if worker.sigkill_at is not None and now >= worker.sigkill_at:
                log.warning("worker pid %d ignored SIGTERM; sending SIGKILL", worker.pid)
                worker.sigkill_at = None
                worker.kill()
            deadline = hard_deadline(worker, kill_grace)
            if deadline is not None and worker.kill_reason is None and now >= deadline:
                item = worker.inflight[0]
                log.warning(
                    "task %d: attempt %d still running %.3g s past its %.3g s timeout; "
                    "terminating worker pid %d", item.task_id, item.attempts, kill_grace,
                    item.policy.timeout, worker.pid,
                )
                self.kill_attempt(worker, item, "timeout", now)

    def kill_attempt(self, worker: WorkerProcess, item: WorkItem, reason: str,
                     now: float) -> None:
        """SIGTERM ``worker``, which runs ``item``'s attempt (``reason``: "timeout", or
        "cancel" for ``cancel(terminate=True)``), and SIGKILL it after SIGKILL_AFTER."""
        if worker.kill_reason is not None:
            return  # already being killed
        worker.kill_reason = reason
        worker.kill_item = item
        worker.sigkill_at = now + SIGKILL_AFTER
        worker.terminate()
        # Its other calls come back uncharged: now, through RECALL, if its reader thread can
        # still run, else when its exit is handled (at most SIGKILL_AFTER from now). Not taken
        # back here: a task that survives SIGTERM and returns would let the worker start them,
        # and they would run twice.
        if worker.unstarted() and not worker.recall_sent:
            worker.send_recall()

    def kill_everything(self) -> None:
        self._replace.clear()  # (nothing is left to run)
        for worker in list(self.by_slot.values()):
            self.unregister(worker.exit_fd)
            self.unregister(worker.conn)
            worker.kill()
            worker.reap()
            worker.close()
        self.by_slot.clear()
        self.pids = ()
        self._out.append(WorkersChanged(0))

    def forget_in_forked_child(self) -> None:
        for worker in self.by_slot.values():
            worker.forget_in_forked_child()
        self.by_slot.clear()
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


def _attempt_error(worker: WorkerProcess, item: WorkItem, exitcode: int | None,
                   kill_grace: float) -> BaseException:
    """What the attempt of ``item`` lost with ``worker`` fails with."""
    if worker.kill_reason == "cancel" and worker.kill_item is item:
        return Terminated(f"task {item.task_id} was cancelled while it ran (attempt "
                          f"{item.attempts}): its worker (pid {worker.pid}) was terminated")
    if worker.kill_reason is not None and worker.kill_item is item:
        return TaskTimeoutError(
            f"attempt {item.attempts} ran past its {item.policy.timeout:g} s timeout and did "
            f"not respond to the in-process interrupt (stuck in C code or blocking signals); "
            f"its worker (pid {worker.pid}) was terminated {kill_grace:g} s later"
        )
    return WorkerCrashedError(worker.pid, exitcode, item.attempts)


def how(exitcode: int | None) -> str:
    """How a worker ended, for a log line."""
    if exitcode is None:
        return "vanished"
    name = signal_name(exitcode)
    return f"was killed by {name}" if name else f"exited with code {exitcode}"
