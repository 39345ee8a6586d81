"""Parent process, the Dask dispatcher thread: the Dask backend behind the dispatcher core.

The task life (start, retry, outcome, crash charge, breaker, stop) is the core's
(``dispatch.DispatcherCore``); this module supplies how tasks reach a Dask cluster and what
comes back, in the same event vocabulary as local workers (``_wire``, ``_worker.dask``).

Data flow:

    run()/run_async()       "taskorch-dask-dispatcher"                    Dask cluster
    -----------------       --------------------------                    ------------
    cloudpickle the call
    Backlog.offer() -----> take from `pending`, pin each call to one
    (inbox.put(WAKE)        worker with room: Client.map(run_call,
     if it is asleep)       key=unique, workers=[w]) -----------------> scheduler -> worker w,
                                                                        a task thread:
                                                                        _worker.dask.run_call
                            <--inbox-- topic handler <-- scheduler <--- log_event Started /
                                                                        Retrying (tenacity),
                                                                        small outcomes
                            <--inbox-- gather coroutine <-- scheduler <-- return value (larger
                                                                        outcomes)
                            <--inbox-- "all" topic: add-worker / remove-worker
                            update Backlog counts, resolve Futures
                            timers: tasks due (backlog), recall, breaker, worker probe,
                            hard timeouts, stop deadline
                            --restart_worker--> "taskorch-dask-restart" thread:
                            Client.restart_workers([w]) --> w's nanny kills w, starts anew
                            <--inbox-- its answer, once the cluster has its workers back

The actors:

- Producers only touch the ``Backlog`` (one lock, one deque append) and, when the dispatcher is
  not already due to look at the backlog, put a WAKE into the inbox.
- The dispatcher thread is the only one that submits, cancels or recalls Dask tasks and the
  only one that changes this module's state. It blocks in one place, ``inbox.get(timeout)``,
  whose wakeup sources are: WAKE (new tasks, stop()), task events, outcomes, cluster events,
  answers to recalls and worker probes, and the timeout (the nearest crash-retry backoff,
  recall check, breaker change, worker probe or stop deadline). No fixed polling tick, except
  the worker probe, a safety net that runs only while calls are on the cluster.
- The ``distributed.Client``'s event-loop thread (Dask's) runs our topic handler and gathers
  (``dask_cluster.ClusterLink``): they only put into the inbox.
- Dask worker threads run ``_worker.dask.run_call``: unpickle the call, run its attempts under
  the policy, return the outcome as bytes; user objects are decoded only here, in the parent.

Locks: the dispatcher takes the backlog's lock (see ``_parent.backlog``) to move calls between
the backlog and its own records and to update the counts, once per batch of inbox entries and
once per dispatch. It never holds it across a call into the Client (submit, cancel, release,
recall, probe) nor while it resolves futures (done-callbacks are user code): what those need is
collected under the lock and done after. ``dask_cluster.ClusterEventsListener._lock`` only
guards its registry; nothing is called under it but the Client's non-blocking subscribe.

Accepted races, written down (the hard timeout's own: ``dask_timeout``):
- stop()'s timeout: a call handed over may begin just as it is cancelled, and a running one
  is abandoned and cancelled but runs on (Dask cannot stop a thread); both go unobserved.
- A worker that restarts on the same address (a fixed ``--worker-port``) before the dispatcher
  cancelled its pinned calls could run them again; the cancel follows the "remove-worker"
  event at once, and a restart takes far longer.

A Client that loses its scheduler cancels every future it holds; the dispatcher then declares
the orchestrator broken: unresolved tasks fail with ``OrchestratorBrokenError``. (What a
user sees of all this, events kept on the scheduler included: ``taskorch.dask``.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import time
import uuid
from typing import Any, Iterable

from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission
from taskorch._parent.dask_cluster import (
    CLUSTER,
    EVENT,
    OUTCOME,
    RECALL_ANSWER,
    RESTARTED,
    WAKE,
    WORKERS,
    ClusterLink,
    Inbox,
    worker_lost_error,
)
from taskorch._parent.dask_pool import (
    SLOW_AFTER,
    WORKER_PROBE_INTERVAL,
    DaskWorker,
    Membership,
    Submission,
)
from taskorch._parent.dask_timeout import DaskHardTimeouts
from taskorch._parent.task import WorkItem
from taskorch._policy import CircuitBreaker
from taskorch._wire import Event, Failed, Recalled, Retrying, Started, Succeeded

log = logging.getLogger("taskorch")


class DaskDispatcher(DaskHardTimeouts):
    thread_name = "taskorch-dask-dispatcher"

    def __init__(
        self,
        backlog: Backlog,
        target: Any,  # a scheduler address, or a distributed.Client (not ours to close)
        worker_count: int | None,
        default_policy_bytes: bytes,
        circuit_breaker: CircuitBreaker | None,
        connect_timeout: float | None,
        kill_grace: float,
    ) -> None:
        super().__init__(backlog, circuit_breaker)
        self._worker_count = worker_count
        self._kill_grace = kill_grace
        self._default_policy_bytes = default_policy_bytes
        # Unique per dispatcher: the events topic, and the prefix of every Dask key, so that
        # no submission is ever merged with another by the scheduler.
        self._uid = uuid.uuid4().hex[:16]
        # The inbox (see ``dask_cluster``). put() from any thread; get() by ours only.
        self._inbox: Inbox = queue.SimpleQueue()
        self._link = ClusterLink(target, connect_timeout, f"taskorch-events-{self._uid}",
                                 self._inbox, self._future_of)
        # Dispatcher thread only, except `_members.total_threads` (an int, read by any thread).
        self._members = Membership()
        self._workers = self._members.workers  # (the same dict: read everywhere below)
        self._subs: dict[int, Submission] = {}
        self._sub_ids = itertools.count(1)
        self._running: dict[int, Submission] = {}  # see dask_timeout, as for the next three
        self._held: dict[int, Submission] = {}
        self._restarts: dict[str, float] = {}
        self._warned_no_restart = False
        self._probe_at: float | None = None  # next worker probe (calls on the cluster only)
        # Found under the backlog lock, acted upon after it is released (_handle).
        self._break_reason: str | None = None
        self._to_release: list[Any] = []  # Dask futures whose outcome is in
        self._to_cancel: list[Any] = []  # Dask futures of calls settled at stop

    # -- called from other threads -------------------------------------------------------------

    def effective_worker_count(self) -> int:
        if self._worker_count is not None:
            return self._worker_count
        # No worker yet: tasks wait, and map() needs >= 1.
        return max(1, self._members.total_threads)

    def wake(self) -> None:
        self._inbox.put((WAKE,))

    def _future_of(self, sub_id: int) -> Any:
        """A submission's distributed.Future (the Client's loop thread asks: atomic gets)."""
        sub = self._subs.get(sub_id) or self._held.get(sub_id)
        return sub.future if sub is not None else None

    # -- what comes back -------------------------------------------------------------------

    def _open(self) -> None:
        self._set_workers(self._link.open())

    def _describe_start_failure(self, exc: BaseException) -> str:
        return self._link.describe_failure(exc)

    def _close(self) -> None:
        self._link.close()

    def _wait_and_handle(self, timeout: float | None) -> None:
        inbox = self._inbox
        entries: list[tuple[Any, ...]] = []
        try:
            entries.append(inbox.get(timeout=timeout))
        except queue.Empty:
            pass
        while True:
            try:
                entries.append(inbox.get_nowait())
            except queue.Empty:
                break
        if entries:
            self._handle(entries)

    def _handle(self, entries: list[tuple[Any, ...]]) -> None:
        lost: list[tuple[str, str]] = []  # (address, why)
        recalled: list[tuple[str, list[int] | None]] = []
        restarted: list[tuple[str, BaseException | None]] = []
        answers: list[tuple[dict[str, int] | None, int]] = []
        refresh = False
        now = time.monotonic()
        backlog = self._backlog
        with backlog.locked():
            for entry in entries:
                kind = entry[0]
                if kind == EVENT:
                    self._on_event_locked(entry[1], now, lost)
                elif kind == OUTCOME:
                    self._on_outcome_locked(entry[1], entry[2], entry[3], now, lost)
                elif kind == CLUSTER:
                    msg = entry[1]
                    if msg.get("action") == "remove-worker":
                        expected = " (retired)" if msg.get("expected") else ""
                        lost.append((str(msg.get("worker")), f"the scheduler removed it{expected}"))
                    else:
                        refresh = True  # a worker joined: learn its threads
                elif kind == RECALL_ANSWER:
                    recalled.append((entry[1], entry[2]))
                elif kind == RESTARTED:
                    restarted.append((entry[1], entry[2]))
                elif kind == WORKERS:
                    answers.append((entry[1], entry[2]))
        self._link.release(self._to_release)
        self._to_release.clear()
        if self._break_reason is not None:
            log.error("orchestrator broken: %s", self._break_reason)
            backlog.mark_broken(self._break_reason)
            self._break_reason = None
        for address, taken in recalled:
            self._on_recall_answer(address, taken)
        for address, why in lost:
            self._on_worker_lost(address, why)
        for address, error in restarted:
            self._on_restarted(address, error)
        for nthreads, probe in answers:
            self._on_workers(nthreads, probe)
        members = self._members
        if refresh or (members.probe_again and not members.probe_in_flight):
            self._probe_workers()

    def _on_event_locked(
        self, event: Started | Retrying | Succeeded | Failed, now: float,
        lost: list[tuple[str, str]],
    ) -> None:
        sub = self._subs.get(event.task_id)
        if sub is None:
            held = self._held.get(event.task_id)
            if held is not None and isinstance(event, (Succeeded, Failed)):
                self._held_ended_locked(held)
            return  # from a call taken back, lost, abandoned or timed out
        sub.worker.last_progress = now
        if isinstance(event, (Succeeded, Failed)):
            self._on_outcome_locked(sub.sub_id, event, None, now, lost)
        elif isinstance(event, Started):
            sub.started = True
            sub.pid = event.pid
            self._running[sub.sub_id] = sub
            self._started_locked(sub.item, event.attempt, now)
        elif isinstance(event, Retrying):
            self._retrying_locked(sub.item, event.attempt, event.error, event.delay,
                                  event.timed_out)

    def _on_outcome_locked(
        self, sub_id: int, outcome: Event | None, exc: BaseException | None, now: float,
        lost: list[tuple[str, str]],
    ) -> None:
        sub = self._subs.get(sub_id)
        if sub is None:
            held = self._held.get(sub_id)
            if held is not None:
                self._held_ended_locked(held)
            return  # taken back, lost, abandoned or timed out
        sub.worker.last_progress = now
        if exc is not None:
            self._on_dask_error_locked(sub, exc, lost)
            return
        if not isinstance(outcome, (Succeeded, Failed, Recalled)):
            raise AssertionError(f"unexpected outcome {outcome!r} for {sub.item!r}")
        self._to_release.append(self._forget_sub(sub))
        if isinstance(outcome, Recalled):  # taken back by a recall whose answer we have not read
            self._requeue_locked([sub.item])
            return
        sub.worker.record_duration(self._outcome_locked(sub.item, outcome, now))

    def _on_dask_error_locked(
        self, sub: Submission, exc: BaseException, lost: list[tuple[str, str]],
    ) -> None:
        """The Dask task itself failed: our run_call never fails, so the cluster did this."""
        import distributed

        if isinstance(exc, distributed.KilledWorker):
            # The scheduler gave up on it after a worker death (allowed_failures): the same as
            # the "remove-worker" event, which may not have come yet.
            lost.append((sub.worker.address, "the scheduler reported KilledWorker"))
            return
        if isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError)):
            # Not by us (we forget a call before cancelling it): the Client was closed or lost
            # its scheduler, or someone cancelled our key (Client.restart(), Client.cancel).
            if self._link.status != "running":
                reason = getattr(exc, "reason", None) or self._link.status
                self._break_reason = (
                    f"the Dask client lost its scheduler or was closed ({reason}), and with it "
                    "every task it had submitted; create a new orchestrator"
                )
                return  # _handle marks the backlog broken; the core then settles everything
            self._forget_sub(sub)  # cancelled already
            self._crash_sub_locked(sub, f"its Dask task was cancelled on the cluster ({exc})",
                                   worker_lost=False)
            return
        # e.g. the worker cannot import taskorch, or the outcome does not deserialize.
        self._to_release.append(self._forget_sub(sub))
        log.error("task %d: its Dask task failed outside taskorch's worker function (%s: %s); "
                  "is the same taskorch installed on every Dask worker?", sub.item.task_id,
                  type(exc).__name__, exc)
        self._fail_locked(sub.item, exc)

    def _crash_sub_locked(self, sub: Submission, why: str, worker_lost: bool = True) -> None:
        """The attempt that started on ``sub.worker`` was lost: the core charges it."""
        item = sub.item
        error = worker_lost_error(sub.pid, sub.worker.address, item.attempts, why, worker_lost)
        outcome = self._crash_locked(item, error)
        log.warning("task %d: attempt %d of %d lost: %s; %s", item.task_id, item.attempts,
                    item.policy.max_attempts, error, outcome)

    def _forget_sub(self, sub: Submission) -> Any:
        """Stop tracking a call; return its distributed.Future (or None), for the caller to
        release (its outcome is in) or cancel (it must not run)."""
        self._subs.pop(sub.sub_id, None)
        self._running.pop(sub.sub_id, None)
        self._held.pop(sub.sub_id, None)
        sub.worker.subs.pop(sub.sub_id, None)
        future, sub.future = sub.future, None
        return future

    # -- workers ---------------------------------------------------------------------------

    def _set_workers(self, nthreads: dict[str, int]) -> list[str]:
        joined = self._members.add(nthreads)
        with self._backlog.locked():
            self._backlog.set_workers_locked(len(self._workers))
        return joined

    def _on_workers(self, nthreads: dict[str, int] | None, probe: int) -> None:
        """Probe number ``probe``'s answer: the scheduler's workers when it answered."""
        gone, present = self._members.answered(nthreads, probe)
        for address in gone:
            self._on_worker_lost(address, "it is no longer in the cluster")
        joined = self._set_workers(present)
        if joined:
            log.info("Dask workers joined: %s (%d threads in all)", ", ".join(joined),
                     self._members.total_threads)
            self._backlog.count_restarts(len(joined), None)

    def _probe_workers(self) -> None:
        """Ask the scheduler for its workers (asynchronously: the answer comes to the inbox)."""
        probe = self._members.next_probe()
        if probe is not None:
            self._link.ask_workers(probe)

    def _on_worker_lost(self, address: str, why: str) -> None:
        worker = self._members.remove(address)
        if worker is None:
            return
        held = [sub for sub in worker.subs.values() if sub.sub_id in self._held]
        subs = [sub for sub in worker.subs.values() if sub.sub_id not in self._held]
        with self._backlog.locked():
            self._backlog.set_workers_locked(len(self._workers))
            futures = [self._forget_sub(sub) for sub in subs]
            if address not in self._restarts:  # else they hold their slots until its answer
                futures += [self._forget_sub(sub) for sub in held]
            requeue = [sub.item for sub in subs if not sub.started]
            self._requeue_locked(requeue)
            for sub in subs:
                if sub.started:
                    self._crash_sub_locked(sub, why)
        self._link.cancel(futures)  # they wait in "no-worker" state: drop them
        log.warning("Dask worker %s lost (%s): %d call(s) it had not started re-queued, %d "
                    "running call(s) lost; %d threads left", address, why, len(requeue),
                    len(subs) - len(requeue), self._members.total_threads)

    # -- handing over ----------------------------------------------------------------------

    def _hand_over(self, now: float, admission: Admission) -> None:
        backlog = self._backlog
        status = self._link.status
        if status != "running":
            # "connecting": it lost its scheduler, and cancels every future it held; their
            # outcomes (cancelled) break the orchestrator. Closed: nothing will come.
            if status in ("closing", "closed", "failed"):
                reason = f"the Dask client is {status}; create a new orchestrator"
                log.error("orchestrator broken: %s", reason)
                backlog.mark_broken(reason)
            return
        batches: dict[str, list[Submission]] = {}
        with backlog.locked():
            ready = backlog.ready_count_locked()
            if ready and self._workers:
                handed = len(self._subs) + len(self._held)  # a held slot is busy
                cap = (self._worker_count if self._worker_count is not None
                       else ready + handed)
                rooms = {w.address: 0 if w.address in self._restarts else w.room(now)
                         for w in self._workers.values()}
                while handed < cap:
                    # The least loaded worker with room: free threads first, then prefetch
                    # evenly (a worker that prefetches deeper must not take everything).
                    takers = [w for w in self._workers.values() if rooms[w.address] > 0]
                    if not takers:
                        break
                    worker = min(takers, key=lambda w: len(w.subs) / w.nthreads)
                    taken = self._take_locked(admission, 1)
                    if not taken:
                        break  # none left, or held back by the circuit breaker (HOLD mode)
                    sub_id = next(self._sub_ids)
                    sub = Submission(sub_id, taken[0], f"taskorch-{self._uid}-{sub_id}", worker)
                    if not worker.subs:
                        worker.last_progress = now  # busy from now on
                    worker.subs[sub_id] = sub
                    self._subs[sub_id] = sub
                    batches.setdefault(worker.address, []).append(sub)
                    rooms[worker.address] -= 1
                    handed += 1
        for address, subs in batches.items():
            self._submit(address, subs)
        if self._subs and self._probe_at is None:
            self._probe_at = now + WORKER_PROBE_INTERVAL

    def _submit(self, address: str, subs: list[Submission]) -> None:
        try:
            futures = self._link.submit(
                address, [sub.sub_id for sub in subs], [sub.key for sub in subs],
                [sub.item.payload for sub in subs],  # the bytes run() made: not pickled again
                [sub.item.policy_bytes for sub in subs], [sub.item.attempts for sub in subs],
                self._default_policy_bytes,
            )
        except Exception as exc:
            # The client is closed, or the calls cannot be sent: as if the worker were lost
            # before starting them (they go back to the backlog), and the client is checked.
            log.error("could not submit %d call(s) to Dask worker %s: %r", len(subs), address, exc)
            with self._backlog.locked():
                for sub in subs:
                    self._forget_sub(sub)
                self._requeue_locked([sub.item for sub in subs])
            if self._link.status != "running":
                reason = f"the Dask client is {self._link.status}; create a new orchestrator"
                log.error("orchestrator broken: %s", reason)
                self._backlog.mark_broken(reason)
            return
        for sub, future in zip(subs, futures):
            sub.future = future

    def _has_room(self, now: float) -> bool:
        return False  # one hand-over per round: Dask's own round trips dominate

    def _has_inflight(self) -> bool:
        return bool(self._subs)

    def _recall_unstarted(self, now: float) -> float | None:
        workers = self._workers.values()
        if not any(len(w.subs) < w.nthreads and w.address not in self._restarts
                   for w in workers):
            return None
        again: float | None = None
        for worker in workers:
            if worker.recall_sent or len(worker.subs) <= worker.nthreads:
                continue  # every call it holds can run now
            due = worker.last_progress + SLOW_AFTER
            if now < due:
                again = due if again is None else min(again, due)
                continue
            calls = [(s.sub_id, s.key) for s in worker.subs.values() if not s.started]
            if calls:
                self._send_recall(worker, calls)
        return again

    def _send_recall(self, worker: DaskWorker, calls: list[tuple[int, str]]) -> None:
        log.debug("recalling %d calls from busy Dask worker %s", len(calls), worker.address)
        worker.recall_sent = True
        self._link.recall(worker.address, calls)

    def _on_recall_answer(self, address: str, taken: list[int] | None) -> None:
        worker = self._workers.get(address)
        if worker is not None:
            worker.recall_sent = False
        subs = [self._subs[s] for s in taken or () if s in self._subs]
        subs = [sub for sub in subs if not sub.started]  # marked calls never start; defensive
        if not subs:
            return
        with self._backlog.locked():
            futures = [self._forget_sub(sub) for sub in subs]
            self._requeue_locked([sub.item for sub in subs])
        self._link.cancel(futures)

    # -- timers and stopping ---------------------------------------------------------------

    def _backend_deadlines(self) -> Iterable[float | None]:
        yield self._probe_at
        for sub in self._running.values():
            yield self._hard_deadline(sub)

    def _fire_backend_timers(self, now: float) -> None:
        if self._probe_at is not None and now >= self._probe_at:
            self._probe_at = None
            if self._subs:
                self._probe_workers()
        overdue = [sub for sub in self._running.values()
                   if (deadline := self._hard_deadline(sub)) is not None and now >= deadline]
        if overdue:
            self._hard_timeout(overdue)

    def _take_all_inflight_locked(self) -> list[tuple[WorkItem, str]]:
        held = []
        for sub in list(self._subs.values()):
            self._to_cancel.append(self._forget_sub(sub))
            held.append((sub.item, (
                f"it was on Dask worker {sub.worker.address}: its Dask task was cancelled, but "
                "Dask cannot stop a running task: it may run on there, its result discarded"
            )))
        return held

    def _after_settle(self) -> None:
        futures, self._to_cancel = self._to_cancel, []
        self._link.cancel(futures)
