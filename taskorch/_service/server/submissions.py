"""``taskorch serve``'s journal: new records for submissions (server process, the journal's
writer "taskorch-serve-journal", inside a batch's transaction; see ``journal``).

A submission becomes a new record with the next id, unless:

- it was journaled already (a retry: the same client token and submission number): that
  record answers it;
- it has a key (``options(key=)``) that an unfinished record has: that record answers it and
  no task is made; a join record (table ``joins``: the submission's client token and number,
  the task's id) says so, so that the same submission sent again after a lost answer finds
  that task even once it has ended (``find_submission``), as a retry finds its own record.
  A join record goes with its task's record (a trigger: pruned, or forgotten). The journal
  owns this rule for served tasks (the backlog's ``waits`` owns it for local ones): the
  records are what holds across clients and restarts, and a record is unfinished until its
  outcome is committed;
- it runs after (``options(after=)``) an id that is not a record accepted before it (unknown,
  pruned, or its own): it is refused with a ValueError naming the id, nothing is written.
  Otherwise its answer carries the rows of its dependencies as they are now (the registry
  waits for those not done; ``data`` only for those that did not succeed).

Plain submissions (no key, no after: the common case) go in one ``executemany``; the others
one by one, in order, so that each sees the records made before it (two in one batch with one
key: the second joins the first).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, NamedTuple

from taskorch._service.server.callbacks import Calls
from taskorch._service.server.journal_file import ROW_COLUMNS, Row, after_ids_text
from taskorch._service.server.journal_rows import bindable, write_rows
from taskorch._service.server.outcomes import CAUSE_DATA_SQL
from taskorch._service.server.records import label_of


class Existing(NamedTuple):
    """The record that answers a submission instead of a new one: its own (a retried
    submission), or another's that it joined (``joined``: by its key, now or when first sent)."""

    row: Row
    joined: bool


#: ``on_commit(task_id, existing, error, dependencies)``: the record's id; ``existing``: the
#: record that answers it instead, else None; ``error``: what refused it (a JournalError: the
#: batch failed; a ValueError: a bad ``after``), then ``task_id`` is 0; ``dependencies``: the
#: rows of its ``after`` ids.
OnCommit = Callable[[int, "Existing | None", "BaseException | None", "list[Row] | None"], None]

_INTO = ("INSERT INTO tasks (id, client, sub, payload, policy, state, status, submitted, "
         "priority, not_before, expires, name, args_repr, key, after_ids) VALUES ")
_ROW = "(?, ?, ?, ?, ?, 'queued', 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT = _INTO + _ROW
#: A submission without options() and without a policy of its own: its policy, priority,
#: times, key and after ids keep their defaults (``Journal.submit``'s timing when none was
#: given), unbound (``journal_rows``' "Binding": a None costs a look-up).
_NO_TIMING = (0, None, None)
_INSERT_BARE = ("INSERT INTO tasks (id, client, sub, payload, state, status, submitted, "
                "name, args_repr) VALUES {rows} ON CONFLICT (client, sub) DO NOTHING")
_BARE_ROW = "(?, ?, ?, ?, 'queued', 'queued', ?, ?, ?)"
#: Both, many rows per statement (``journal_rows.write_rows``).
_INSERT_ROWS = _INTO + "{rows} ON CONFLICT (client, sub) DO NOTHING"
#: A dependency's row, without a success's result (``outcomes.CAUSE_DATA_SQL``).
_DEPENDENCY_COLUMNS = f"id, state, attempts, NULL, NULL, outcome, seconds, {CAUSE_DATA_SQL}"


def insert_submissions(db: sqlite3.Connection, submits: list[tuple[Any, ...]], first: int,
                       now: float, calls: Calls) -> int:
    """Records for ``submits`` (``Journal.submit``'s ops), the i-th with id ``first + i``;
    their answers go to ``calls`` (in their order). Returns how many records were inserted."""
    answers: list[tuple[Any, ...] | None] = [None] * len(submits)
    plain = [(i, op) for i, op in enumerate(submits) if op[7] is None and op[8] is None]
    inserted = 0
    if plain:
        # No key, no after (``_values`` inline); without options() or a policy (``_INSERT_BARE``)
        # the columns that keep their defaults are not bound: a shorter row per task. The
        # client token and a small call go as bytearrays (``journal_rows``' "Binding").
        bare: list[tuple[int, tuple[Any, ...]]] = []
        timed: list[tuple[int, tuple[Any, ...]]] = []
        for i, op in plain:
            (bare if op[6] == _NO_TIMING and op[4] is None else timed).append((i, op))
        if bare:
            inserted += write_rows(db, _INSERT_BARE, _BARE_ROW, [
                (first + i, bytearray(op[1]), op[2], bindable(op[3]), now, *label_of(op[3]))
                for i, op in bare], 3)
        if timed:
            inserted += write_rows(db, _INSERT_ROWS, _ROW, [
                (first + i, bytearray(op[1]), op[2], bindable(op[3]),
                 None if op[4] is None else bindable(op[4]), now, *op[6], *label_of(op[3]), None,
                 None) for i, op in timed], 3)
        for i, op in plain:
            existing = None if inserted == len(plain) else find_submission(db, op[1], op[2])
            if existing is None or existing.row.id == first + i:
                answers[i] = (op[5], first + i, None, None, None)
            else:
                answers[i] = (op[5], existing.row.id, existing, None, None)
    for i, op in enumerate(submits):
        answer = answers[i]
        if answer is None:
            answer, made = _insert_one(db, op, first + i, now)
            inserted += made
        calls.add(*answer)
    return inserted


def _insert_one(db: sqlite3.Connection, op: tuple[Any, ...], task_id: int,
                now: float) -> tuple[tuple[Any, ...], int]:
    """A submission with a key or dependencies: its answer (its callback and what to call it
    with), and 1 if a record was made."""
    _, client, sub, _, _, on_commit, _, key, after = op
    existing = find_submission(db, client, sub)
    if existing is None and key is not None:
        found = db.execute(f"SELECT {ROW_COLUMNS} FROM tasks WHERE key=? AND state != 'done' "
                           "ORDER BY id LIMIT 1", (key,)).fetchone()
        if found is not None:
            existing = Existing(Row(*found), True)
            db.execute("INSERT INTO joins (client, sub, task_id) VALUES (?, ?, ?) ON CONFLICT "
                       "DO NOTHING", (client, sub, existing.row.id))
    if existing is not None:
        return (on_commit, existing.row.id, existing, None, None), 0
    dependencies: list[Row] | None = None
    if after is not None:
        try:
            dependencies = _dependencies(db, after, task_id)
        except ValueError as exc:
            return (on_commit, 0, None, exc, None), 0
    db.execute(_INSERT, _values(task_id, op, now))
    return (on_commit, task_id, None, None, dependencies), 1


def _dependencies(db: sqlite3.Connection, after: tuple[int, ...], task_id: int) -> list[Row]:
    """The rows of ``after``: records older than ``task_id`` (ValueError if not)."""
    if task_id in after:
        raise ValueError(f"after: task {task_id} is this task itself: a task cannot run after "
                         "itself; nothing was enqueued")
    rows = dependency_rows(db, [i for i in after if i < task_id])
    missing = [i for i in after if i not in rows]
    if missing:
        raise ValueError(
            f"after: taskorch serve knows no task {missing[0]} (never accepted, or its "
            "outcome was pruned after --result-ttl); nothing was enqueued")
    return [rows[i] for i in after]


def _values(task_id: int, op: tuple[Any, ...], now: float) -> tuple[Any, ...]:
    _, client, sub, payload, policy, _, timing, key, after = op
    return (task_id, client, sub, payload, policy, now, *timing, *label_of(payload), key,
            after_ids_text(after))


def find_submission(db: sqlite3.Connection, client: bytes, sub: int) -> Existing | None:
    """The record of submission ``sub`` of ``client``, if any: its own, or the one it joined."""
    found = db.execute(
        f"SELECT {ROW_COLUMNS} FROM tasks WHERE client=? AND sub=?", (client, sub)).fetchone()
    if found is not None:
        return Existing(Row(*found), False)
    found = db.execute(f"SELECT {ROW_COLUMNS} FROM tasks WHERE id = (SELECT task_id FROM joins "
                       "WHERE client=? AND sub=?)", (client, sub)).fetchone()
    return None if found is None else Existing(Row(*found), True)


def dependency_rows(db: sqlite3.Connection, ids: list[int]) -> dict[int, Row]:
    """The rows of those of ``ids`` that exist, without a result's bytes."""
    rows: dict[int, Row] = {}
    for start in range(0, len(ids), 500):  # (SQLite's bound on parameters: 999 at least)
        chunk = ids[start:start + 500]
        for found in db.execute(f"SELECT {_DEPENDENCY_COLUMNS} FROM tasks WHERE id IN "
                                f"({', '.join('?' * len(chunk))})", chunk):
            rows[found[0]] = Row(*found)
    return rows
