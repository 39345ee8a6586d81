"""Parent process, the Dask dispatcher thread: the Dask pool the dispatcher core owns.

The task life (start, retry, outcome, crash charge, breaker, stop) is the core's
(``dispatch.DispatcherCore``); this module supplies how tasks reach a Dask cluster and what
comes back, read from the same event vocabulary as local workers (``_wire``, ``_worker.dask``)
and handed to the core as ``pool`` events (``pool.WorkerPool``).

Data flow:

    run()/run_async()       "taskorch-dask-dispatcher"                    Dask cluster
    -----------------       --------------------------                    ------------
    cloudpickle the call
    Backlog.offer() -----> take from the backlog, pin each call to one
    (inbox.put(Wake())      worker with room: Client.map(run_call,
     if it is asleep)       key=unique, workers=[w]) -----------------> scheduler -> worker w,
                                                                        a task thread:
                                                                        _worker.dask.run_call
                            <--inbox-- topic handler <-- scheduler <--- log_event Started /
                                                                        Retrying (tenacity),
                                                                        small outcomes
                            <--inbox-- gather coroutine <-- scheduler <-- return value (larger
                                                                        outcomes)
                            <--inbox-- "all" topic: add-worker / remove-worker
                            -> pool events: the core updates the counts and
                            resolves the futures
                            timers: tasks due (backlog), recall, breaker, worker probe,
                            hard timeouts, stop deadline
                            --restart_worker--> "taskorch-dask-restart" thread:
                            Client.restart_workers([w]) --> w's nanny kills w, starts anew
                            <--inbox-- its answer, once the cluster has its workers back

The actors:

- Producers only touch the ``Backlog`` (one lock, one deque append) and, when the dispatcher is
  not already due to look at the backlog, put a ``Wake`` into the inbox.
- The dispatcher thread is the only one that submits, cancels or recalls Dask tasks and the
  only one that changes this module's state. It blocks in one place, ``inbox.get(timeout)``,
  whose wakeup sources are: ``Wake`` (new tasks, stop()), task events, outcomes, cluster events,
  answers to recalls and worker probes, and the timeout (the nearest crash-retry backoff,
  recall check, breaker change, worker probe or stop deadline). No fixed polling tick, except
  the worker probe, a safety net that runs only while calls are on the cluster.
- The ``distributed.Client``'s event-loop thread (Dask's) runs our topic handler and gathers
  (``dask_cluster.ClusterLink``): they only put into the inbox.
- Dask worker threads run ``_worker.dask.run_call``: unpickle the call, run its attempts under
  the policy, return the outcome as bytes; user objects are decoded only here, in the parent.

Locks: this pool never takes the backlog's lock: the core applies the events it hands back under
it, once per batch of inbox entries, and ``take`` holds it briefly. The pool's records are the
dispatcher thread's alone (but ``_future_of``: atomic dict reads).
``dask_cluster.ClusterEventsListener._lock`` only guards its registry; nothing is called under
it but the Client's non-blocking subscribe.

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

import itertools
import logging
import queue
import time
import uuid
from typing import Any, Iterable, Iterator

from taskorch._parent.dask_cluster import ClusterLink, Inbox
from taskorch._parent.dask_inbox import (
    ClusterChanged,
    EventArrived,
    GatherEnded,
    InboxEntry,
    RecallAnswer,
    Restarted,
    Wake,
    WorkersAnswer,
)
from taskorch._parent.dask_pool import (
    WORKER_PROBE_INTERVAL,
    Membership,
    Submission,
)
from taskorch._parent.dask_timeout import DaskHardTimeouts
from taskorch._parent.figures import WorkerView
from taskorch._parent.pool import (
    AttemptRetrying,
    AttemptStarted,
    CallsReturned,
    PoolBroken,
    PoolEvent,
    Take,
    TaskFinished,
)
from taskorch._parent.task import WorkItem
from taskorch._parent.terminate import TerminateRequest
from taskorch._wire import Event, Failed, Recalled, Retrying, Started, Succeeded

log = logging.getLogger("taskorch")


class DaskPool(DaskHardTimeouts):
    """The workers of a Dask cluster (``pool.WorkerPool``)."""

    thread_name = "taskorch-dask-dispatcher"
    recalls_for_cancel = False
    terminates = True  # (by restarting its worker process: ``dask_timeout._terminate``)
    pids: tuple[int, ...] = ()  # (no worker process on this machine)

    def __init__(
        self,
        target: Any,  # a scheduler address, or a distributed.Client (not ours to close)
        worker_count: int | None,
        default_policy_bytes: bytes,
        connect_timeout: float | None,
        kill_grace: float,
    ) -> None:
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
        self._terminating: dict[int, tuple[Submission, list[TerminateRequest]]] = {}
        self._warned_no_restart = False
        self._probe_at: float | None = None  # next worker probe (calls on the cluster only)
        self._out: list[PoolEvent] = []  # events to hand back from the method running now
        # Found while reading the inbox, acted upon after (_handle).
        self._break_reason: str | None = None
        self._to_release: list[Any] = []  # Dask futures whose outcome is in

    def terminate(self, request: TerminateRequest) -> None:  # (dispatcher thread)
        self._terminate(request)

    # -- called from other threads -------------------------------------------------------------

    def effective_worker_count(self) -> int:
        if self._worker_count is not None:
            return self._worker_count
        # No worker yet: tasks wait, and map() needs >= 1.
        return max(1, self._members.total_threads)

    def wake(self) -> None:
        self._inbox.put(Wake())

    def worker_views(self) -> list[WorkerView]:
        return []  # (only local workers are shown)

    def _future_of(self, sub_id: int) -> Any:
        """A submission's distributed.Future (the Client's loop thread asks: atomic gets)."""
        sub = self._subs.get(sub_id) or self._held.get(sub_id)
        return sub.future if sub is not None else None

    # -- what comes back -------------------------------------------------------------------

    def _handing_back(self) -> list[PoolEvent]:
        """The events collected by the method that ends now, for the core."""
        out, self._out = self._out, []
        return out

    def open(self) -> list[PoolEvent]:
        self._set_workers(self._link.open())
        return self._handing_back()

    def describe_start_failure(self, exc: BaseException) -> str:
        return self._link.describe_failure(exc)

    def close(self) -> list[PoolEvent]:
        self._link.close()
        return []

    def forget_in_forked_child(self) -> None:
        pass  # (nothing of the Client is touched in a child)

    def wait(self, timeout: float | None) -> list[PoolEvent]:
        inbox = self._inbox
        entries: list[InboxEntry] = []
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
        return self._handing_back()

    def _handle(self, entries: list[InboxEntry]) -> None:
        lost: list[tuple[str, str]] = []  # (address, why)
        recalled: list[tuple[str, list[int] | None]] = []
        restarted: list[tuple[str, BaseException | None]] = []
        answers: list[tuple[dict[str, int] | None, int]] = []
        refresh = False
        now = time.monotonic()
        for entry in entries:
            if isinstance(entry, EventArrived):
                self._on_event(entry.event, now, lost)
            elif isinstance(entry, GatherEnded):
                self._on_outcome(entry.sub_id, entry.outcome, entry.error, now, lost)
            elif isinstance(entry, ClusterChanged):
                msg = entry.msg
                if msg.get("action") == "remove-worker":
                    expected = " (retired)" if msg.get("expected") else ""
                    lost.append((str(msg.get("worker")), f"the scheduler removed it{expected}"))
                else:
                    refresh = True  # a worker joined: learn its threads
            elif isinstance(entry, RecallAnswer):
                recalled.append((entry.address, entry.taken))
            elif isinstance(entry, Restarted):
                restarted.append((entry.address, entry.error))
            elif isinstance(entry, WorkersAnswer):
                answers.append((entry.nthreads, entry.probe))
            # Wake: nothing to do but look at the backlog, which the loop does
        self._link.release(self._to_release)
        self._to_release.clear()
        if self._break_reason is not None:
            log.error("orchestrator broken: %s", self._break_reason)
            self._out.append(PoolBroken(self._break_reason))
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

    def _on_event(
        self, event: Started | Retrying | Succeeded | Failed, now: float,
        lost: list[tuple[str, str]],
    ) -> None:
        sub = self._subs.get(event.task_id)
        if sub is None:
            held = self._held.get(event.task_id)
            if held is not None and isinstance(event, (Succeeded, Failed)):
                self._held_ended(held)
            return  # from a call taken back, lost, abandoned or timed out
        sub.worker.last_progress = now
        if isinstance(event, (Succeeded, Failed)):
            self._on_outcome(sub.sub_id, event, None, now, lost)
        elif isinstance(event, Started):
            sub.started = True
            sub.pid = event.pid
            self._running[sub.sub_id] = sub
            self._out.append(AttemptStarted(sub.item, event.attempt))
        elif isinstance(event, Retrying):
            self._out.append(AttemptRetrying(sub.item, event.attempt, event.error, event.delay,
                                             event.timed_out))

    def _on_outcome(
        self, sub_id: int, outcome: Event | None, exc: BaseException | None, now: float,
        lost: list[tuple[str, str]],
    ) -> None:
        sub = self._subs.get(sub_id)
        if sub is None:
            held = self._held.get(sub_id)
            if held is not None:
                self._held_ended(held)
            return  # taken back, lost, abandoned or timed out
        sub.worker.last_progress = now
        if exc is not None:
            self._on_dask_error(sub, exc, lost)
            return
        if not isinstance(outcome, (Succeeded, Failed, Recalled)):
            raise AssertionError(f"unexpected outcome {outcome!r} for {sub.item!r}")
        self._to_release.append(self._forget_sub(sub))
        if isinstance(outcome, Recalled):  # taken back by a recall whose answer we have not read
            self._out.append(CallsReturned([sub.item]))
            return
        sub.worker.record_duration(float(outcome.seconds) / max(1, int(outcome.attempts)))
        self._out.append(TaskFinished(sub.item, outcome))

    # -- handing over ----------------------------------------------------------------------

    def hand_over(self, now: float, waiting: int, take: Take,
                  finishing: bool) -> list[PoolEvent]:
        status = self._link.status
        if status != "running":
            # "connecting": it lost its scheduler, and cancels every future it held; their
            # outcomes (cancelled) break the orchestrator. Closed: nothing will come.
            if status in ("closing", "closed", "failed"):
                reason = f"the Dask client is {status}; create a new orchestrator"
                log.error("orchestrator broken: %s", reason)
                self._out.append(PoolBroken(reason))
            return self._handing_back()
        batches: dict[str, list[Submission]] = {}
        if waiting and self._workers:
            handed = len(self._subs) + len(self._held)  # a held slot is busy
            cap = self._worker_count if self._worker_count is not None else waiting + handed
            rooms = {w.address: 0 if w.address in self._restarts else w.room(now)
                     for w in self._workers.values()}
            while handed < cap:
                # The least loaded worker with room: free threads first, then prefetch
                # evenly (a worker that prefetches deeper must not take everything).
                takers = [w for w in self._workers.values() if rooms[w.address] > 0]
                if not takers:
                    break
                worker = min(takers, key=lambda w: len(w.subs) / w.nthreads)
                # A call beyond its free threads is prefetched: ``order`` keeps those plain.
                taken = take(1, None, True, None if len(worker.subs) < worker.nthreads else 0)
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
        return self._handing_back()

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
            for sub in subs:
                self._forget_sub(sub)
            self._out.append(CallsReturned([sub.item for sub in subs]))
            if self._link.status != "running":
                reason = f"the Dask client is {self._link.status}; create a new orchestrator"
                log.error("orchestrator broken: %s", reason)
                self._out.append(PoolBroken(reason))
            return
        for sub, future in zip(subs, futures):
            sub.future = future

    def has_room(self, now: float) -> bool:
        return False  # one hand-over per round: Dask's own round trips dominate

    def has_inflight(self) -> bool:
        return bool(self._subs)

    # -- timers and stopping ---------------------------------------------------------------

    def deadlines(self) -> Iterable[float | None]:
        yield self._probe_at
        for sub in self._running.values():
            yield self._hard_deadline(sub)

    def fire_timers(self, now: float) -> list[PoolEvent]:
        if self._probe_at is not None and now >= self._probe_at:
            self._probe_at = None
            if self._subs:
                self._probe_workers()
        overdue = [sub for sub in self._running.values()
                   if (deadline := self._hard_deadline(sub)) is not None and now >= deadline]
        if overdue:
            self._hard_timeout(overdue)
        return self._handing_back()

    def stop_all(self) -> tuple[list[PoolEvent], list[tuple[WorkItem, str]]]:
        """Forget every call handed over and cancel its Dask task (one that runs cannot be
        stopped: it runs on, unobserved)."""
        held = []
        futures = []
        for sub in list(self._subs.values()):
            futures.append(self._forget_sub(sub))
            held.append((sub.item, (
                f"it was on Dask worker {sub.worker.address}: its Dask task was cancelled, but "
                "Dask cannot stop a running task: it may run on there, its result discarded"
            )))
        self._link.cancel(futures)
        return self._handing_back(), held

    def shut_down(self, deadline: float | None) -> Iterator[list[PoolEvent]]:
        return iter(())  # (the workers are the cluster's: nothing to let go of)
