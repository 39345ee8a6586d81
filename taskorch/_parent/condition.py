"""Parent process, any thread: the condition of every ``TaskFuture`` (``task``)."""

from __future__ import annotations

import _thread
import threading
from collections import deque
from typing import Any

# The C lock itself: ``threading.RLock`` is a Python function that makes one (a call per task
# saved on run()'s path).
_new_rlock = getattr(_thread, "RLock", threading.RLock)


class FutureCondition(threading.Condition):
    """A future's ``_condition``: a ``threading.Condition`` on an ``RLock``, as
    ``concurrent.futures`` makes it, without the five bound methods that
    ``Condition.__init__`` stores on each instance (they are methods of the class here). Why:
    every task alive holds its future, and a plain ``Condition()`` makes eight objects the
    cyclic garbage collector tracks; with 20,000 tasks queued, the collector's passes over them
    cost ``taskorch serve`` about 50 us of CPU per task (measured with ``gc.callbacks``; see
    docs/durability.md). Three objects here. Reentrant, as the stdlib's: a signal handler or
    a finalizer may touch a future while its thread holds the condition."""

    def __init__(self) -> None:  # (no super().__init__: see the class docstring)
        self._lock: threading.RLock = _new_rlock()
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]
