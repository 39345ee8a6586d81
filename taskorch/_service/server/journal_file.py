"""``taskorch serve``'s journal file: its lock, its schema, opening and checking it (server
process, main thread, before the journal's writer starts; see ``journal`` for the rest).

A second server on the same file is refused by an exclusive ``flock`` on ``PATH.lock`` (which
names the holder's pid), taken before the database is opened, so that nothing is read or
written by the loser. A file that is not an intact taskorch journal (not SQLite, corrupt by
``quick_check``, another schema) or cannot be written is refused with ``JournalError``, and
nothing in it is changed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time

from taskorch._errors import JournalError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client BLOB NOT NULL,
    sub INTEGER NOT NULL,
    payload BLOB,
    policy BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    outcome INTEGER,
    seconds REAL,
    data BLOB,
    priority INTEGER NOT NULL DEFAULT 0,
    not_before REAL,
    expires REAL,
    UNIQUE (client, sub)
);
CREATE INDEX tasks_finished ON tasks (finished) WHERE finished IS NOT NULL;
CREATE INDEX tasks_live ON tasks (state) WHERE state != 'done';
"""


def open_journal(path: str | None, synchronous: str) -> sqlite3.Connection:
    """Open the journal at ``path`` (None: in memory), made if new, checked if not, proven
    writable; JournalError (nothing in the file changed) if it cannot be used."""
    where = path or ":memory:"
    fresh = path is None or not os.path.exists(path) or os.path.getsize(path) == 0
    try:
        db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the journal {where}: {exc}") from exc
    try:
        if path is None:
            db.execute("PRAGMA journal_mode=MEMORY")
            db.execute("PRAGMA synchronous=OFF")
        elif not fresh:
            _check_existing(db, path)
        if path is not None:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError(f"the journal {path} could not be switched to WAL mode")
            db.execute(f"PRAGMA synchronous={synchronous}")
        if fresh:
            db.executescript(f"BEGIN; {_SCHEMA} COMMIT;")
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        _add_timing_columns(db)
        # The schedules' state (taskorch serve --config): additive, so made in any journal.
        db.execute("CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, "
                   "last_fire REAL, last_outcome TEXT, last_seconds REAL)")
        # Prove now that it is writable, rather than at the first submission.
        db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (str(time.time()),))
    except JournalError:
        db.close()
        raise
    except sqlite3.Error as exc:
        db.close()
        raise JournalError(
            f"cannot use the journal {where}: {exc}; nothing in it was changed. Check its "
            "permissions and the free space, or pass another --journal") from exc
    return db

#: Columns added to ``tasks`` since schema 1 was first written (``options()``: the task's
#: priority, and its not-before and expiry times in epoch seconds): additive, so a journal
#: written before them gains them at its next opening, its rows taking the defaults.
_TIMING_COLUMNS = (("priority", "INTEGER NOT NULL DEFAULT 0"), ("not_before", "REAL"),
                   ("expires", "REAL"))
#: Columns of the task records (``TaskInfo``, issue 25), additive as above: the task's label
#: and bounded argument repr (read from its call bytes at submission), its ``TaskInfo`` state
#: (``status``: queued, running, or how it ended), the pid of the worker that ran it, the
#: task it retries, and its latest progress (pickled builtins). A journal written before them
#: gains them (its rows: status from ``state``, the rest NULL) and the listing index.
_RECORD_COLUMNS = (("name", "TEXT"), ("args_repr", "TEXT"), ("status", "TEXT"),
                   ("worker_pid", "INTEGER"), ("retry_of", "INTEGER"), ("progress", "BLOB"))


def _add_timing_columns(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, kind in _TIMING_COLUMNS + _RECORD_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
    if "status" not in present:  # an older journal: its records' states, as far as known
        db.execute("UPDATE tasks SET status = CASE state WHEN 'done' THEN CASE outcome "
                   "WHEN 1 THEN 'succeeded' WHEN 4 THEN 'cancelled' ELSE 'failed' END "
                   "ELSE state END")
    # The listing (``taskorch tasks``, the dashboard): newest first, by state or not.
    db.execute("CREATE INDEX IF NOT EXISTS tasks_listing ON tasks (status, id)")


def _check_existing(db: sqlite3.Connection, path: str) -> None:
    """Refuse a file that is not an intact taskorch journal (before any write)."""
    try:
        check = db.execute("PRAGMA quick_check").fetchall()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        schema = None
        if "meta" in tables:
            found = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            schema = found[0] if found else None
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"the journal {path} is not a readable SQLite database ({exc}): corrupt, or "
            "another kind of file. Nothing was changed; move it away (its accepted tasks "
            "would be lost) or pass another --journal") from exc
    if check != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in check[:3])
        raise JournalError(
            f"the journal {path} is corrupt (SQLite quick_check: {problems}). Nothing was "
            "changed; try `sqlite3 PATH .recover`, or move it away")
    if "tasks" not in tables or schema != str(SCHEMA_VERSION):
        raise JournalError(
            f"{path} is an SQLite database but not a taskorch journal of schema "
            f"{SCHEMA_VERSION} (tables {sorted(tables)}, schema {schema}); nothing was "
            "changed. Pass another --journal")


def lock_journal(path: str) -> int:
    """Take the exclusive lock of the journal at ``path`` (``PATH.lock``) and write our pid."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(
            f"cannot create the journal's lock file {lock_path}: {exc.strerror}; is the "
            "directory writable by this user?") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise JournalError(
            f"the journal {path} is in use by another taskorch serve (pid {holder}); two "
            "servers must not share one journal. Stop that one, or pass another --journal"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def next_task_id(db: sqlite3.Connection) -> int:
    """The first id never given: above every row, and above the table's AUTOINCREMENT
    sequence, which remembers the ids of pruned rows."""
    highest = db.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()[0]
    sequence = db.execute(
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name='tasks'").fetchone()[0]
    return 1 + max(int(highest), int(sequence))
