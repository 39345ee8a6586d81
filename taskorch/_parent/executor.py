"""Parent process, the caller's threads: ``taskorch.Executor``, a ``concurrent.futures.Executor``.

A thin adapter over ``TaskOrchestrator``: the same backlog, policy, crash isolation and stop,
behind the standard executor interface, so that code written for ``concurrent.futures``
(``loop.run_in_executor``, libraries that take an executor) runs on taskorch. The standard
contract, and where it meets taskorch's own:

- ``submit()`` never fails on a full backlog: it waits for room (the backlog stays bounded
  by ``max_backlog``). Called on an event loop's thread (``run_in_executor``), that wait
  blocks the loop: size ``max_backlog`` for the burst, or use ``await orchestrator.run_async``.
  A call that does not pickle raises ``SerializationError`` (a ``TypeError``) from submit()
  itself, with nothing enqueued: taskorch pickles in the caller.
- ``map()`` collects its input at once and submits every chunk before it returns (as
  ``concurrent.futures`` does), ``chunksize`` items per task (the chunks of
  ``TaskOrchestrator.map``); results come in order; ``timeout`` counts from the call.
- ``shutdown(wait, cancel_futures)`` is ``stop()`` without a deadline: what was accepted
  runs (or, with ``cancel_futures``, what has not started is cancelled, calls a worker holds
  unstarted included).
- A worker crash is not a broken pool: the task is retried under its policy, then fails with
  ``WorkerCrashedError``; the other tasks and the executor go on.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

from taskorch._errors import OrchestratorClosedError
from taskorch._parent.backend import Backend
from taskorch._parent.intake import Intake
from taskorch._parent.orchestrator import TaskOrchestrator
from taskorch._parent.task import TaskFuture, WorkItem
from taskorch._policy import CircuitBreaker, Features, Policy
from taskorch._wire import encode_call
from taskorch._worker.map import run_chunk

#: shutdown(wait=True) waits for everything accepted, however long: stop()'s deadline is this
#: far away (stop() takes a finite timeout; this one never expires in practice).
_NO_DEADLINE = 10.0 ** 9


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run in taskorch worker processes.

    ``max_workers`` is the orchestrator's ``worker_count`` (None: its default; must be > 0);
    the keyword arguments are ``TaskOrchestrator``'s (``max_backlog``, ``policy``,
    ``features``, ``kill_grace``, ``circuit_breaker``, ``backend``...). The orchestrator is
    ``orchestrator`` (for ``stats()``, ``worker_pids()``, ``with_policy()``). Futures are
    ``TaskFuture``s. Works with ``loop.run_in_executor(executor, fn, *args)``. See the module
    docstring for where the contract meets taskorch's.
    """

    def __init__(
        self, max_workers: int | None = None, *, max_backlog: int = 128,
        features: Features = Features.NONE, policy: Policy | None = None,
        kill_grace: float | None = None, max_tasks_per_worker: int | None = None,
        max_memory_per_worker: float | None = None,
        circuit_breaker: CircuitBreaker | None = None, backend: Backend | None = None,
    ) -> None:
        if max_workers is not None and (
                isinstance(max_workers, bool) or not isinstance(max_workers, int)
                or max_workers <= 0):
            raise ValueError(f"max_workers must be greater than 0, got {max_workers!r}")
        self._orchestrator = TaskOrchestrator(
            max_workers, max_backlog, features, policy, kill_grace=kill_grace,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker, circuit_breaker=circuit_breaker,
            backend=backend,
        )
        self._orchestrator.start()  # at once, as concurrent.futures' executors do
        # The tasks this executor accepted and that are alive (the dispatcher holds a task's
        # item until it ends): what shutdown(cancel_futures=True) cancels. Weak: a finished
        # task the caller dropped is not kept.
        self._items: weakref.WeakSet[WorkItem] = weakref.WeakSet()
        # Guards `_items` and `_shut_down`: submit() adds under it after checking
        # `_shut_down`, so that shutdown(cancel_futures=True) sees every task accepted before.
        self._lock = threading.Lock()
        self._shut_down = False
        _live.add(self)

    @property
    def orchestrator(self) -> TaskOrchestrator:
        return self._orchestrator

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)``; return its Future. Waits for room in the backlog;
        RuntimeError after ``shutdown()``; SerializationError if the call does not pickle."""
        intake = self._orchestrator.intake
        item = intake.prepare_call(fn, args, kwargs)
        return self._offer(item)

    def _offer(self, item: WorkItem) -> TaskFuture:
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._items.add(item)
        future = self._orchestrator.intake.offer_blocking(item)
        if future is None:  # cannot happen without a deadline
            raise OrchestratorClosedError("the task was not accepted")
        return future

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``fn(*items)`` for each set of items, results in order, as ``concurrent.futures``'
        map: the input is collected and submitted at once, ``chunksize`` items per task; the
        iterator raises ``TimeoutError`` if a result is not there ``timeout`` seconds after
        this call, and the first exception of ``fn`` when it reaches that item. Closing the
        iterator early cancels the chunks not started."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        end_time = None if timeout is None else timeout + time.monotonic()
        star = len(iterables) != 1
        items = iter(zip(*iterables) if star else iterables[0])
        intake = self._orchestrator.intake
        chunks: list[WorkItem] = []
        try:
            while chunk := list(itertools.islice(items, chunksize)):
                item = intake.prepare(encode_call(run_chunk, (fn, chunk, False, star), {}))
                self._offer(item)
                chunks.append(item)
        except BaseException:
            intake.cancel(chunks)
            raise
        return _results_in_order(chunks, end_time, intake)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with ``cancel_futures``, cancel every task not started; with
        ``wait``, return once every task has ended and the workers are gone (no deadline:
        use ``orchestrator.stop(timeout)`` for one). Idempotent."""
        with self._lock:
            self._shut_down = True
            items = list(self._items) if cancel_futures else []
        orchestrator = self._orchestrator
        if items:
            orchestrator.intake.cancel(items)
        if wait:
            orchestrator.stop(_NO_DEADLINE)
        else:
            orchestrator.intake.close(_NO_DEADLINE)

    def __repr__(self) -> str:
        return f"<taskorch.Executor {self._orchestrator!r}>"


# Executors alive in this process. In a forked child (one thread), at the fork: `_lock` may
# have been copied held, and `_items` are the parent's tasks (the orchestrator fails them).
_live: weakref.WeakSet[Executor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for executor in list(_live):
        executor._lock = threading.Lock()
        executor._items = weakref.WeakSet()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _results_in_order(chunks: list[WorkItem], end_time: float | None,
                      intake: Intake) -> Iterator[Any]:
    """Yield each chunk's results in order. Holds no reference to a result it has yielded
    (nor to a chunk it is done with), as ``concurrent.futures`` (bpo-14406); cancels the
    chunks left (at once: one recall per worker) when it is closed or fails."""
    chunks.reverse()  # pop() from the end: the first chunk first
    try:
        while chunks:
            future = chunks[-1].future
            if end_time is None:
                results = future.result()
            else:
                results = future.result(end_time - time.monotonic())
            chunks.pop()
            del future
            results.reverse()
            while results:
                yield results.pop()  # (no local name: it would keep the result alive)
    finally:
        if chunks:
            intake.cancel(chunks)
