"""Parent process, the Dask dispatcher thread: its view of the cluster, the workers
(``DaskWorker``) with what is pinned to each (``Submission``), and the membership (who is
there, learned from events and probes).

Bounds: a call handed to Dask stays "queued" in the backlog until its Started event arrives,
so the backlog bound is exact as locally. What runs at once is bounded by the cluster's
threads: each call is pinned to one worker (``workers=[w]``, ``allow_other_workers=False``),
and each worker gets at most its ``nthreads`` plus a prefetch sized from its recent task
durations (``PREFETCH_SECONDS``), so tiny tasks stream without a round trip each. With an
explicit ``worker_count`` smaller than the cluster's threads, at most that many calls are
handed over at all. A worker with a free thread while another holds calls it has not started
behind a slow task makes the dispatcher *recall* them (``_worker.dask.recall_unstarted`` on
the busy worker's event loop, which marks the calls that have not begun so that they never
run): the ones it confirms go back to the front of the backlog, uncharged.

Why pin: when a worker dies, the scheduler re-runs the tasks it was processing on another
worker, up to ``allowed_failures`` times, without telling the client. A re-run is an attempt
the policy did not allow, with no backoff, and perhaps a second run of a task whose first run
had side effects. A pinned task whose worker is gone cannot run anywhere ("no-worker"): the
dispatcher learns of the loss from the "remove-worker" event (or a ``KilledWorker`` outcome, or
the worker probe), cancels the worker's calls, charges an attempt to each call that had
started there (``WorkerCrashedError``, retried after the policy's backoff while the budget
lasts, as the local dispatcher does) and puts the others back in the backlog, uncharged. A call
that started may have had side effects: after a loss a task runs at least once, not exactly
once. A result that was computed but not yet gathered when its worker died is lost too: that
call is retried like a crash.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskorch._parent.task import WorkItem

log = logging.getLogger("taskorch")

#: Prefetch to a worker, per thread, as many calls as fit in this much expected run time (from
#: its recent task durations), and at least one once a duration is known: the round trip
#: through the scheduler (10-20 ms on a local cluster, more across a network) would otherwise
#: idle the thread between two tasks. More hides it for tiny tasks; less limits how long a
#: call waits behind a slow one (recall bounds that: see SLOW_AFTER).
PREFETCH_SECONDS = 0.05
#: At most this many calls handed to a worker per thread, beyond the ones it runs.
MAX_PREFETCH = 32
#: A worker that has reported nothing for this long while it holds calls is treated as busy
#: with long tasks: it gets no prefetch, and while another worker has a free thread, its calls
#: not started are recalled. Several scheduler round trips, so a busy stream of short tasks is
#: not mistaken for a slow one.
SLOW_AFTER = 0.25
#: While calls are on the cluster, ask the scheduler for its workers this often: a safety net
#: for a "remove-worker" event that never reached us (someone replaced the "all" topic handler
#: of a shared Client, a reconnect), without which calls pinned to a dead worker would wait
#: forever.
WORKER_PROBE_INTERVAL = 5.0


class DaskWorker:
    """A Dask worker as the dispatcher sees it (dispatcher thread only)."""

    __slots__ = ("address", "nthreads", "subs", "ewma_seconds", "last_progress", "recall_sent")

    def __init__(self, address: str, nthreads: int) -> None:
        self.address = address
        self.nthreads = max(1, nthreads)
        # Calls pinned here without an outcome, in hand-over order.
        self.subs: dict[int, Submission] = {}
        self.ewma_seconds: float | None = None  # recent task duration, for the prefetch depth
        self.last_progress = time.monotonic()  # last event or outcome, or hand-over while idle
        self.recall_sent = False  # a recall is unanswered

    def room(self, now: float) -> int:
        depth = self.nthreads
        ewma = self.ewma_seconds
        if ewma is not None and not (self.subs and now - self.last_progress > SLOW_AFTER):
            ahead = max(1, min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(ewma, 1e-6))))
            depth += self.nthreads * ahead
        return depth - len(self.subs)

    def record_duration(self, seconds: float) -> None:
        ewma = self.ewma_seconds
        self.ewma_seconds = seconds if ewma is None else 0.8 * ewma + 0.2 * seconds


class Submission:
    """One submission of a call to Dask (a task's attempts after a crash are new ones)."""

    __slots__ = ("sub_id", "item", "key", "worker", "future", "started", "pid", "ended")

    def __init__(self, sub_id: int, item: WorkItem, key: str, worker: DaskWorker) -> None:
        self.sub_id = sub_id
        self.item = item
        self.key = key
        self.worker = worker
        self.future: Any = None  # the distributed.Future, once submitted
        self.started = False  # its Started event arrived: it may have had side effects
        self.pid: int | None = None  # the Dask worker process running it
        self.ended = False  # its Dask task finished: no hard timeout while its outcome comes


class Membership:
    """The workers the dispatcher knows of: from the scheduler's events (join, remove) and
    its answers to probes, which may be older than an event (``removed`` tells which)."""

    def __init__(self) -> None:
        self.workers: dict[str, DaskWorker] = {}
        self.total_threads = 0  # an int, read by any thread
        self.probe_in_flight = False  # one probe at a time, so answers come in order
        self.probe_again = False  # a worker joined while one was in flight
        self.probes_sent = 0
        # Workers removed by an event -> the probe in flight then (a snapshot taken before the
        # removal must not bring them back).
        self._removed: dict[str, int] = {}

    def add(self, nthreads: dict[str, int]) -> list[str]:
        """Workers seen (address -> threads); returns the addresses new to us."""
        joined = [a for a in nthreads if a not in self.workers]
        for address in joined:
            self.workers[address] = DaskWorker(address, int(nthreads[address]))
        self.total_threads = sum(w.nthreads for w in self.workers.values())
        return joined

    def remove(self, address: str) -> DaskWorker | None:
        worker = self.workers.pop(address, None)
        if worker is not None:
            self._removed[address] = self.probes_sent
            self.total_threads = sum(w.nthreads for w in self.workers.values())
        return worker

    def next_probe(self) -> int | None:
        """The number of a probe to send now, or None if one is in flight (another follows)."""
        if self.probe_in_flight:
            self.probe_again = True
            return None
        self.probe_in_flight = True
        self.probe_again = False
        self.probes_sent += 1
        return self.probes_sent

    def answered(
        self, nthreads: dict[str, int] | None, probe: int,
    ) -> tuple[list[str], dict[str, int]]:
        """Probe ``probe``'s answer (None: the request failed): (the known workers it no longer
        lists, the workers it lists that no later event removed)."""
        self.probe_in_flight = False
        if nthreads is None:
            return [], {}
        gone = [a for a in self.workers if a not in nthreads]
        stale = {a for a, seen_by in self._removed.items() if seen_by >= probe}
        self._removed = {a: seen_by for a, seen_by in self._removed.items() if seen_by > probe}
        return gone, {a: n for a, n in nthreads.items() if a not in stale}
