"""Parent process: the moments of a task's life, announced to listeners.

The dispatcher core (``dispatch``) and the backlog announce each moment once, where it happens,
with the backlog lock held: ``accepted`` (a producer's thread, in ``Backlog``), ``started``,
``retrying``, ``finished``, ``crashed`` (the dispatcher thread, from the core's rules) and
``cancelled`` (whichever thread cancels it, in ``Backlog.finish_locked``). Listeners are
the orchestrator's (``Backlog.listeners``: the metrics' ``figures.Figures``), or one task's
own (``WorkItem.listener``: ``taskorch serve``'s journal tracking, in
``_service/registry.py``). The interface, ``TaskListener``, is defined beside the task's
records (``task``), which hold one; this module adds and removes the orchestrator's.

A listener runs under the backlog lock, on a thread that must not wait: it records, or queues
something for another thread; no I/O, no other lock that could be held while the backlog's is
taken, never user code. It must not raise.
"""

from __future__ import annotations

import threading
from typing import Protocol

from taskorch._parent.task import TaskListener

__all__ = ["TaskListener", "add", "remove"]


class _Announcer(Protocol):  # a Backlog, as seen from here
    lock: threading.Lock
    listeners: tuple[TaskListener, ...]


def add(backlog: _Announcer, listener: TaskListener) -> None:
    """Announce every task's moments to ``listener`` from now on."""
    with backlog.lock:
        if listener not in backlog.listeners:
            backlog.listeners += (listener,)


def remove(backlog: _Announcer, listener: TaskListener) -> None:
    with backlog.lock:
        backlog.listeners = tuple(x for x in backlog.listeners if x is not listener)
