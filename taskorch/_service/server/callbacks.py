"""What the journal's writer calls after a batch's COMMIT (server process, "taskorch-serve-journal";
see ``journal``): each op's callback, in the order added, or for the ops that carry a
``Grouped`` callback, one call for all of them.

A served task costs two callbacks (its submission committed, its outcome committed), and
each did its own work per task: a lock taken, a frame put in its connection's outbox, a
partial made and called. Grouped, a batch of a thousand tasks makes one call per kind and
the callee does that work once per connection (``registry``: one lock hold, one outbox put).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple

log = logging.getLogger("taskorch")


class Grouped(NamedTuple):
    """A callback that the writer gathers: every op of one batch whose callback is a
    ``Grouped`` with the same ``fn`` makes one call ``fn([entry, ...])``, in the ops' order,
    at the place of the first. Each op's entry is ``arg``, or ``(arg, *args)`` where the
    op alone would be called with ``args`` (a submission's: ``journal.OnCommit``'s)."""

    fn: Callable[[list[Any]], None]
    arg: Any


class Calls:
    """A batch's callbacks (writer thread), then ``run()`` once, after COMMIT."""

    __slots__ = ("_calls", "_groups")

    def __init__(self) -> None:
        self._calls: list[Callable[[], None]] = []
        self._groups: dict[Callable[[list[Any]], None], list[Any]] = {}

    def add(self, callback: Callable[..., None] | Grouped, *args: Any) -> None:
        """``callback(*args)`` after COMMIT (gathered if it is a ``Grouped``)."""
        if isinstance(callback, Grouped):  # (a NamedTuple: not callable)
            group = self._groups.get(callback.fn)
            if group is None:
                group = self._groups[callback.fn] = []
                self._calls.append(functools.partial(callback.fn, group))
            group.append((callback.arg, *args) if args else callback.arg)
        else:
            self._calls.append(functools.partial(callback, *args) if args else callback)

    def run(self) -> None:
        """In order: one that raises is logged and the others still run."""
        for callback in self._calls:
            guarded(callback)


def guarded(fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)``; if it raises, the error is logged, and the caller goes on with the next
    task's or sink's answer (a grouped callee keeps the rule per item: one answer that fails
    must not hold the others of its batch)."""
    try:
        fn(*args)
    except BaseException:
        log.exception("taskorch serve: a journal callback failed")


class OneByOne:
    """A base for a ``Sink`` of few answers (an operator's wait, a fetched outcome, a
    dependency): a batch's answers reach it one by one (``admitted``, ``outcome``, which it
    defines), it never withdraws, and one that submits nothing is never told of admissions."""

    __slots__ = ()

    def admitted(self, req: int, admission: int | BaseException, joined: bool = False) -> None:
        pass

    def outcome(self, req: int, outcome: Any) -> None:
        raise NotImplementedError

    def admitted_all(self, accepted: list[tuple[int, int]]) -> None:
        for req, task_id in accepted:
            self.admitted(req, task_id)

    def outcomes(self, ended: list[tuple[int, Any]]) -> None:
        for req, outcome in ended:
            self.outcome(req, outcome)

    def wanted(self, req: int) -> bool:
        return True


def nothing() -> None:
    pass
