"""Parent process, the Dask dispatcher thread: the hard timeout on Dask, a layer of the
dispatcher (``dask.DaskDispatcher`` sets up the attributes declared below and supplies the
methods this layer calls).

The hard timeout: the worker's in-process interrupt (``_worker.dask.ThreadTimer``) cannot reach
a thread blocked in C. When an attempt has run ``kill_grace`` past its policy's timeout (from
its start event) and no outcome or retry came, the core charges it (``_crash_locked``, a
``TaskTimeoutError``: retried only if the policy retries timeouts), as a local hard timeout
is, and the Dask worker process is restarted by its nanny: nothing else stops a Dask thread.
Until the restart's answer, the call holds its slot (``_held``: its worker gets no calls, and
it counts against ``worker_count``), so the in-flight bound holds while the stuck thread runs;
the worker's calls not started are recalled at once; when the worker leaves, the ones still
there go back uncharged and the ones running are charged a crash, as for any lost worker. A
worker without a nanny cannot be restarted (``Client.restart_workers`` refuses it, and taskorch
never shuts a worker down): a warning says so once, the attempt fails on time all the same, and
the slot stays held until its Dask task ends by itself.

Accepted races: a stuck attempt that returns to Python between the parent's hard timeout and
the worker's end may start another attempt there (tenacity retries inside the worker) while the
parent's retry runs elsewhere: after a hard timeout a task runs at least once, as after a
crash; its events are ignored. On a LocalCluster (a ``SpecCluster``), restarting the same
worker twice within ``distributed.deploy.lost-worker-timeout`` (15 s) may let the first
removal's timer close that worker's nanny (the restart then times out after
``RESTART_TIMEOUT``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskorch._parent.dask_cluster import ClusterLink, hard_timeout_error
from taskorch._parent.dask_pool import DaskWorker, Submission
from taskorch._parent.dispatch import DispatcherCore

log = logging.getLogger("taskorch")


class DaskHardTimeouts(DispatcherCore):
    # Set up by DaskDispatcher (dispatcher thread only).
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
    _warned_no_restart: bool
    _to_release: list[Any]

    def _send_recall(self, worker: DaskWorker, calls: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    def _forget_sub(self, sub: Submission) -> Any:
        raise NotImplementedError

    def _on_worker_lost(self, address: str, why: str) -> None:
        raise NotImplementedError

    def _probe_workers(self) -> None:
        raise NotImplementedError

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
        reach them (a thread blocked in C). The core charges each (``_crash_locked``, with a
        TaskTimeoutError: retried only if the policy retries timeouts), and each one's worker is
        restarted by its nanny: the only way to stop a Dask thread. Meanwhile the call holds
        its slot (``_held``), and its worker gets nothing more; its calls not started are
        recalled now (the rest come back uncharged, and the running ones are charged a crash,
        when the worker leaves)."""
        restart: list[DaskWorker] = []
        with self._backlog.locked():
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
                outcome = self._crash_locked(item, error)
                log.warning("task %d: attempt %d of %d still running %g s past its %g s timeout "
                            "on Dask worker %s; restarting it; %s", item.task_id, item.attempts,
                            item.policy.max_attempts, self._kill_grace, item.policy.timeout,
                            worker.address, outcome)
                if worker.address not in self._restarts and worker not in restart:
                    restart.append(worker)
        now = time.monotonic()
        for worker in restart:
            self._restarts[worker.address] = now
            self._link.restart_worker(worker.address)
            calls = [(s.sub_id, s.key) for s in worker.subs.values() if not s.started]
            if calls and not worker.recall_sent:
                self._send_recall(worker, calls)

    def _held_ended_locked(self, sub: Submission) -> None:
        """A timed-out call's Dask task ended after all: its slot frees, unless its worker's
        restart is under way (then the restart's answer frees it)."""
        if sub.worker.address in self._restarts:
            sub.ended = True
        else:
            self._to_release.append(self._forget_sub(sub))

    def _on_restarted(self, address: str, error: BaseException | None) -> None:
        """The answer to a restart: the held slots of ``address`` free once the worker is
        back (or gone for good); if it could not be restarted, they free as their tasks end."""
        asked = self._restarts.pop(address, None)
        held = [sub for sub in self._held.values() if sub.worker.address == address]
        worker = self._workers.get(address)
        if error is None:
            log.warning("Dask worker %s restarted (%.2f s after the request)", address,
                        time.monotonic() - (asked or 0.0))
        elif not self._warned_no_restart or not isinstance(error, ValueError):
            self._warned_no_restart = True
            log.warning(
                "could not restart Dask worker %s after a task overran its timeout (%s: %s): "
                "its attempt failed on time all the same, but its thread stays busy until the "
                "task returns. Run Dask workers under a nanny (the default of 'dask worker') "
                "so that taskorch can restart them", address, type(error).__name__, error)
        if error is not None and worker is not None:
            held = [sub for sub in held if sub.ended]  # the others free as their tasks end
        with self._backlog.locked():
            futures = [self._forget_sub(sub) for sub in held]
        self._link.cancel(futures)
        if error is None:
            self._on_worker_lost(address, "it was restarted after a task overran its timeout")
            self._probe_workers()  # learn of its successor
