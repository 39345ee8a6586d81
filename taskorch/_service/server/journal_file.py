"""``taskorch serve``'s journal file: its lock, its schema, opening and checking it (server
process, main thread, before the journal's writer starts; see ``journal`` for the rest).

A second server on the same file is refused by an exclusive ``flock`` on the database file
itself (``PATH.lock`` only names the holder's pid: deleting it as stale unlocks nothing), taken
before the database is opened, so that nothing is read or written by the loser. (SQLite's own
locks are POSIX ``fcntl`` locks, which ``flock`` does not touch on a local file system; the
locked descriptor stays open until SQLite's connection is closed, since closing any descriptor
of the file drops a process's POSIX locks.) A file that is not an intact taskorch journal (not
SQLite, corrupt by ``quick_check``, another schema) or cannot be written is refused with
``JournalError``, and nothing in it is changed.

Damage: after a crash the last commits live only in the ``-wal`` file, which SQLite reads up
to its first bad frame and otherwise ignores. So the journal keeps its high-water mark outside
it too: ``PATH.mark`` (``Mark``) holds the number of records ever inserted, rewritten (not
synced) after each commit that inserted some, and the ``meta`` row ``inserted`` the same count
inside the database. At start a database that counts fewer than its mark (a garbled or missing
``-wal``, an emptied file), or a mark that is missing beside a marked database, is refused,
naming how many accepted tasks would be lost, unless the operator asks to recover what is
there (``serve --recover-damaged``). A new journal is made only where no file exists.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sqlite3
import time
from typing import Any, Callable, NamedTuple

from taskorch._errors import JournalError

log = logging.getLogger("taskorch")

SCHEMA_VERSION = 1


class Row(NamedTuple):
    """One task's record, as recovery and lookups see it."""

    id: int
    state: str
    attempts: int
    payload: bytes | None
    policy: bytes | None
    outcome: int | None
    seconds: float | None
    data: bytes | None
    priority: int = 0  # its options() (``_options.Resolved``; times in epoch seconds)
    not_before: float | None = None
    expires: float | None = None
    key: str | None = None  # options(key=, after=): its key, the ids it runs after ("1,2")
    after: str | None = None


ROW_COLUMNS = ("id, state, attempts, payload, policy, outcome, seconds, data, priority, "
               "not_before, expires, key, after_ids")


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
"""


def open_journal(path: str | None, synchronous: str, fresh: bool,
                 on_empty: Callable[[], None] = lambda: None) -> sqlite3.Connection:
    """Open the journal at ``path`` (None: in memory), made if ``fresh``, checked if not,
    proven writable; JournalError (nothing in the file changed) if it cannot be used. A
    database without any table (its ``-wal`` lost before any checkpoint) is made anew if
    ``on_empty()`` returns (it raises to refuse)."""
    where = path or ""  # "": SQLite's private temporary database, spilled to disk past its cache
    try:
        db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the journal {where}: {exc}") from exc
    try:
        if path is None:
            db.execute("PRAGMA journal_mode=MEMORY")
            db.execute("PRAGMA synchronous=OFF")
        elif not fresh and not _check_existing(db, path):
            on_empty()
            fresh = True
        if path is not None:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError(f"the journal {path} could not be switched to WAL mode")
            db.execute(f"PRAGMA synchronous={synchronous}")
        if fresh:
            db.executescript(f"BEGIN; {_SCHEMA} COMMIT;")
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        _add_columns(db)
        # The schedules' state (taskorch serve --config): additive, so made in any journal.
        db.execute("CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, "
                   "last_fire REAL, last_outcome TEXT, last_seconds REAL)")
        db.executescript(_JOINS)
    except JournalError:
        db.close()
        raise
    except (sqlite3.Error, OSError) as exc:
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
#: ``options(key=, after=)`` (issue 24), additive as above: the task's key, and the ids of the
#: tasks it runs after ("3,5,8"); the unfinished tasks by key (``submissions``) are indexed.
_WAIT_COLUMNS = (("key", "TEXT"), ("after_ids", "TEXT"))


def after_ids_text(after: tuple[int, ...] | None) -> str | None:
    """The ``after_ids`` column of a task that runs after ``after``: "3,5,8" (None: none)."""
    return None if after is None else ",".join(map(str, after))


def after_ids_of(text: str) -> tuple[int, ...]:
    """A record's ``after_ids`` column ("3,5,8") as ids (``after_ids_text``'s reverse)."""
    return tuple(int(part) for part in text.split(","))


#: Submissions that joined another's task by its key (``submissions``): additive, as above.
#: A join record goes when its task's record does (pruned after --result-ttl, or forgotten).
_JOINS = """
CREATE TABLE IF NOT EXISTS joins (client BLOB NOT NULL, sub INTEGER NOT NULL,
    task_id INTEGER NOT NULL, PRIMARY KEY (client, sub)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS joins_task ON joins (task_id);
CREATE TRIGGER IF NOT EXISTS joins_go AFTER DELETE ON tasks
    BEGIN DELETE FROM joins WHERE task_id = old.id; END;
"""


def _add_columns(db: sqlite3.Connection) -> None:
    present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, kind in _TIMING_COLUMNS + _RECORD_COLUMNS + _WAIT_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
    if "status" not in present:  # an older journal: its records' states, as far as known
        db.execute("UPDATE tasks SET status = CASE state WHEN 'done' THEN CASE outcome "
                   "WHEN 1 THEN 'succeeded' WHEN 4 THEN 'cancelled' ELSE 'failed' END "
                   "ELSE state END")
    # The listing (``taskorch tasks``, the dashboard): newest first, by state or not. It also
    # finds the unfinished records at a restart (status queued or running: ``state`` is not
    # done), which an index of their own (``tasks_live``, in journals written before) did: it
    # cost every state change a second index write, and goes.
    db.execute("CREATE INDEX IF NOT EXISTS tasks_listing ON tasks (status, id)")
    db.execute("DROP INDEX IF EXISTS tasks_live")
    db.execute("CREATE INDEX IF NOT EXISTS tasks_key ON tasks (key) WHERE key IS NOT NULL "
               "AND state != 'done'")


def _check_existing(db: sqlite3.Connection, path: str) -> bool:
    """Refuse a file that is not an intact taskorch journal (before any write); False for a
    database without any table."""
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
    if not tables:
        return False
    if "tasks" not in tables or schema != str(SCHEMA_VERSION):
        raise JournalError(
            f"{path} is an SQLite database but not a taskorch journal of schema "
            f"{SCHEMA_VERSION} (tables {sorted(tables)}, schema {schema}); nothing was "
            "changed. Pass another --journal")
    return True


def lock_journal(path: str) -> tuple[int, bool]:
    """Take the exclusive lock of the journal at ``path`` (a ``flock`` on the database file,
    made 0600 if there was none) and note our pid in ``PATH.lock``. Returns the locked
    descriptor and whether the file existed before."""
    lock_path = path + ".lock"
    try:
        note = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(
            f"cannot create the journal's lock file {lock_path}: {exc.strerror}; is the "
            "directory writable by this user?") from exc
    existed = os.path.exists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        os.close(note)
        raise JournalError(f"cannot open the journal {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(note, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        os.close(note)
        raise JournalError(
            f"the journal {path} is in use by another taskorch serve (pid {holder}); two "
            "servers must not share one journal. Stop that one, or pass another --journal"
        ) from None
    os.ftruncate(note, 0)
    os.pwrite(note, f"{os.getpid()}\n".encode(), 0)
    os.close(note)
    return fd, existed


class Mark:
    """The journal's high-water mark outside its ``-wal``: ``PATH.mark`` holds the number of
    records ever inserted and the next task id (see the module docstring). Written by the
    journal's writer only."""

    def __init__(self, path: str) -> None:
        self.path = path + ".mark"
        self._fd: int | None = None
        fields: list[str] = []
        if os.path.exists(self.path):
            try:
                with open(self.path, "rb") as f:
                    fields = f.read(64).decode(errors="replace").split()
            except OSError as exc:
                raise JournalError(f"cannot read the journal's mark {self.path}: {exc}") from exc
        valid = len(fields) == 2 and all(f.isdigit() for f in fields)
        #: Records ever inserted, and the next task id; None: no readable mark.
        self.inserted: int | None = int(fields[0]) if valid else None
        self.next_id = int(fields[1]) if valid else 0

    def write(self, inserted: int, next_id: int) -> None:
        """After a commit: what it left (page cache only: this survives a kill of the
        process, which is when the ``-wal`` alone holds the last commits)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.pwrite(self._fd, f"{inserted:020d} {next_id:020d}\n".encode(), 0)
        self.inserted, self.next_id = inserted, next_id

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_mark(path: str, mark: Mark, recover: bool) -> None:
    """Check the database's count of inserted records against its mark, on a read-only
    connection (closing it checkpoints nothing: the file stays as it was): JournalError,
    naming the tasks that would be lost, if it is behind (unless ``recover``)."""
    from urllib.request import pathname2url

    try:
        probe = sqlite3.connect(f"file:{pathname2url(os.path.abspath(path))}?mode=ro",
                                uri=True)
    except sqlite3.Error:
        return  # (open_journal says why it cannot be opened)
    try:
        found = probe.execute("SELECT value FROM meta WHERE key='inserted'").fetchone()
    except sqlite3.Error:
        return  # no meta table: not a journal, or one without a table (open_journal decides)
    finally:
        probe.close()
    _check_mark(found, mark, path, recover)


def record_opening(db: sqlite3.Connection) -> int:
    """After the checks: count inserted records from now on if the journal did not, and
    prove now that it is writable, rather than at the first submission. Returns the count."""
    found = db.execute("SELECT value FROM meta WHERE key='inserted'").fetchone()
    if found is None:
        db.execute("INSERT INTO meta VALUES ('inserted', 0)")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (str(time.time()),))
    return 0 if found is None else int(found[0])


def _check_mark(found: Any, mark: Mark, path: str, recover: bool) -> None:
    inserted = int(found[0]) if found is not None else 0
    marked = mark.inserted
    if found is None:  # a new journal, or one from before marks: nothing to compare
        marked = 0 if marked is None else marked
    if marked is not None and marked <= inserted:
        return
    if marked is None:
        why = (f"its high-water mark {mark.path} is missing or unreadable, so it cannot "
               "tell whether accepted tasks were lost")
    else:
        why = (f"it holds {inserted} of the {marked} tasks ever accepted into it "
               f"({mark.path}): {marked - inserted} accepted tasks would be lost (its -wal "
               "file was garbled or deleted, or the file was emptied or replaced)")
    if recover:
        log.warning("taskorch serve: the journal %s is damaged (%s); recovering what is left "
                    "(--recover-damaged)", path, why)
        return
    raise JournalError(
        f"the journal {path} is damaged: {why}. Nothing was changed. Restore it from a "
        "backup, or start with --recover-damaged to run what is left")


def refuse_empty(path: str, mark: Mark, recover: bool) -> None:
    """An existing but empty journal file: made new only with ``recover``, or when its mark
    says it never held a task (a server killed while making it)."""
    if recover or mark.inserted == 0:
        return
    lost = f"{mark.inserted} accepted tasks would be lost" if mark.inserted else (
        "it may have held accepted tasks")
    raise JournalError(
        f"the journal {path} exists but is empty: {lost}. Nothing was changed. Restore it "
        "from a backup, or start with --recover-damaged to make a new journal there")


def next_task_id(db: sqlite3.Connection) -> int:
    """The first id never given: above every row, and above the table's AUTOINCREMENT
    sequence, which remembers the ids of pruned rows."""
    highest = db.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()[0]
    sequence = db.execute(
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name='tasks'").fetchone()[0]
    return 1 + max(int(highest), int(sequence))


class Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on an exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left (SQLite rolled it back itself)


def open_marked(path: str, synchronous: str,
                recover: bool) -> tuple[int, Mark, sqlite3.Connection, int]:
    """Lock, open and check the journal file: the locked descriptor, the mark, the
    connection and the count of records ever inserted. JournalError (everything closed) if
    it cannot be used."""
    fd, existed = lock_journal(path)
    mark = Mark(path)
    try:
        if not existed:
            mark.write(0, mark.next_id)  # before the file has anything to lose
        elif os.path.getsize(path) == 0:
            refuse_empty(path, mark, recover)
        fresh = not existed or os.path.getsize(path) == 0
        if not fresh:
            check_mark(path, mark, recover)
        db = open_journal(path, synchronous, fresh,
                          functools.partial(refuse_empty, path, mark, recover))
        try:
            return fd, mark, db, record_opening(db)
        except sqlite3.Error as exc:
            db.close()
            raise JournalError(f"cannot use the journal {path}: {exc}. Check its permissions "
                               "and the free space, or pass another --journal") from exc
    except BaseException:
        mark.close()
        os.close(fd)
        raise
