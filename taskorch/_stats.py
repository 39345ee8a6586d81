"""The frozen snapshots returned by ``stats()`` and ``stop()`` (parent process), and the
task records of ``taskorch serve`` (``TaskInfo``, ``Progress``: the server, its clients; a
worker builds a ``Progress`` for ``taskorch.progress()``)."""

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


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A running task's latest ``taskorch.progress()`` report: ``done`` of ``total`` (None:
    unknown), an optional ``message``, and ``at`` (Unix time, the worker's clock)."""

    done: float
    total: float | None = None
    message: str | None = None
    at: float = 0.0


#: The states a ``TaskInfo`` may name (``waiting``: queued, held back by a not-before time, a
#: dependency or a per-name limit).
TASK_STATES = ("queued", "waiting", "running", "succeeded", "failed", "cancelled",
               "abandoned", "expired")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """One task's record as ``taskorch serve`` keeps it (``Client.tasks()``, ``Client.task()``,
    ``taskorch tasks``, the HTTP API and the dashboard are views of it). Times are Unix time;
    ``error`` is "Type: message"; ``args_repr`` and ``result_repr`` are bounded reprs (of plain
    data only: the server never unpickles a task's own objects); ``retry_of``: the task this
    one was submitted again for (``Client.retry()``)."""

    id: int
    name: str
    state: str
    attempts: int
    accepted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker_pid: int | None = None
    priority: int = 0
    key: str | None = None
    error: str | None = None
    traceback: str | None = None
    args_repr: str | None = None
    result_repr: str | None = None
    progress: Progress | None = None
    retry_of: int | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain data (the wire, JSON): ``progress`` as a dict or None."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> TaskInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in fields.items() if k in known}
        progress = values.get("progress")
        if isinstance(progress, dict):
            values["progress"] = Progress(**progress)
        return cls(**values)  # type: ignore[arg-type]
