"""Parent process: the one seam between the orchestrator and what runs the tasks.

``TaskOrchestrator`` owns the bounded ``Backlog`` (the exact bound, the futures, the counts)
and hands it to a *dispatcher*, made by a ``Backend``: the one core (``_parent.dispatch``),
which owns the task life, composed with a worker pool (``_parent.pool.WorkerPool``) that
owns how the tasks run (``dispatcher_over``). Two backends exist:

- ``LocalBackend`` (the default): worker processes on this machine, started with loky, each
  with a private channel (``_parent.local.LocalPool``, ``_parent.process``, ``_worker``);
- ``taskorch.dask.DaskBackend``: a Dask distributed cluster (``_parent.dask.DaskPool``).

A dispatcher owns one thread, which it starts in ``start()`` and which ends, with every
accepted task resolved, once the backlog is closed and drained (``drained`` True) or its stop
deadline passed (``drained`` False); ``finished`` is set then.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Protocol

from taskorch._policy import CircuitBreaker, Policy, check_int, check_number
from taskorch._wire import encode_policy

if TYPE_CHECKING:
    from taskorch._parent.backlog import Backlog
    from taskorch._parent.figures import WorkerView
    from taskorch._parent.pool import WorkerPool
    from taskorch._parent.task import WorkItem


#: Seconds a local task may run past its timeout, unresponsive, before its worker is killed.
DEFAULT_KILL_GRACE = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """What a TaskOrchestrator was asked for, as a backend sees it."""

    worker_count: int | None  # None: the backend's own default (local: 2; Dask: cluster threads)
    policy: Policy
    policy_bytes: bytes  # the policy pickled once, for the workers
    kill_grace: float | None  # None: not given (the backend's default)
    max_tasks_per_worker: int | None
    max_memory_per_worker: float | None
    circuit_breaker: CircuitBreaker | None

    @classmethod
    def checked(
        cls, *, worker_count: int | None, policy: Policy | None, kill_grace: float | None,
        max_tasks_per_worker: int | None, max_memory_per_worker: float | None,
        circuit_breaker: CircuitBreaker | None,
    ) -> PoolConfig:
        """The TaskOrchestrator's arguments, checked (ValueError), the policy pickled."""
        if worker_count is not None:
            check_int("worker_count", worker_count, minimum=1)
        if policy is None:
            policy = Policy.default()
        elif not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        if kill_grace is not None:
            check_number("kill_grace", kill_grace)
        if max_tasks_per_worker is not None:
            check_int("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        if max_memory_per_worker is not None:
            check_number("max_memory_per_worker", max_memory_per_worker)
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise ValueError(
                f"circuit_breaker must be a taskorch.CircuitBreaker, got {circuit_breaker!r}")
        return cls(
            worker_count=worker_count, policy=policy, policy_bytes=encode_policy(policy),
            kill_grace=kill_grace, max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker, circuit_breaker=circuit_breaker,
        )


class Dispatcher(Protocol):
    thread: threading.Thread  # its one thread (stop() must not wait on itself)
    finished: threading.Event  # set when the thread has ended
    drained: bool | None  # None while running; then whether everything ran to completion

    @property
    def pids(self) -> tuple[int, ...]:
        """Worker processes on this machine (empty for remote ones). Any thread."""

    @property
    def recalls_for_cancel(self) -> bool:
        """Can a call handed over and not started be taken back, for a cancel?"""

    def start(self) -> None:
        """Start the thread and the workers; raise OrchestratorBrokenError if none can start."""

    def wake(self) -> None:
        """Look at the backlog soon (new tasks, or stop() was called). Any thread."""

    def effective_worker_count(self) -> int:
        """How many tasks may run at once now."""

    def status_details(self) -> dict[str, Any]:
        """For ``taskorch status``: each worker, and the oldest queued task's age. Any thread."""

    def worker_views(self) -> list[WorkerView]:
        """The workers now, for the dashboard (any thread)."""

    def terminate(self, item: WorkItem) -> bool:
        """Kill the running attempt of ``item``, which then ends cancelled (``terminate``);
        False if it is not running an attempt on a worker this pool can kill. Any thread."""


class NothingRan:
    """The dispatcher of an orchestrator not started yet (``started`` False: it starts on
    first use), or stopped before any use (in this process, or in a forked child): no
    thread, no worker, nothing ran (``stop()`` then costs nothing)."""

    pids: tuple[int, ...] = ()
    recalls_for_cancel = False

    def __init__(self, *, started: bool, worker_count: int = 0) -> None:
        self.thread = threading.Thread()  # never started: stop() is never called from it
        self.finished = threading.Event()
        self.drained: bool | None = True if started else None
        self._worker_count = worker_count  # what start() will ask for
        if started:
            self.finished.set()

    def start(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def effective_worker_count(self) -> int:
        return self._worker_count

    def status_details(self) -> dict[str, Any]:
        return {"workers": [], "oldest_queued_seconds": None}

    def worker_views(self) -> list[WorkerView]:
        return []

    def terminate(self, item: WorkItem) -> bool:
        return False


class Backend(Protocol):
    # Optional class attribute ``starts_lazily`` (default True): False makes the orchestrator
    # start its dispatcher in its constructor (DaskBackend: it checks the cluster at once).

    def create_dispatcher(self, backlog: Backlog, config: PoolConfig) -> Dispatcher:
        """A dispatcher for one orchestrator (not started)."""


def dispatcher_over(backlog: Backlog, pool: WorkerPool, config: PoolConfig) -> Dispatcher:
    """The dispatcher core over ``pool`` for the orchestrator of ``backlog`` (not started)."""
    from taskorch._parent.dispatch import DispatcherCore

    return DispatcherCore(backlog, pool, config.circuit_breaker)


class LocalBackend:
    """Worker processes on this machine (the default)."""

    def create_dispatcher(self, backlog: Backlog, config: PoolConfig) -> Dispatcher:
        from taskorch._parent.local import LocalPool

        return dispatcher_over(backlog, LocalPool(
            config.worker_count or 2, config.policy_bytes,
            kill_grace=DEFAULT_KILL_GRACE if config.kill_grace is None else config.kill_grace,
            max_tasks_per_worker=config.max_tasks_per_worker,
            max_memory_per_worker=config.max_memory_per_worker,
        ), config)

    def __repr__(self) -> str:
        return "LocalBackend()"
