"""Parent process, the Dask dispatcher thread: what is lost on Dask, a layer of the Dask pool
(``dask.DaskPool`` sets up the attributes declared below and reads the inbox): hard timeouts,
workers that leave (their calls not started ``CallsReturned``, the running ones
``AttemptLost``), Dask tasks that fail outside taskorch's worker function, the membership
probes, and recalls.

The hard timeout: the worker's in-process interrupt (``_worker.dask.ThreadTimer``) cannot reach
a thread blocked in C. When an attempt has run ``kill_grace`` past its policy's timeout (from
its start event) and no outcome or retry came, the pool hands it back ``AttemptLost`` and the core
charges it (``rules.TaskRules.lost_locked``, a ``TaskTimeoutError``: retried only if the policy
retries timeouts), as a local hard timeout is, and the Dask worker process is restarted by its
nanny: nothing else stops a Dask thread. Until the restart's answer, the call holds its slot
(``_held``: its worker gets no calls, and it counts against ``worker_count``), so the in-flight
bound holds while the stuck thread runs; the worker's calls not started are recalled at once;
when the worker leaves, the ones still there go back uncharged, and so do the other attempts
running there (``AttemptLostUncharged``: taskorch restarted their worker, they did nothing
wrong; they may have had side effects, as after a crash). A worker without a nanny cannot be
restarted
(``Client.restart_workers`` refuses it, and taskorch never shuts a worker down): a warning says
so once, the attempt fails on time all the same, and the slot stays held until its Dask task
ends by itself.

A terminate (``Client.cancel(id, terminate=True)`` on ``taskorch serve --dask``) is the same
kill: the attempt's worker process is restarted by its nanny, and when it leaves, that attempt
is lost as ``terminate.Terminated`` (the task ends cancelled) and every other attempt running
there goes back to the backlog, not charged, as above: a Dask worker runs several tasks in one
process, and no thread of it can be stopped alone. The request (``terminate.TerminateRequest``)
is answered True once the worker is gone (or the attempt ended meanwhile), False if the
worker cannot be restarted (no nanny: ``Client.restart_workers`` refuses at once): the task
runs on, a warning says why, and the cancel answers False at once. Until the restart's answer,
the worker gets no calls and its calls not started are recalled, as after a hard timeout.

Accepted races: a stuck attempt that returns to Python between the parent's hard timeout and
the worker's end may start another attempt there (tenacity retries inside the worker) while the
parent's retry runs elsewhere: after a hard timeout a task runs at least once, as after a
crash; its events are ignored. On a LocalCluster (a ``SpecCluster``), restarting the same
worker twice within ``distributed.deploy.lost-worker-timeout`` (15 s) may let the first
removal's timer close that worker's nanny (the restart then times out after
``RESTART_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from taskorch._parent.dask_cluster import ClusterLink, hard_timeout_error, worker_lost_error
from taskorch._parent.dask_pool import SLOW_AFTER, DaskWorker, Membership, Submission
from taskorch._parent.pool import (
    AttemptLost,
    AttemptLostUncharged,
    CallsReturned,
    CannotRun,
    PoolEvent,
    WorkersChanged,
    WorkersRestarted,
)
from taskorch._parent.task import WorkItem
from taskorch._parent.terminate import Terminated, TerminateRequest

log = logging.getLogger("taskorch")


class DaskHardTimeouts:
    # Set up by DaskPool (dispatcher thread only).
    _kill_grace: float
    _link: ClusterLink
    _workers: dict[str, DaskWorker]
    _subs: dict[int, Submission]  # calls pinned to a worker, without an outcome
    _running: dict[int, Submission]  # the subs of `_subs` that started: watched here
    # Calls timed out by the parent while their thread runs on: each keeps its worker's slot
    # busy, in its worker's `subs` and in the in-flight count, until the worker is restarted
    # (an answer for `_restarts`) or, if it cannot be, until its Dask task ends. Their events
    # and outcomes are ignored: the core settled them.
    _held: dict[int, Submission]
    _restarts: dict[str, float]  # address -> when its restart was asked for
    # Running calls to end cancelled when their worker leaves (a terminate asked for its
    # restart), with the requests to answer; dropped at the restart's answer.
    _terminating: dict[int, tuple[Submission, list[TerminateRequest]]]
    _warned_no_restart: bool
    _to_release: list[Any]
    _out: list[PoolEvent]  # events for the core, handed back by the method running now

    _members: Membership
    _break_reason: str | None

    def _hard_deadline(self, sub: Submission) -> float | None:
        """When the parent gives up on ``sub``'s running attempt: its policy's timeout plus
        ``kill_grace`` after its start event arrived (the worker's in-process interrupt fires
        at the timeout on the worker's clock, which started earlier). None: no timeout, the
        call is backing off between attempts, or its Dask task finished (the outcome comes)."""
        item = sub.item
        timeout = item.policy.timeout
        if timeout is None or not item.attempt_started or sub.ended:
            return None
        return item.attempt_started + timeout + self._kill_grace

    def _hard_timeout(self, subs: list[Submission]) -> None:
        """Attempts ran ``kill_grace`` past their timeout: the in-process interrupt could not
        reach them (a thread blocked in C). Each is handed back ``AttemptLost``: the core charges it
        (``rules.TaskRules.lost_locked``, with a
        TaskTimeoutError: retried only if the policy retries timeouts), and each one's worker is
        restarted by its nanny: the only way to stop a Dask thread. Meanwhile the call holds
        its slot (``_held``), and its worker gets nothing more; its calls not started are
        recalled now (the rest come back uncharged, and the running ones are charged a crash,
        when the worker leaves)."""
        restart: list[DaskWorker] = []
        for sub in subs:
            if sub.future is not None and sub.future.done():
                sub.ended = True  # it returned just now: its outcome is on its way
                continue
            item, worker = sub.item, sub.worker
            self._subs.pop(sub.sub_id)
            self._running.pop(sub.sub_id)
            self._held[sub.sub_id] = sub  # (still in worker.subs: the slot stays busy)
            error = hard_timeout_error(item.attempts, item.policy.timeout or 0.0,
                                       self._kill_grace, worker.address, sub.pid)
            self._out.append(AttemptLost(item, error, (
                f"task {item.task_id}: attempt {item.attempts} of {item.policy.max_attempts} "
                f"still running {self._kill_grace:g} s past its {item.policy.timeout:g} s "
                f"timeout on Dask worker {worker.address}; restarting it; ")))
            if worker.address not in self._restarts and worker not in restart:
                restart.append(worker)
        now = time.monotonic()
        for worker in restart:
            self._restart(worker, now)

    def _terminate(self, request: TerminateRequest) -> None:
        """Kill ``request.item``'s running attempt: restart the worker process that runs it
        (see the module docstring). Nothing if no attempt of it runs on a worker now (it
        ended: its outcome is on its way; the request is answered True at once)."""
        item = request.item
        sub = next((s for s in self._running.values() if s.item is item), None)
        if sub is None or sub.ended or (sub.future is not None and sub.future.done()):
            request.answer(True)
            return
        asked = self._terminating.setdefault(sub.sub_id, (sub, []))[1]
        asked.append(request)
        if len(asked) > 1:
            return  # (asked for already)
        worker = sub.worker
        log.warning("task %d: terminating its attempt %d: restarting Dask worker %s (its other "
                    "running attempts will run again, not charged)", item.task_id,
                    item.attempts, worker.address)
        if worker.address not in self._restarts:  # (else a restart is under way already)
            self._restart(worker, time.monotonic())

    def _restart(self, worker: DaskWorker, now: float) -> None:
        """Restart ``worker``'s process (a hard timeout, a terminate); the calls it holds
        and has not started are recalled first, to run elsewhere."""
        self._restarts[worker.address] = now
        self._link.restart_worker(worker.address)
        calls = [(s.sub_id, s.key) for s in worker.subs.values() if not s.started]
        if calls and not worker.recall_sent:
            self._send_recall(worker, calls)

    def _held_ended(self, sub: Submission) -> None:
        """A timed-out call's Dask task ended after all: its slot frees, unless its worker's
        restart is under way (then the restart's answer frees it)."""
        if sub.worker.address in self._restarts:
            sub.ended = True
        else:
            self._to_release.append(self._forget_sub(sub))

    def _on_restarted(self, address: str, error: BaseException | None) -> None:
        """The answer to a restart: the held slots of ``address`` free once the worker is
        back (or gone for good); if it could not be restarted, they free as their tasks end,
        and the attempts being terminated run on (their requests are answered False)."""
        asked = self._restarts.pop(address, None)
        held = [sub for sub in self._held.values() if sub.worker.address == address]
        worker = self._workers.get(address)
        terminating = [sub for sub, _ in self._terminating.values()
                       if sub.worker.address == address]
        if error is None:
            log.warning("Dask worker %s restarted (%.2f s after the request)", address,
                        time.monotonic() - (asked or 0.0))
            # (if its removal was not heard of yet: the attempts being terminated end
            # cancelled, the others run again, not charged)
            self._on_worker_lost(address, "taskorch restarted it", restarted=True)
        elif held and (not self._warned_no_restart or not isinstance(error, ValueError)):
            self._warned_no_restart = True  # (a hard timeout asked for it, not a terminate)
            log.warning(
                "could not restart Dask worker %s after a task overran its timeout (%s: %s): "
                "its attempt failed on time all the same, but its thread stays busy until the "
                "task returns. Run Dask workers under a nanny (the default of 'dask worker') "
                "so that taskorch can restart them", address, type(error).__name__, error)
        for sub in terminating:  # (lost as Terminated, or ended: answered already)
            runs_on = error is not None and sub.sub_id in self._subs
            self._answer_terminate(sub, granted=not runs_on)
            if runs_on:  # only a restart could stop it
                log.warning("task %d could not be terminated: Dask worker %s was not "
                            "restarted (%s: %s; a worker needs a nanny for that): it runs "
                            "on", sub.item.task_id, address, type(error).__name__, error)
        if error is not None and worker is not None:
            held = [sub for sub in held if sub.ended]  # the others free as their tasks end
        futures = [self._forget_sub(sub) for sub in held]
        self._link.cancel(futures)
        if error is None:
            self._probe_workers()  # learn of its successor

    def _answer_terminate(self, sub: Submission, granted: bool, keep: bool = False) -> bool:
        """Answer the terminate requests of ``sub`` (if it has any: True), and forget them
        unless ``keep`` (its loss, to come, ends the task cancelled)."""
        entry = self._terminating.get(sub.sub_id) if keep else (
            self._terminating.pop(sub.sub_id, None))
        for request in entry[1] if entry is not None else ():
            request.answer(granted)
        return entry is not None

    # -- lost calls and workers ---------------------------------------------------------------

    def _on_dask_error(
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
                return  # _handle hands back PoolBroken; the core then settles everything
            self._forget_sub(sub)  # cancelled already
            self._crash_sub(sub, f"its Dask task was cancelled on the cluster ({exc})",
                            worker_lost=False)
            return
        # e.g. the worker cannot import taskorch, or the outcome does not deserialize.
        self._to_release.append(self._forget_sub(sub))
        log.error("task %d: its Dask task failed outside taskorch's worker function (%s: %s); "
                  "is the same taskorch installed on every Dask worker?", sub.item.task_id,
                  type(exc).__name__, exc)
        self._out.append(CannotRun(sub.item, exc))

    def _crash_sub(self, sub: Submission, why: str, worker_lost: bool = True,
                   restarted_for: str | None = None) -> None:
        """The attempt that started on ``sub.worker`` was lost: the core charges it; if it
        was being terminated, ends the task cancelled; if taskorch restarted its worker for
        another task (``restarted_for`` says why), runs it again, not charged."""
        item = sub.item
        if self._answer_terminate(sub, True):
            self._out.append(AttemptLost(item, Terminated(
                f"task {item.task_id} was cancelled while it ran (attempt {item.attempts}): "
                f"its Dask worker {sub.worker.address} was restarted"), (
                f"task {item.task_id}: attempt {item.attempts} terminated; ")))
            return
        if restarted_for is not None:
            self._out.append(AttemptLostUncharged(item, (
                f"task {item.task_id}: attempt {item.attempts} stopped: its Dask worker "
                f"{sub.worker.address} was restarted {restarted_for}; ")))
            return
        error = worker_lost_error(sub.pid, sub.worker.address, item.attempts, why, worker_lost)
        self._out.append(AttemptLost(item, error, (
            f"task {item.task_id}: attempt {item.attempts} of {item.policy.max_attempts} "
            f"lost: {error}; ")))

    def _forget_sub(self, sub: Submission) -> Any:
        """Stop tracking a call; return its distributed.Future (or None), for the caller to
        release (its outcome is in) or cancel (it must not run)."""
        self._subs.pop(sub.sub_id, None)
        self._running.pop(sub.sub_id, None)
        self._held.pop(sub.sub_id, None)
        sub.worker.subs.pop(sub.sub_id, None)
        self._answer_terminate(sub, True, keep=True)  # (gone, or it ended: no longer runs)
        future, sub.future = sub.future, None
        return future

    def _set_workers(self, nthreads: dict[str, int]) -> list[str]:
        joined = self._members.add(nthreads)
        self._out.append(WorkersChanged(len(self._workers)))
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
            self._out.append(WorkersRestarted(len(joined), None))

    def _probe_workers(self) -> None:
        """Ask the scheduler for its workers (asynchronously: the answer comes to the inbox)."""
        probe = self._members.next_probe()
        if probe is not None:
            self._link.ask_workers(probe)

    def _on_worker_lost(self, address: str, why: str, restarted: bool = False) -> None:
        """``address`` left: its calls not started go back, its running attempts are lost
        (not charged if taskorch had it ``restarted``, for another task's sake)."""
        worker = self._members.remove(address)
        if worker is None:
            return
        held = [sub for sub in worker.subs.values() if sub.sub_id in self._held]
        subs = [sub for sub in worker.subs.values() if sub.sub_id not in self._held]
        restarted_for = self._restarted_for(address, held, subs) if (
            restarted or address in self._restarts) else None
        self._out.append(WorkersChanged(len(self._workers)))
        futures = [self._forget_sub(sub) for sub in subs]
        if address not in self._restarts:  # else they hold their slots until its answer
            futures += [self._forget_sub(sub) for sub in held]
        requeue = [sub.item for sub in subs if not sub.started]
        if requeue:
            self._out.append(CallsReturned(requeue))
        for sub in subs:
            if sub.started:
                self._crash_sub(sub, why, restarted_for=restarted_for)
        self._link.cancel(futures)  # they wait in "no-worker" state: drop them
        log.warning("Dask worker %s lost (%s): %d call(s) it had not started re-queued, %d "
                    "running call(s) lost; %d threads left", address, why, len(requeue),
                    len(subs) - len(requeue), self._members.total_threads)

    def _restarted_for(self, address: str, held: list[Submission],
                       subs: list[Submission]) -> str:
        """Why taskorch restarted ``address``: the tasks it was restarted for."""
        why = [f"to terminate task {sub.item.task_id}" for sub in subs
               if sub.sub_id in self._terminating]
        why += [f"to stop task {sub.item.task_id} past its hard timeout" for sub in held]
        return " and ".join(why) or "by taskorch (a task overran its timeout, or was terminated)"

    def recall_unstarted(self, now: float) -> float | None:
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

    def recall_prefetched(self) -> None:
        for worker in self._workers.values():
            if worker.recall_sent or len(worker.subs) <= worker.nthreads:
                continue
            calls = [(s.sub_id, s.key) for s in worker.subs.values() if not s.started]
            if calls:
                self._send_recall(worker, calls)

    def recall(self, items: list[WorkItem]) -> list[WorkItem]:
        return items  # (a Dask task cannot be taken back for a cancel)

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
        futures = [self._forget_sub(sub) for sub in subs]
        self._out.append(CallsReturned([sub.item for sub in subs]))
        self._link.cancel(futures)
