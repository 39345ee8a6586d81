"""Parent process, any thread: the condition of every ``TaskFuture`` (``task``).

``concurrent.futures.Future`` makes a ``threading.Condition()`` per future: a Python object
around an ``RLock``, five bound methods stored on it and a deque of waiters, eight objects the
cyclic garbage collector tracks. Every task alive holds its future, and a program that keeps
50,000 futures (``[pool.run(f) for ...]`` then the results) pays for them on every full
collection: measured in a local pool, the collections cost 5-10 us of the parent's CPU per
task (``gc.callbacks``), as much as the dispatcher itself; in ``taskorch serve`` about 50 us
(see docs/durability.md). ``FutureCondition`` is one object: the ``RLock`` itself (a subclass
of CPython's C lock), with the condition's waiters in a list made only when a thread waits.
Entering and leaving it (``with future._condition``, four times per task) is then the C
lock's own ``__enter__``/``__exit__``, not a Python call each.

Reentrant, as the stdlib's: a signal handler or a finalizer may touch a future while its thread
holds the condition. The users are ``concurrent.futures``' own (``Future``'s methods, ``wait``
and ``as_completed``, which take ``_condition`` with ``acquire``/``release``) and ``task``:
they use ``with``, ``acquire``, ``release``, ``wait`` and ``notify_all``; ``notify`` completes
the ``threading.Condition`` interface.
"""

from __future__ import annotations

import _thread
from typing import TYPE_CHECKING, Any

_new_lock = _thread.allocate_lock


class FutureCondition(_thread.RLock):  # type: ignore[misc]  # (typeshed: final; it is not)
    """A condition variable that is its own reentrant lock (see the module docstring)."""

    __slots__ = ("sleepers",)

    if TYPE_CHECKING:  # the C lock's own, which typeshed leaves out
        def _is_owned(self) -> bool: ...
        def _release_save(self) -> Any: ...
        def _acquire_restore(self, state: Any) -> None: ...

    def __init__(self) -> None:
        # One lock per waiting thread, each held until notify releases it (None: nobody waits;
        # read by ``task.TaskFuture``, which skips notify_all then).
        self.sleepers: list[Any] | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock (all its recursion levels), sleep until notified or ``timeout``
        s, take it back as it was; True if notified. The caller must hold the lock."""
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        sleeper = _new_lock()
        sleeper.acquire()
        if self.sleepers is None:
            self.sleepers = []
        self.sleepers.append(sleeper)
        held = self._release_save()
        woken = False
        try:
            if timeout is None:
                woken = sleeper.acquire()
            elif timeout > 0:
                woken = sleeper.acquire(True, timeout)
            else:
                woken = sleeper.acquire(False)
            return woken
        finally:
            self._acquire_restore(held)
            if not woken and self.sleepers is not None:  # (gone, unless notified meanwhile)
                try:
                    self.sleepers.remove(sleeper)
                except ValueError:
                    pass

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiting threads (the longest waiting first). The caller must hold
        the lock."""
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        sleepers = self.sleepers
        if not sleepers:
            return
        woken, self.sleepers = sleepers[:n], sleepers[n:] or None
        for sleeper in woken:
            sleeper.release()

    def notify_all(self) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        sleepers = self.sleepers
        if sleepers:
            self.sleepers = None
            for sleeper in sleepers:
                sleeper.release()
