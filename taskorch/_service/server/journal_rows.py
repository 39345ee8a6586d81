"""``taskorch serve``'s journal: a batch's rows written many per statement (server process,
the journal's writer "taskorch-serve-journal", inside a batch's transaction; see ``journal``):
the ends of its tasks (``write_starts_and_ends``), and ``write_rows``, which ``submissions``
uses for its inserts too."""

from __future__ import annotations

import functools
import itertools
import pickle
import sqlite3
from typing import Any

from taskorch._wire import PROTOCOL


def write_starts_and_ends(db: sqlite3.Connection, started: list[tuple[Any, ...]],
                          finished: list[tuple[Any, ...]], now: float) -> None:
    """A batch's ``started`` ops ("started", id, attempts, pid) and ``finished`` ops
    ("finished", id, outcome, attempts, seconds, data, then, status, progress), in that order.
    A task that starts and ends within one batch (short tasks, at speed) gets one UPDATE, not
    two: its end carries its start's time and pid, as the two in turn would have left them.
    The ends without progress (most) bind none (see "Binding" below): their statement writes
    NULL."""
    starts = {op[1]: op for op in started}  # (the last start of a task wins, as in turn)
    # Many rows per statement, unless SQLite is older than 3.33 or a task ends twice.
    at_once = _UPDATE_FROM and len({op[1] for op in finished}) == len(finished)
    quiet: list[tuple[Any, ...]] = []  # ends without progress
    told: list[tuple[Any, ...]] = []  # the others; or every end, in turn (not ``at_once``)
    for op in finished:
        start = starts.pop(op[1], None)
        began, pid = (None, None) if start is None else (now, start[3])
        end = (op[7], op[3], now, op[2], op[4], bindable(pickle.dumps(op[5], PROTOCOL)))
        if at_once and op[8] is None:
            quiet.append((*end, began, pid, op[1]))
        else:
            told.append((*end, op[8], began, pid, op[1]))
    if starts:
        db.executemany(
            "UPDATE tasks SET state='running', status='running', attempts=?, started=?, "
            "worker_pid=? WHERE id=? AND state != 'done'",
            [(op[2], now, op[3], op[1]) for op in starts.values()])
    if quiet:
        write_rows(db, _QUIET_ENDS, "(?, ?, ?, ?, ?, ?, ?, ?, ?)", quiet, 5)
    if told and at_once:
        write_rows(db, _ENDS, "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", told, 5)
    elif told:  # (an SQLite older than 3.33, or a task twice: row by row, in turn)
        db.executemany(
            "UPDATE tasks SET state='done', status=?1, payload=CASE WHEN ?1='succeeded' THEN "
            "NULL ELSE payload END, attempts=?2, finished=?3, outcome=?4, seconds=?5, data=?6, "
            "progress=?7, started=COALESCE(?8, started), worker_pid=COALESCE(?9, worker_pid) "
            "WHERE id=?10", told)


# Binding: sqlite3 binds an int, a float, a str or a bytearray as it is; a bytes or a None
# first goes through its adapters' registry (a tuple made, a dict read, two attributes looked
# up): measured ~0.4 us per bytes and ~0.25 us per None, against ~0.08 us per bytearray (its
# copy included). So a batch's small blobs are bound as bytearrays (the same BLOB is stored; a
# large one, LARGE_VALUE or more, stays bytes: it is not copied again), and a value that is
# None in most rows (a progress, a policy) has statements without it. Hazard: a new column
# bound per task costs that much more if its value is a bytes or a None.

#: The ends of a batch's tasks, many rows per statement (``write_rows``; UPDATE ... FROM:
#: SQLite 3.33). A success drops its call bytes.
_SET_ENDS = ("UPDATE tasks SET state='done', status=e.status, payload=CASE "
             "WHEN e.status='succeeded' THEN NULL ELSE tasks.payload END, attempts=e.attempts, "
             "finished=e.finished, outcome=e.outcome, seconds=e.seconds, data=e.data, "
             "progress={progress}, started=COALESCE(e.started, tasks.started), "
             "worker_pid=COALESCE(e.pid, tasks.worker_pid) FROM e WHERE tasks.id = e.id")
_ENDS = ("WITH e (status, attempts, finished, outcome, seconds, data, progress, started, pid, "
         "id) AS (VALUES {rows}) " + _SET_ENDS.format(progress="e.progress"))
_QUIET_ENDS = ("WITH e (status, attempts, finished, outcome, seconds, data, started, pid, id) "
               "AS (VALUES {rows}) " + _SET_ENDS.format(progress="NULL"))
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
#: Most rows one statement of ``write_rows`` writes: 64 rows of up to 15 values stay under
#: the smallest bound SQLite has had on a statement's variables (999).
ROWS_PER_STATEMENT = 64
#: Rows with a blob of this many bytes or more are written one by one (``write_rows``).
LARGE_VALUE = 16 * 1024


def bindable(blob: bytes) -> bytes | bytearray:
    """A blob as a bytearray if it is small (see "Binding": sqlite3 binds one faster), as it
    is if it has LARGE_VALUE bytes or more (not copied again)."""
    return bytearray(blob) if len(blob) < LARGE_VALUE else blob


def write_rows(db: sqlite3.Connection, template: str, row: str, rows: list[tuple[Any, ...]],
               blob: int) -> int:
    """``template`` with ``{rows}`` made of ``row`` once per row, for all ``rows``: one
    statement per chunk of rows rather than one step per row as ``executemany`` makes (each
    step resets the statement, and lets go of the GIL and takes it back: measured, ~2 us of
    CPU per task more for a task's insert and end). The chunks go by powers of two (64 down
    to 1), so that a template makes at most seven statements (kept in sqlite3's cache).
    A row whose value ``blob`` (bytes, a bytearray or None) has LARGE_VALUE bytes goes alone,
    in its place: a statement's values are copied into SQLite all at once, 64 large results
    would be held twice over. Returns how many rows were changed."""
    changed = 0
    start = 0  # the rows from here to the current one are small: written together
    for i, values in enumerate(rows):
        value = values[blob]
        if value is not None and len(value) >= LARGE_VALUE:  # (in row order: the first of
            changed += _write_small(db, template, row, rows[start:i])  # two alike wins)
            changed += db.execute(_statement(template, row, 1), values).rowcount
            start = i + 1
    return changed + _write_small(db, template, row, rows[start:])


def _write_small(db: sqlite3.Connection, template: str, row: str,
                 rows: list[tuple[Any, ...]]) -> int:
    changed = 0
    start = 0
    while start < len(rows):
        size = min(ROWS_PER_STATEMENT, 1 << (len(rows) - start).bit_length() - 1)
        changed += db.execute(_statement(template, row, size), list(
            itertools.chain.from_iterable(rows[start:start + size]))).rowcount
        start += size
    return changed


@functools.lru_cache(maxsize=64)
def _statement(template: str, row: str, size: int) -> str:
    return template.format(rows=", ".join([row] * size))
