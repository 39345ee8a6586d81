"""Parent process: the backlog's waiting rules beyond order and time (``order``): unique keys
(``options(key=)``), dependencies (``options(after=)``) and per-name limits (``limits``).

``Waits`` belongs to the ``Backlog`` and is guarded by its lock (every method, but
``next_due``), like the ``TaskOrder`` it shares with it. A task that waits here is accepted and
queued: it counts in the bound, holds no worker, and is not in the ready tasks, so it blocks
nobody behind it. ``WorkItem.waiting_for`` says why it waits (``waiting_for``).

- **Keys**: while a task with a key is accepted and not finished, a task offered with the same
  key joins it (``join``: it takes that task's id and future; nothing is enqueued).
- **Dependencies**: a task with ``after`` waits here until each listed task has ended. Each
  dependency's future gets a done-callback (``Backlog.dependency_ended``, registered by the
  intake once the task is accepted, or at once in the registering thread if that dependency
  is done), so nothing here polls. A success releases the dependant in the thread that
  resolves the dependency's future, with no thread hop (``intake._dependency_done``, an
  ``InlineCallback``): a dispatcher thread, or in ``taskorch serve`` the journal's writer
  (served dependencies are resolved from committed outcomes). Hazard: that thread takes the
  backlog's lock there, so a future of a task that others run after must never be resolved
  with that lock held (the dispatcher resolves after it: ``rules.TaskRules.flush``), and
  whoever holds the backlog's lock must never wait for the journal's writer. A failure goes
  to the "taskorch-callbacks" thread (failing the dependant unpickles the dependency's
  exception: user code). When the last one succeeded the task joins the ready tasks (or
  its not-before heap); when one did not (failed, cancelled, expired) it ends ``failed`` with
  ``DependencyFailedError`` (``fail_dependant``, after the lock), and its own dependants
  follow through their callbacks on its future. A task with an expiry has it watched by the
  order while it waits here, for dependencies or a limit (``TaskOrder.track_expiry``): at its
  time it is taken out (``remove``) and ends expired, never run, and its own dependants fail.
- **Limits**: see ``limits``; what a freed slot or a token releases goes back to the front of
  the ready tasks of its priority (it was taken before those behind it).
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Callable

from taskorch._errors import DependencyFailedError
from taskorch._options import Limit
from taskorch._parent.limits import Limits
from taskorch._parent.order import TaskOrder
from taskorch._parent.task import RawOutcome, TaskFuture, TaskState, WorkItem
from taskorch._wire import decode_exception

#: ``WorkItem.waiting_for`` while a task waits for its dependencies; ``limits.LIMIT`` for a
#: limit; ``TIME`` is what ``waiting_for`` says of one whose ``not_before`` has not come.
DEPENDENCY = "dependency"
TIME = "time"


class Waits:
    """Keys, dependencies and limits of one backlog (its lock)."""

    __slots__ = ("_order", "limits", "_dependants", "_keys")

    def __init__(self, order: TaskOrder, limits: dict[str, Limit],
                 monotonic: Callable[[], float]) -> None:
        self._order = order  # the backlog's: released tasks go back there
        # None without limits: the dispatcher's take then never looks for one.
        self.limits = Limits(limits, monotonic) if limits else None
        # Tasks waiting for dependencies, and how many of their dependencies have not ended.
        self._dependants: dict[WorkItem, int] = {}
        self._keys: dict[str, WorkItem] = {}  # unfinished tasks by key

    # -- keys ----------------------------------------------------------------------------

    def join(self, item: WorkItem) -> bool:
        """If an unfinished task has ``item.key``, ``item`` becomes it (its id and future:
        True); else False, and the caller accepts ``item`` (``accepted`` keeps its key)."""
        same = self._keys.get(item.key)  # type: ignore[arg-type]
        if same is None:
            return False
        item.task_id, item.future = same.task_id, same.future
        return True

    def accepted(self, item: WorkItem) -> bool:
        """``item`` was accepted: keep its key; True if it waits for dependencies (not in the
        order yet; ``dependency_ended`` releases it)."""
        if item.key is not None:
            self._keys[item.key] = item
        if item.after is None:
            return False
        self._dependants[item] = len(item.after)
        item.waiting_for = DEPENDENCY
        return True

    def ended(self, item: WorkItem) -> bool:
        """``item`` ended (it has a key, or there are limits): its key is free; True if a
        task set aside for its limit went back to the ready tasks (the slot it held, or the
        slot or token it was released for and never took: ``limits.Limits.dropped``)."""
        if item.key is not None and self._keys.get(item.key) is item:
            del self._keys[item.key]
        if item.limit is not None:
            return self.free(item)
        released = self.limits.dropped(item) if self.limits is not None else []
        self._order.push_front(released)
        return bool(released)

    # -- dependencies --------------------------------------------------------------------

    def dependency_ended(self, item: WorkItem, failed: bool, now: float) -> bool:
        """One of ``item``'s dependencies ended: True if ``item`` stops waiting (the last
        succeeded: it is in the order now; or ``failed``: the caller ends it)."""
        left = self._dependants.get(item)
        if left is None:
            return False  # cancelled or settled meanwhile
        if not failed and left > 1:
            self._dependants[item] = left - 1
            return False
        del self._dependants[item]
        item.waiting_for = None
        if not failed:
            self._order.push(item, now, tracked=True)  # (its expiry watched since accepted)
        return True

    # -- limits --------------------------------------------------------------------------

    def free(self, item: WorkItem) -> bool:
        """``item`` gives its limit's slot back (it ended, came back, or backs off): True if
        a task set aside went back to the ready tasks."""
        released = self.limits.free(item) if self.limits is not None else []
        self._order.push_front(released)
        return bool(released)

    def release_due(self, now: float) -> None:
        """Tasks whose limit's token is back by ``now`` go back to the ready tasks."""
        if self.limits is not None and self.limits.next_due is not None:
            self._order.push_front(self.limits.release_due(now))

    def next_due(self) -> float | None:  # (without the lock: see ``limits.Limits.next_due``)
        return None if self.limits is None else self.limits.next_due

    # -- all of them ---------------------------------------------------------------------

    def waiting_for(self, item: WorkItem, now: float) -> str | None:
        """Why ``item`` (queued) waits beyond its place in order: ``DEPENDENCY``,
        ``limits.LIMIT``, ``TIME`` (its ``not_before`` has not come), or None."""
        if item.waiting_for is not None or item.state is not TaskState.QUEUED:
            return item.waiting_for
        return TIME if item.not_before is not None and item.not_before > now else None

    def remove(self, items: dict[int, WorkItem]) -> list[WorkItem]:
        """Take out those of ``items`` (by ``id()``) that wait here (a cancel, an expiry)."""
        removed = [item for item in items.values() if item in self._dependants]
        for item in removed:
            del self._dependants[item]
            item.waiting_for = None
        if self.limits is not None:
            removed += self.limits.remove(items)
        return removed

    def holds_any(self) -> bool:
        return bool(self._dependants) or (self.limits is not None and self.limits.holds_any())

    def take_all(self) -> list[WorkItem]:
        """Empty it (stop, broken): tasks set aside for a limit, then those waiting for
        dependencies, in arrival order."""
        items = self.limits.take_all() if self.limits is not None else []
        items += list(self._dependants)
        for item in self._dependants:
            item.waiting_for = None
        self._dependants.clear()
        return items


def dependency_failed(future: TaskFuture) -> bool:
    """Did the task of ``future`` (done) end otherwise than by succeeding? No unpickling."""
    cancelled, exception, result = future.settled()
    return cancelled or exception is not None or (
        isinstance(result, RawOutcome) and not result.ok)


def fail_dependant(item: WorkItem, dependency: TaskFuture) -> None:
    """``item`` ended failed because ``dependency`` did not succeed: fail its future with
    ``DependencyFailedError`` from the dependency's exception (after the backlog's lock: this
    may unpickle that exception, user code; a raw future's is rebuilt unpickled, as
    ``taskorch serve`` must), and release it."""
    cancelled, exception, result = dependency.settled()
    cause: BaseException
    if cancelled:
        what, cause = "was cancelled", CancelledError()
    elif isinstance(result, RawOutcome):
        _, type_name, message, tb = result.data
        what, cause = "failed", decode_exception(None, type_name, message, tb)
    else:
        cause = dependency.exception() or RuntimeError("no exception")
        what = "expired" if type(cause).__name__ == "TaskExpiredError" else "failed"
    error = DependencyFailedError(item.task_id, dependency.task_id, what)
    error.__cause__ = cause
    try:
        item.future.set_exception(error)
    finally:
        item.release()
