"""Job: purge expired rows from a SQLite table in bounded chunks, then VACUUM.

Runs in: a worker process, main thread.  A plain file in ``workers/``, run by path
(``taskorch run workers/sqlite_purge.py:FUNCTION``): the parent loads it and its functions travel to
the worker by value, so the worker needs nothing installed.  Stdlib only, nothing at import.

Why chunks: the application keeps writing to the same database while this runs.  Each chunk
is one short ``BEGIN IMMEDIATE ... COMMIT`` transaction, so the write lock is held for about
``chunk_size`` row deletions at a time and the application's writers interleave between
chunks instead of waiting for one huge delete.  A crash, a kill or an in-process timeout
loses at most the chunk in flight (SQLite rolls it back), and a retry carries on: the job is
idempotent because "expired" is a property of the rows, not of the job's progress.

Chunks walk the table in key order (rowid, or the primary key of a WITHOUT ROWID table) with
a keyset cursor, so the whole purge reads each row about once, whatever the chunk size.

VACUUM runs when this run deleted rows or when the file has free pages.  The second clause
finishes the compaction that a crash between the last chunk and VACUUM left undone, as far
as SQLite can tell: expired rows scattered among live ones leave pages half empty rather than
free, and that fragmentation is not visible without the (rarely compiled-in) ``dbstat``
table, so after such a crash it waits for the next purge that deletes something.

Accepted limits, on purpose: VACUUM rewrites the whole file under an exclusive lock (readers
and writers wait, up to their busy timeout) and needs free disk space about the size of the
database, so for a big database and small purges pass ``vacuum=False`` and compact on a
slower schedule; rows that a concurrent writer inserts behind the cursor with an
already-past expiry are left for the next run.
"""

from __future__ import annotations

import math
import os
import pathlib
import sqlite3
import time
from typing import Any

# How long a statement waits for another connection's lock before failing with
# "database is locked".  Long enough to ride out the application's own transactions and a
# concurrent VACUUM of a moderate database; short enough that a wedged lock holder turns
# into a visible (retryable) OperationalError instead of a silent hang.
_BUSY_TIMEOUT_S = 30.0

# Names by which SQLite exposes the rowid; a user column of the same name shadows one.
_ROWID_ALIASES = ("rowid", "_rowid_", "oid")


def purge_expired(
    db_path: str | os.PathLike[str],
    table: str,
    expires_column: str,
    *,
    now: float | str | None = None,
    chunk_size: int = 1000,
    vacuum: bool = True,
) -> dict[str, Any]:
    """Delete the rows of ``table`` whose ``expires_column`` is before ``now``; then VACUUM.

    ``now`` defaults to ``time.time()``, taken once, so every chunk uses the same cut-off.
    Values are compared as stored, without type conversion: pass a number for Unix
    timestamps and an ISO-8601 ``str`` for text timestamps.  (SQLite orders every number
    before every text, so a numeric ``now`` against text timestamps deletes nothing rather
    than the wrong rows.)  Rows whose expiry is NULL never expire.

    ``table`` and ``expires_column`` are checked against the schema (case-insensitively, as
    SQLite does) and then quoted, so they can never inject SQL.  Foreign keys are enforced
    during the purge, so the schema's ``ON DELETE`` actions apply as the application
    declared them.

    With ``vacuum``, the file is compacted when rows were deleted or pages are free (see the
    module docstring for why not otherwise).

    Returns ``{"db_path", "table", "expires_column", "now", "deleted", "chunks",
    "vacuumed", "bytes_before", "bytes_after"}``; sizes are the database's pages in bytes.
    """
    path = os.fspath(db_path)
    if not isinstance(table, str) or not table:
        raise TypeError(f"table must be a non-empty str, got {table!r}")
    if not isinstance(expires_column, str) or not expires_column:
        raise TypeError(f"expires_column must be a non-empty str, got {expires_column!r}")
    _check_positive_int(chunk_size, "chunk_size")
    if not isinstance(vacuum, bool):
        raise TypeError(f"vacuum must be a bool, got {vacuum!r}")
    cutoff = _check_now(now)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SQLite database {path!r} does not exist or is not a file "
            "(purge_expired never creates one: check the path)"
        )

    # mode=rw: a wrong path must fail, not silently create an empty database to "purge".
    uri = pathlib.Path(path).absolute().as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
    try:
        table_name, column_name, key_columns = _resolve_schema(conn, path, table, expires_column)
        conn.execute("PRAGMA foreign_keys = ON")
        bytes_before = _database_bytes(conn)
        deleted, chunks = _delete_in_chunks(
            conn, table_name, column_name, key_columns, cutoff, chunk_size
        )
        vacuumed = False
        if vacuum and (deleted > 0 or _scalar_int(conn, "PRAGMA freelist_count") > 0):
            conn.execute("VACUUM")
            vacuumed = True
        bytes_after = _database_bytes(conn)
    finally:
        # Closing with a transaction open (an exception mid-chunk) rolls that chunk back.
        conn.close()
    return {
        "db_path": path,
        "table": table_name,
        "expires_column": column_name,
        "now": cutoff,
        "deleted": deleted,
        "chunks": chunks,
        "vacuumed": vacuumed,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
    }


def _delete_in_chunks(
    conn: sqlite3.Connection,
    table: str,
    column: str,
    key_columns: list[str],
    cutoff: float | str,
    chunk_size: int,
) -> tuple[int, int]:
    """Delete expired rows, ``chunk_size`` per transaction, walking the key order once.

    Each round finds the key of the ``chunk_size``-th expired row after the cursor and deletes
    the expired rows in ``(cursor, that key]``: exactly ``chunk_size`` rows, located by a
    range scan of the table's own B-tree.  The unary ``+`` keeps the planner off any index on
    the expiry column: an index there would make it sort every expired row again per chunk.
    It also disables type affinity on the comparison, which is what "compared as stored" in
    the docstring means.
    """
    qtable = _quote(table)
    qkeys = ", ".join(_quote(k) for k in key_columns)
    key_expr = qkeys if len(key_columns) == 1 else f"({qkeys})"
    key_params = ", ".join("?" for _ in key_columns)
    key_row = key_params if len(key_columns) == 1 else f"({key_params})"
    expired = f"+{_quote(column)} < ?"

    deleted = 0
    chunks = 0
    cursor: tuple[Any, ...] | None = None
    while True:
        where = expired
        params: list[Any] = [cutoff]
        if cursor is not None:
            where += f" AND {key_expr} > {key_row}"
            params.extend(cursor)
        conn.execute("BEGIN IMMEDIATE")
        try:
            bound = conn.execute(
                f"SELECT {qkeys} FROM {qtable} WHERE {where} ORDER BY {qkeys} LIMIT 1 OFFSET ?",
                (*params, chunk_size - 1),
            ).fetchone()
            if bound is not None:
                where += f" AND {key_expr} <= {key_row}"
                params.extend(bound)
            count = conn.execute(f"DELETE FROM {qtable} WHERE {where}", params).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        if count > 0:
            deleted += count
            chunks += 1
        if bound is None:
            return deleted, chunks
        cursor = tuple(bound)


def _resolve_schema(
    conn: sqlite3.Connection, path: str, table: str, column: str
) -> tuple[str, str, list[str]]:
    """Return the schema's spelling of table and column, and the key to walk the table by."""
    try:
        row = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE",
            (table,),
        ).fetchone()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
            raise ValueError(f"{path!r} is not a SQLite database ({exc})") from exc
        raise
    if row is None:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
            )
        ]
        raise ValueError(f"no table {table!r} in {path!r}; its tables are {names}")
    table_name: str = row[0]
    if table_name.lower().startswith("sqlite_"):
        raise ValueError(f"refusing to purge SQLite's internal table {table_name!r}")

    columns = conn.execute("SELECT name, pk FROM pragma_table_info(?)", (table_name,)).fetchall()
    by_lower = {_ascii_lower(name): name for name, _ in columns}
    column_name = by_lower.get(_ascii_lower(column))
    if column_name is None:
        raise ValueError(
            f"no column {column!r} in table {table_name!r} of {path!r}; "
            f"its columns are {[name for name, _ in columns]}"
        )

    for alias in _ROWID_ALIASES:
        if alias in by_lower:
            continue  # a real column of that name hides the rowid behind this alias
        try:
            conn.execute(f"SELECT {alias} FROM {_quote(table_name)} LIMIT 0")
        except sqlite3.OperationalError:
            break  # "no such column": a WITHOUT ROWID table (or a virtual table without one)
        return table_name, column_name, [alias]
    primary_key = [name for name, pk in sorted(columns, key=lambda c: c[1]) if pk > 0]
    if not primary_key:
        raise ValueError(
            f"table {table_name!r} of {path!r} has neither a usable rowid nor a primary key "
            "to walk it by in chunks"
        )
    return table_name, column_name, primary_key


def _check_now(now: float | str | None) -> float | str:
    if now is None:
        return time.time()
    if isinstance(now, bool) or not isinstance(now, (int, float, str)):
        raise TypeError(f"now must be a number, an ISO-8601 str or None, got {now!r}")
    if isinstance(now, float) and not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    return now


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _database_bytes(conn: sqlite3.Connection) -> int:
    # Pages, not the file size: in WAL mode the file shrinks only at the next checkpoint.
    return _scalar_int(conn, "PRAGMA page_count") * _scalar_int(conn, "PRAGMA page_size")


def _scalar_int(conn: sqlite3.Connection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    return int(row[0])


def _quote(identifier: str) -> str:
    """Quote an identifier that was already checked against the schema."""
    return '"' + identifier.replace('"', '""') + '"'


def _ascii_lower(name: str) -> str:
    # SQLite folds only ASCII letters when it compares identifiers.
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in name)
