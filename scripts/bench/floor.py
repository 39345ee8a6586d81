"""The floor of the per-task cost (``--cost``): the bare mechanism taskorch's shape fixes, and
nothing else, to tell how much of taskorch's cost per task is the mechanism itself.

Runs in the cost section's process (the pool) and in its worker processes (``work``). What it
keeps, each in its cheapest form we found: a future per task (taskorch's own ``TaskFuture``; a
plain ``concurrent.futures.Future`` costs ~5 us more per task, about half of it the garbage
collector's), the call pickled in the caller's thread (plain pickle: no cloudpickle decision), a
bounded deque under one lock, one dispatcher thread, a pipe to each worker process with calls
and results batched (up to ``CREDIT`` calls a worker ahead), results unpickled on the dispatcher
thread in one call per batch (taskorch unpickles each in the caller's thread, ~0.9 us more, to
keep user code off its dispatcher). What it leaves out is everything else a task processor is
for: retries and timeouts, priorities and delays, crash isolation (a dead worker ends the floor:
every pending future fails), the exact bound's wait for room, cancel, progress, the tasks'
records, metrics and events, a bound on the bytes in flight (small calls and results only: a
large one both ways can block both ends). So its figure is the cheapest pool of this shape we
built in this interpreter, not a competitor.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import selectors
import threading
from typing import Any, Callable

from .pools import PoolAdapter

CREDIT = 64  # calls a worker holds ahead (taskorch's prefetch for tasks this short is similar)


def work(conn: Any) -> None:
    """A worker: run each batch of calls, send back one batch of results."""
    loads, dumps = pickle.loads, pickle.dumps
    while True:
        try:
            batch = loads(conn.recv_bytes())
        except EOFError:
            return
        if batch is None:
            return
        results = []
        for task_id, call in batch:
            fn, args, kwargs = loads(call)
            try:
                results.append((task_id, True, fn(*args, **kwargs)))
            except Exception as exc:  # noqa: BLE001 (the task's, sent back)
                results.append((task_id, False, exc))
        conn.send_bytes(dumps(results))


class FloorPool:
    """``submit`` and a future, as a pool; ``stop`` after every future is done."""

    def __init__(self, workers: int, max_backlog: int = 1_000_000) -> None:
        from taskorch._parent.task import TaskFuture

        self._future = TaskFuture
        self._queue: collections.deque[tuple[Any, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._max = max_backlog
        self._sleeping = False
        self._closed = False  # stop() called, or the dispatcher ended (submit refuses)
        self._wake_r, self._wake_w = os.pipe()
        context = multiprocessing.get_context("spawn")
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for _ in range(workers):
            mine, theirs = context.Pipe()
            proc = context.Process(target=work, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)
        self._thread = threading.Thread(target=self._dispatch, name="floor-dispatcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = pickle.dumps((fn, args, kwargs))
        future = self._future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the floor is stopped")
            if len(self._queue) >= self._max:
                raise RuntimeError("the floor's backlog is full")
            self._queue.append((future, call))
            if self._sleeping:  # (under the lock: stop() closes the pipe under it too)
                self._sleeping = False
                os.write(self._wake_w, b"x")
        return future

    def _dispatch(self) -> None:
        credit = {conn: CREDIT for conn in self._conns}
        pending: dict[int, Any] = {}
        next_id = 0
        selector = selectors.DefaultSelector()
        for conn in self._conns:
            selector.register(conn, selectors.EVENT_READ, conn)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._closed:
                with self._lock:
                    for conn in self._conns:
                        n = min(credit[conn], len(self._queue))
                        if not n:
                            continue
                        batch = []
                        for _ in range(n):
                            future, call = self._queue.popleft()
                            pending[next_id] = future
                            batch.append((next_id, call))
                            next_id += 1
                        credit[conn] -= n
                        conn.send_bytes(pickle.dumps(batch))
                    if not self._queue:
                        self._sleeping = True
                # No timeout: a wakeup lost would hang here, and the cost section's wait for a
                # result reports it (a timeout would hide it as a slow run).
                for key, _ in selector.select():
                    if key.data is None:
                        os.read(self._wake_r, 4096)
                        continue
                    conn = key.data
                    results = pickle.loads(conn.recv_bytes())
                    credit[conn] += len(results)
                    for task_id, ok, value in results:
                        future = pending.pop(task_id)
                        if ok:
                            future.set_result(value)
                        else:
                            future.set_exception(value)
        except (EOFError, OSError) as exc:  # a worker died: the floor ends
            with self._lock:
                self._closed = True
                queued = [future for future, _ in self._queue]
                self._queue.clear()
            for future in [*pending.values(), *queued]:
                future.set_exception(RuntimeError(f"a floor worker died: {exc!r}"))
        finally:
            selector.close()

    def stop(self, timeout: float) -> None:
        """After every future is done (pending ones are left unresolved); once."""
        with self._lock:
            if self._wake_w < 0:
                return
            self._closed = True
            os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
            proc.close()
        for conn in self._conns:
            conn.close()
        with self._lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1


class FloorAdapter(PoolAdapter):
    """The cost section's verbs for the floor (``cost.measure``); ``get`` is PoolAdapter's."""

    name = "floor"
    pool: FloorPool | None

    @staticmethod
    def preload() -> str:
        return "floor"

    def create(self) -> None:
        self.pool = FloorPool(self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        assert self.pool is not None
        return self.pool.submit(fn, *args)

    def stop(self, timeout: float) -> None:
        if self.pool is not None:
            self.pool.stop(timeout)
