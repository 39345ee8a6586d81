"""``taskorch serve``'s task records as ``TaskInfo`` (server process): what a submission's call
bytes tell of it, and the journal's rows read as records (issue 25).

``label_of`` runs in the journal's writer, at each submission: it reads the function's name
and, for a call whose arguments are plain data, their repr, from ``encode_call`` bytes without
importing anything (``decode_builtins``: an unpickler that refuses every global). The reads
(``list_rows``, ``read_row``) run in the writer too, through ``Journal.run``; ``info_of`` turns
a row into a ``TaskInfo``, with the live progress the registry holds, in any thread.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from taskorch._errors import TaskAbandonedError, TaskExpiredError
from taskorch._parent.figures import BY_VALUE, name_of_reference
from taskorch._service.protocol import O_DEPENDENCY, O_ERROR, O_RAISED, O_RESULT
from taskorch._service.values import decode_builtins, decode_service_error
from taskorch._stats import Progress, TaskInfo
from taskorch._wire import BY_REFERENCE, function_reference

#: Longest ``args_repr`` and ``result_repr`` kept (characters): a record stays small.
REPR_LIMIT = 200
#: Largest pickled arguments or result read for a repr: past it, only their size is told.
REPR_READ_LIMIT = 64 * 1024

_COLUMNS = ("id, name, status, attempts, submitted, started, finished, worker_pid, priority, "
            "not_before, outcome, data, args_repr, progress, retry_of")


def bounded(text: str, limit: int = REPR_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def label_of(payload: bytes) -> tuple[str, str | None]:
    """(name, args repr) of a task from its call bytes; the repr is None unless the call
    carries its function by reference and its arguments as plain data."""
    short = len(payload) <= _SHORT_CALL
    if short and (label := _labels.get(payload)) is not None:
        return label
    reference = function_reference(payload)  # (read once: it is on every submission's path)
    if reference is None:
        return BY_VALUE, None
    rest = payload[payload.index(reference, len(BY_REFERENCE)) + len(reference):]
    label = name_of_reference(reference), plain_repr(rest)
    if short and len(_labels) < _LABELS_KEPT:  # (full: each is read anew)
        _labels[payload] = label
    return label


#: The labels of short calls (the same function with no arguments or the same few small ones:
#: unpickling even plain data costs ~2 us, on a submission's path), read once: calls up to
#: _SHORT_CALL bytes, the first _LABELS_KEPT distinct ones seen, never evicted (bounded; a
#: label depends on the bytes alone; the journal's writer only).
_SHORT_CALL = 256
_LABELS_KEPT = 1024
_labels: dict[bytes, tuple[str, str | None]] = {}


def plain_repr(data: bytes) -> str | None:
    """The bounded repr of pickled plain data; None if it holds anything else."""
    if len(data) > REPR_READ_LIMIT:
        return f"<{len(data)} bytes>"
    try:
        value = decode_builtins(data)
    except Exception:  # noqa: BLE001 - not plain data: no repr (nothing was imported)
        return None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        args, kwargs = value  # a call's (args, kwargs)
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return bounded(", ".join(parts))
    return bounded(repr(value))


def list_rows(db: sqlite3.Connection, statuses: tuple[str, ...], name: str | None, limit: int,
              before_id: int | None) -> list[tuple[Any, ...]]:
    """Newest first, ``limit`` at most, below ``before_id``; by ``status`` (the listing index)
    when ``statuses`` is given. The journal's status never says "waiting" (a queued task's
    status is "queued"): ``statuses_for`` turns the states asked for into statuses, and the
    caller keeps the rows whose ``state_of`` is one of them."""
    where = ["id < ?"]
    params: list[object] = [before_id if before_id is not None else 2 ** 62]
    if statuses:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        params += statuses
    if name:
        where.append("name = ?")
        params.append(name)
    params.append(limit)
    return db.execute(f"SELECT {_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
                      "ORDER BY id DESC LIMIT ?", params).fetchall()


def statuses_for(states: tuple[str, ...]) -> tuple[str, ...]:
    """The journal statuses whose rows may be in ``states`` (both "queued" and "waiting" are
    rows of status "queued": ``state_of`` tells them apart)."""
    return tuple(sorted({"queued" if s == "waiting" else s for s in states}))


def state_of(status: str | None, not_before: float | None, waiting: bool | None,
             now: float) -> str:
    """A task's state, the one rule (``TaskInfo.state`` and the listing's filter both read
    it). A row's status is its state, except that a queued task is "waiting" while it is held
    back (for a time, a dependency or a per-name limit): ``waiting`` is what the backlog says
    of it (the registry's ``waiting``, from ``Backlog.waiting_for_locked``: every reason a
    task is held, its ``after_ids`` dependencies and per-name limits included, which no
    column tells); None, when the backlog does not hold it (not live here), falls back to its
    not-before time."""
    state = status or "queued"
    if state != "queued":
        return state
    if waiting is None:
        waiting = not_before is not None and not_before > now
    return "waiting" if waiting else "queued"


def row_state(row: tuple[Any, ...], waiting: bool | None, now: float) -> str:
    """``state_of`` a journal row (``_COLUMNS``)."""
    return state_of(row[2], row[9], waiting, now)


def read_row(db: sqlite3.Connection, task_id: int) -> tuple[Any, ...] | None:
    found: tuple[Any, ...] | None = db.execute(
        f"SELECT {_COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
    return found


def queued_ids(db: sqlite3.Connection, name: str | None) -> list[int]:
    """The tasks not started yet, oldest first (``Client.purge``)."""
    if name is None:
        rows = db.execute("SELECT id FROM tasks WHERE status='queued' ORDER BY id")
    else:
        rows = db.execute("SELECT id FROM tasks WHERE status='queued' AND name=? ORDER BY id",
                          (name,))
    return [r[0] for r in rows]


def info_of(row: tuple[Any, ...], live: Progress | None = None,
            waiting: bool | None = None) -> TaskInfo:
    """A journal row (``_COLUMNS``) as a ``TaskInfo``; ``live``: the progress the registry
    holds for a running task (newer than the journal's); ``waiting``: what the backlog says
    of a queued task (``state_of``)."""
    (task_id, name, status, attempts, submitted, started, finished, pid, priority,
     not_before, outcome, data, args_repr, progress, retry_of) = row
    state = row_state(row, waiting, time.time())
    error = tb = result = None
    if data is not None and outcome is not None:
        error, tb, result = _outcome_text(outcome, data)
    if live is None and progress is not None:
        live = Progress(*decode_builtins(progress))
    return TaskInfo(
        id=task_id, name=name or "", state=state, attempts=attempts, accepted_at=submitted,
        started_at=started, finished_at=finished, worker_pid=pid, priority=priority,
        error=error, traceback=tb, args_repr=args_repr, result_repr=result, progress=live,
        retry_of=retry_of)


def _outcome_text(outcome: int, data: bytes) -> tuple[str | None, str | None, str | None]:
    """(error, traceback, result repr) from a done row's outcome."""
    try:
        value = decode_builtins(data)
    except Exception:  # noqa: BLE001 - a damaged outcome: say nothing of it
        return None, None, None
    if outcome == O_DEPENDENCY and isinstance(value, tuple) and len(value) == 3:
        outcome, value = O_ERROR, value[0]  # (its DependencyFailedError says which, and why)
    if outcome == O_RESULT and isinstance(value, bytes):
        return None, None, plain_repr(value) or f"<not plain data: {len(value)} bytes>"
    if outcome == O_RAISED and isinstance(value, tuple) and len(value) == 4:
        _, type_name, message, tb = value
        return bounded(f"{type_name}: {message}", 1000), tb, None
    if outcome == O_ERROR and isinstance(value, bytes):
        exc = decode_service_error(value)
        return bounded(f"{type(exc).__name__}: {exc}", 1000), None, None
    return None, None, None


def status_of(exc: BaseException) -> str:
    """The ``TaskInfo`` state of a task whose future ended with ``exc`` (the future's other
    ends, a result, a raise, a cancel: ``outcomes.outcome_and_status``)."""
    if isinstance(exc, TaskAbandonedError):
        return "abandoned"
    if isinstance(exc, TaskExpiredError):
        return "expired"
    return "failed"
