"""``taskorch.progress()``: a running task tells how far it is (worker process, any thread of
the task; issue 25).

``worker_main`` gives the channel's sender once (``install``), and the id of the task it runs
around each (``begin``, ``end``); outside a local worker (the caller's process, a Dask worker)
``_task`` is None and a call costs a global read. A report goes to the parent at once
(``_wire.Reported``, under the channel's send lock), at most one every ``INTERVAL`` seconds:
the calls in between return after one clock read, so a tight loop pays well under 1 us a
call on average (measured in the benchmark). The last report before the task ends may be
dropped that way: the task's outcome says the rest.
"""

from __future__ import annotations

import time
from typing import Callable

#: Shortest time between two reports sent: bounds the channel's and the parent's work.
INTERVAL = 0.1
#: Longest message kept (characters).
MESSAGE_LIMIT = 200

Send = Callable[[int, float, "float | None", "str | None", float], None]

_send: Send | None = None  # the worker's channel (``install``), for a task's id and report
# Set by the worker's main thread around each task; read by the task's threads.
_task: int | None = None
_next_at = 0.0  # time.monotonic() before which a report is dropped


def progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Report that the running task has done ``done`` of ``total`` (None: unknown), with an
    optional ``message``; the parent keeps the latest (``future.progress()``,
    ``Client.task(id).progress``, ``taskorch tasks``, the dashboard). A no-op outside a worker;
    rate-limited (``INTERVAL``)."""
    global _next_at
    task = _task
    send = _send
    if task is None or send is None:
        return
    now = time.monotonic()
    if now < _next_at:
        return
    _next_at = now + INTERVAL
    send(task, float(done), None if total is None else float(total),
         None if message is None else str(message)[:MESSAGE_LIMIT], time.time())


def install(send: Send) -> None:
    """This process is a worker: reports go through ``send(task_id, done, total, message,
    at)`` (one for the process: no object per task)."""
    global _send
    _send = send


def begin(task_id: int) -> None:
    global _task, _next_at
    _next_at = 0.0
    _task = task_id


def end() -> None:
    global _task
    _task = None
