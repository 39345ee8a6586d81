"""Beyond one machine: the same ``TaskOrchestrator`` on a Dask distributed cluster.

Install the extra (``pip install "taskorch[dask]"``, which brings ``distributed``), and give the
orchestrator a ``DaskBackend``::

    from taskorch import Policy, TaskOrchestrator
    from taskorch.dask import DaskBackend

    with TaskOrchestrator(backend=DaskBackend("tcp://scheduler:8786"), max_backlog=1000,
                          policy=Policy(retries=3, timeout=60)) as orchestrator:
        future = orchestrator.run(compact, "/data/db.sqlite")

``DaskBackend`` takes a scheduler address (taskorch opens its own ``distributed.Client`` for
each orchestrator and closes it when the orchestrator stops) or an existing synchronous
``distributed.Client`` (shared, never closed by taskorch). Nothing here imports ``distributed``
until a backend is created; ``import taskorch`` never does.

The same semantics as on local worker processes:

- the exact bounded backlog lives in the parent: ``run()`` raises ``QueueFullError`` (or drops),
  ``run_async()`` waits for room; a task is "queued" until it starts on a Dask worker;
- at most ``worker_count`` tasks run at once if it is given, else as many as the cluster has
  threads (``sum(nthreads)``), followed as workers join and leave (``o.worker_count`` tells the
  bound now);
- the policy is applied inside the Dask worker, under tenacity: retries with backoff cost no
  round trip; the per-attempt timeout raises ``TaskTimeoutError`` in the task's thread;
- the timeout holds: an attempt still running ``kill_grace`` (default 1 s) past its timeout
  (stuck in C code, where the in-thread interrupt cannot reach) fails on time with
  ``TaskTimeoutError`` (retried only if the policy retries timeouts), and its Dask worker
  process is restarted by its nanny (``Client.restart_workers``); the slot counts as busy until
  the worker is back; that worker's other tasks go back to the backlog uncharged, started or
  not (they did nothing wrong);
- ``run()`` returns ``concurrent.futures.Future`` handles (``attempts`` and ``seconds`` set);
  results and exceptions are unpickled only in the parent; ``stats()`` counts the same things;
- a Dask worker lost while it ran a task (killed, out of memory, segfault, a lost connection,
  ``KilledWorker``) is a crash of that task's attempt only: ``WorkerCrashedError``, retried
  after the policy's backoff while its attempt budget lasts; tasks it had not started go back
  to the backlog uncharged; other tasks are unaffected;
- ``stop()`` drains and returns on time: past its timeout, queued tasks are cancelled (on the
  cluster too) and running ones fail with ``TaskAbandonedError``;
- the circuit breaker works the same.

What differs from local workers, because the cluster's processes and threads are not ours:

- The hard timeout restarts a whole Dask worker process (a few seconds: its nanny waits 4 s for
  a graceful close, then kills it and starts another), and with it every task running there:
  each runs again, not charged (an attempt that ran may have had side effects). So does a
  terminate (``taskorch serve --dask``). Workers without a nanny (``dask worker
  --no-nanny``, in-process clusters) cannot be restarted: a warning says so at the first such
  timeout, the attempt fails on time all the same, and its thread stays busy (its slot too)
  until the task returns; a terminate is refused (the cancel answers False).
- ``stop(timeout)`` abandons a running task without stopping it: it runs on in its Dask
  thread, its result discarded.
- Tasks run in the Dask workers' threads, several per process: a task that changes process
  state (signal handlers, ``os.chdir``, environment variables, global module state) affects
  the others, and a CPU-bound pure-Python task needs workers with one thread each (``dask
  worker --nthreads 1 --nworkers N``) to get past the GIL.
- ``max_tasks_per_worker`` and ``max_memory_per_worker`` are refused (``ValueError``): a
  restart takes seconds and every task running in that worker process, so recycling shared
  workers on a count would cost other tasks; use the worker's own ``--memory-limit``, which
  its nanny enforces.
- ``worker_pids()`` is empty; ``stats().workers`` counts Dask workers, and ``worker_restarts``
  the workers that joined after the orchestrator started.
- taskorch must be installed on every Dask worker (the worker side is
  ``taskorch._worker.dask``), and a task's function must be importable there, or sent by value
  (lambdas, closures, ``__main__``), as for any Dask task. ``taskorch run`` sends a
  ``path/file.py:function`` target, and a ``module:function`` whose module was found only in
  the current directory, by value; an installed module by reference.
- A task handed to a Dask worker but not yet started when ``stop()``'s timeout expires may
  still start there; a task whose worker dies after it finished but before its result was
  fetched is run again (at least once, as after any crash).
- A Client that loses its scheduler loses every task it submitted: the orchestrator is then
  broken (unresolved futures and later ``run()`` calls raise ``OrchestratorBrokenError``).
- Each task costs a few scheduler messages (its start event, its result), so a Dask cluster
  pays off for tasks of milliseconds and more, not for microsecond ones. Start events, and
  outcomes up to 1 KiB, travel as scheduler events on a topic of the orchestrator's own: the
  scheduler keeps the last 1000 of each topic (``distributed.admin.low-level-log-length``),
  about 1 MB at most per orchestrator, after it has stopped too.
- Tasks are pinned to the worker taskorch chose (so that a lost worker's tasks are never re-run
  behind taskorch's back): Dask's work stealing does not move them; taskorch itself takes back
  the calls a busy worker has not started when another has a free thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskorch._parent.backend import Dispatcher, PoolConfig
    from taskorch._parent.backlog import Backlog

__all__ = ["DaskBackend"]


class DaskBackend:
    """Run an orchestrator's tasks on a Dask cluster (see this module's docstring).

    ``address`` is a scheduler address (``"tcp://host:8786"``) or a synchronous
    ``distributed.Client``; ``connect_timeout`` (seconds, default Dask's configured one) bounds
    connecting to an address. The constructor of ``TaskOrchestrator`` connects and raises
    ``OrchestratorBrokenError`` if the cluster cannot be used.
    """

    #: A Dask-backed orchestrator connects in its constructor: it starts no process here, and
    #: a wrong address or an option the cluster cannot honour fails there, at once.
    starts_lazily = False

    def __init__(self, address: Any, *, connect_timeout: float | None = None) -> None:
        try:
            import distributed
        except ImportError as exc:
            raise ImportError(
                "DaskBackend needs the 'distributed' package: pip install \"taskorch[dask]\""
            ) from exc
        if isinstance(address, distributed.Client):
            if address.asynchronous:
                raise ValueError(
                    "DaskBackend needs a synchronous distributed.Client (asynchronous=False): "
                    "taskorch calls it from its own thread"
                )
        elif not isinstance(address, str) or not address:
            raise ValueError(
                f"address must be a Dask scheduler address such as 'tcp://host:8786' or a "
                f"distributed.Client, got {address!r}"
            )
        if connect_timeout is not None and (
            isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float))
            or not connect_timeout > 0
        ):
            raise ValueError(f"connect_timeout must be a number > 0, got {connect_timeout!r}")
        self._address = address
        self._connect_timeout = connect_timeout

    @property
    def address(self) -> Any:
        """The scheduler address or Client this backend was given."""
        return self._address

    def create_dispatcher(self, backlog: Backlog, config: PoolConfig) -> Dispatcher:
        if config.max_tasks_per_worker is not None:
            raise ValueError(
                "max_tasks_per_worker cannot be honoured on Dask: the cluster's workers are not "
                "taskorch's to recycle; leave it unset (restart workers with Dask's own tools)"
            )
        if config.max_memory_per_worker is not None:
            raise ValueError(
                "max_memory_per_worker cannot be honoured on Dask: the cluster's workers are "
                "not taskorch's to recycle; use the Dask worker's --memory-limit instead"
            )
        from taskorch._parent.backend import DEFAULT_KILL_GRACE, dispatcher_over
        from taskorch._parent.dask import DaskPool

        return dispatcher_over(backlog, DaskPool(
            self._address, config.worker_count, config.policy_bytes, self._connect_timeout,
            DEFAULT_KILL_GRACE if config.kill_grace is None else config.kill_grace,
        ), config)

    def __repr__(self) -> str:
        return f"DaskBackend({self._address!r})"
