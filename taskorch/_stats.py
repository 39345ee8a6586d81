"""Parent process: the frozen snapshots returned by ``stats()`` and ``stop()``."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stats:
    """A consistent snapshot of an orchestrator's counts, taken under its lock.

    Accepted tasks: ``submitted == queued + running + succeeded + failed + cancelled +
    abandoned`` at every snapshot. Tasks that were never accepted are counted apart:
    ``rejected`` (run() raised QueueFullError) and ``dropped`` (ALLOW_SYNC_TASK_DROP).
    ``retried`` counts attempts after the first, whatever caused them (an exception, a
    timeout, a worker crash).
    """

    submitted: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    abandoned: int
    retried: int
    dropped: int
    rejected: int
    workers: int  # worker processes alive now
    worker_restarts: int  # workers started to replace one that died, was killed or retired
    crashes: int  # worker deaths while running a task (kills by the hard timeout included)
    timeouts: int  # attempts that ran past their timeout (interrupted or killed)
    breaker_state: str  # "closed", "open" or "half_open" ("closed" without a breaker)
    expired: int = 0  # not started by their ``expires`` time: ended without running
    delayed: int = 0  # queued tasks waiting for their ``delay``/``at`` time (in ``queued``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopReport:
    """What stop() did. ``drained`` is True when every accepted task reached succeeded or
    failed before the timeout; otherwise queued tasks were cancelled and running ones
    abandoned. The counts are for the orchestrator's whole life."""

    drained: bool
    succeeded: int
    failed: int
    cancelled: int
    abandoned: int
    seconds: float  # how long stop() took
