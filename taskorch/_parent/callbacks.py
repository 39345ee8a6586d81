"""Parent process: the thread that runs futures' done-callbacks, "taskorch-callbacks".

A dispatcher thread never runs user code (``task``'s docstring says why): the future it
resolves queues its done-callbacks here (``callback_runner.submit``), and they run on this
one thread, in the order they were queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger("taskorch")

#: The callback thread waits this long for more work before it exits. Longer spares a thread
#: start (~0.1 ms) per completion when tasks finish slower than their callbacks run; shorter
#: leaves an idle thread around for less time. Its exit is never needed for correctness.
CALLBACK_IDLE_EXIT = 0.1
#: At interpreter exit, how long to let queued done-callbacks run (after the orchestrators'
#: own exit hook has stopped them, so that the callbacks of their last tasks run too) before
#: giving up on a callback that blocks.
CALLBACK_EXIT_TIMEOUT = 10.0



class InlineCallback:
    """A done-callback of taskorch's own that runs in the thread that resolves the future (a
    dispatcher's, mostly), not on this module's thread: a thread switch less per future. It
    must run no user code and never block but on the backlog's lock (futures are resolved
    outside it); ``intake``'s dependencies, which hand what would unpickle to ``submit``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Future[Any]], object]) -> None:
        self.fn = fn

    def __call__(self, future: Future[Any]) -> None:
        self.fn(future)


def run_or_queue(future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]) -> None:
    """A future's done-callbacks: the ``InlineCallback`` ones now, the others queued."""
    if any(type(callback) is InlineCallback for callback in callbacks):
        call_each(future, [c for c in callbacks if type(c) is InlineCallback])
        callbacks = [c for c in callbacks if type(c) is not InlineCallback]
        if not callbacks:
            return
    callback_runner.submit(future, callbacks)


def call_each(future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]) -> None:
    for callback in callbacks:
        try:
            callback(future)
        except BaseException:  # noqa: BLE001 - SystemExit too: not this thread's end
            log.exception("exception calling callback for %r", future)


class _CallbackRunner:
    """Runs done-callbacks on one thread, "taskorch-callbacks", in the order they were queued.

    Producers: whichever thread resolves a future (the dispatchers, ``stop()``'s settling),
    through ``submit()``, which never blocks on user code. Consumer: the thread, started on
    demand; it exits when the queue has stayed empty for ``CALLBACK_IDLE_EXIT``, so none is
    left behind by a stopped orchestrator. A daemon: a callback that never returns must not
    keep the interpreter alive; at exit, ``_drain_callbacks_at_exit`` gives the queue
    ``CALLBACK_EXIT_TIMEOUT`` to run. A callback that blocks delays only the callbacks queued
    after it (of every orchestrator in the process): no task, no dispatcher, no ``stop()``.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # `_lock` guards the queue, `_thread` and `_busy`; never held while a callback runs.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits here for callbacks
        self._idle = threading.Condition(self._lock)  # wait_idle() waits here
        self._queue: deque[tuple[Future[Any], list[Callable[[Future[Any]], object]]]] = deque()
        self._thread: threading.Thread | None = None  # alive (or starting), or None
        self._busy = False  # a batch is running outside the lock
        # The thread waits in ``_work`` (submit() notifies only then: a notify costs the
        # resolving thread, a dispatcher, a lock round trip per future otherwise).
        self._waiting = False

    def submit(self, future: Future[Any], callbacks: list[Callable[[Future[Any]], object]]) -> None:
        with self._lock:
            self._queue.append((future, callbacks))
            if self._thread is not None:
                if self._waiting:
                    self._work.notify()
                return
            thread = self._thread = threading.Thread(
                target=self._run, name="taskorch-callbacks", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no new threads (interpreter shutdown, 3.12+): run them here
            with self._lock:
                self._thread = None
                pending = list(self._queue)
                self._queue.clear()
            for fut, cbs in pending:
                call_each(fut, cbs)

    def _run(self) -> None:
        lock = self._lock
        while True:
            with lock:
                self._busy = False
                if not self._queue:
                    self._idle.notify_all()
                    self._waiting = True
                    self._work.wait(CALLBACK_IDLE_EXIT)  # woken by submit(), or times out
                    self._waiting = False
                    if not self._queue:
                        self._thread = None  # a later submit() starts a new thread
                        return
                batch = list(self._queue)  # all of them, in order: one lock round trip
                self._queue.clear()
                self._busy = True
            for future, callbacks in batch:
                call_each(future, callbacks)  # guarded: this loop never dies on a callback

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued callback has run; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queue and not self._busy, timeout)


callback_runner = _CallbackRunner()
# A forked child has none of the parent's threads: start afresh (its queue is the parent's).
os.register_at_fork(after_in_child=callback_runner._reset)


@atexit.register
def _drain_callbacks_at_exit() -> None:
    # Registered when this module is imported (by ``task``), so before the orchestrator
    # module's own exit hook, which therefore runs first (atexit runs hooks in reverse): the
    # orchestrators are stopped, every future resolved, then their callbacks get a bounded
    # time to run.
    if not callback_runner.wait_idle(CALLBACK_EXIT_TIMEOUT):
        log.warning("interpreter exit: done-callbacks still running after %g s; not waiting",
                    CALLBACK_EXIT_TIMEOUT)
