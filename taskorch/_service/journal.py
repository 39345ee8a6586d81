"""``taskorch serve``'s journal: every accepted task, in SQLite (server process).

One thread, "taskorch-serve-journal" (the writer), owns the sqlite3 connection after
``start()``; before it, the main thread opens the file and reads it for recovery. Everyone
else (connection readers, the dispatcher's start hook, the callback thread that sees outcomes,
the asyncio thread) only puts operations on ``_ops`` and is called back by the writer.

    submitters / hooks                     "taskorch-serve-journal"
    ------------------                     ------------------------
    submit(..., on_commit) --+
    started(id, attempts) ---+--> _ops --> take every op queued (up to MAX_BATCH),
    finished(id, ...) -------+             apply them in ONE transaction, COMMIT,
    lookup(id, on_row) ------+             then call back in order: group commit

Group commit: while one transaction commits (an fsync with ``synchronous=FULL``), the
submissions that arrive queue up, and the next transaction takes them all; a submitter waits
for at most the commit in progress plus its own. There is one writer, so SQLite's "database is
locked" between writers cannot happen; a second server on the same file is refused by an
exclusive ``flock`` on ``PATH.lock`` (which names the holder's pid), taken before the database
is opened, so that nothing is read or written by the loser.

Records (table ``tasks``): the task id clients see (never reused: AUTOINCREMENT), the client's
token and submission number (unique together: a submission retried over a new connection
finds its record instead of making a second one), the call and policy bytes, state (queued,
running, done), attempts charged, timestamps (wall clock: the result TTL spans restarts), and
for a done task its outcome (the ``S_DONE`` fields: outcome code, seconds, data). A done task
drops its call bytes. Outcomes older than ``result_ttl`` are deleted by the writer, at most
PRUNE_CHUNK rows per transaction, so that pruning never holds submissions long.

Failure: a transaction that fails (a full disk, an I/O error) is rolled back whole; its
submissions are refused (their callbacks get ``JournalError``: never run, never half-written),
and the state changes it carried are lost, which only means that after a restart such a task
is recovered as queued or running (at-least-once). The writer itself never dies of it.

Durability: ``synchronous=FULL`` (the default) syncs the WAL at every commit, so an accepted
task survives a power loss; ``NORMAL`` syncs only at checkpoints: it survives a crash of the
process (SIGKILL, OOM), not of the machine. ``path=None`` keeps the journal in memory
(``--no-journal``): the same code, ids and dedup, no durability.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Any, Callable, NamedTuple

from taskorch._errors import JournalError

log = logging.getLogger("taskorch")

SCHEMA_VERSION = 1
#: Most operations applied in one transaction: bounds how long a commit keeps the callbacks of
#: the submissions in it waiting, and the memory of one batch.
MAX_BATCH = 2000
#: Rows deleted per pruning transaction; another follows at once while more are due.
PRUNE_CHUNK = 1000
#: Longest and shortest pause between two pruning passes (half the TTL between them).
PRUNE_INTERVAL = 60.0
PRUNE_MIN_INTERVAL = 1.0

QUEUED, RUNNING, DONE = "queued", "running", "done"

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
    UNIQUE (client, sub)
);
CREATE INDEX tasks_finished ON tasks (finished) WHERE finished IS NOT NULL;
CREATE INDEX tasks_live ON tasks (state) WHERE state != 'done';
"""


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


_ROW_COLUMNS = "id, state, attempts, payload, policy, outcome, seconds, data"

#: ``on_commit(task_id, existing, error)``: the record's id; ``existing`` is the record that
#: was already there (a retried submission), else None; ``error`` the JournalError that
#: refused it (then task_id is 0).
OnCommit = Callable[[int, "Row | None", "JournalError | None"], None]


class Journal:
    """Open (and lock) the journal at ``path``, or an in-memory one for ``path=None``.

    Raises ``JournalError`` with the reason for a journal it cannot use: locked by another
    server, not a database or corrupt, a schema it does not know, not writable. Nothing in
    the file is changed then. ``rows_to_recover()``, then ``start()``; ``close()`` at the end.
    """

    def __init__(self, path: str | None, *, result_ttl: float = 3600.0,
                 synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = path
        self.durable = path is not None
        self.result_ttl = result_ttl
        self._lock_fd: int | None = None
        if path is not None:
            self._lock_fd = _lock(path)
        try:
            self._db = self._open(path, synchronous)
        except BaseException:
            self._unlock()
            raise
        # Operations for the writer (see the module docstring). Unbounded: its producers must
        # never block (one runs under the backlog lock); every submission in it holds a
        # backlog slot, which bounds the submissions; the rest are a few per task.
        self._ops: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        # The writer: blocks in _ops.get() (wakeups: an op, the None sentinel from close(), the
        # next pruning time). Not a daemon: close() joins it, so that what was queued before
        # the server stopped is committed; it never waits on anything but the disk.
        self._writer = threading.Thread(target=self._write_guarded, name="taskorch-serve-journal")
        self._next_prune = 0.0
        self._started = self._closed = False
        self.last_failure: str | None = None  # the last failed transaction (writer thread)

    def _open(self, path: str | None, synchronous: str) -> sqlite3.Connection:
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
                self._check_existing(db, path)
            if path is not None:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise JournalError(f"the journal {path} could not be switched to WAL mode")
                db.execute(f"PRAGMA synchronous={synchronous}")
            if fresh:
                db.executescript(f"BEGIN; {_SCHEMA} COMMIT;")
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
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

    @staticmethod
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

    # -- before start(): recovery (main thread) ---------------------------------------------

    def rows_to_recover(self) -> list[Row]:
        """Tasks not done, oldest first: the ones a previous server accepted and did not end."""
        cursor = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM tasks WHERE state != 'done' ORDER BY id")
        return [Row(*r) for r in cursor]

    def requeue(self, charged: list[tuple[int, int]]) -> None:
        """Recovery: these running tasks go back to queued with their attempts charged."""
        with self._transaction():
            self._db.executemany(
                "UPDATE tasks SET state='queued', attempts=? WHERE id=?",
                [(attempts, task_id) for task_id, attempts in charged])

    def counts(self) -> dict[str, int]:
        """Records by state (and by outcome code for done ones, as ``done:N``); for tests and
        logs. Safe from the main thread before start() or after close() only."""
        out: dict[str, int] = {}
        for state, outcome, n in self._db.execute(
                "SELECT state, outcome, count(*) FROM tasks GROUP BY state, outcome"):
            key = state if state != DONE else f"done:{outcome}"
            out[key] = n
        return out

    def unwritable(self) -> str | None:
        """Why the journal cannot take submissions now (its last transaction failed, or its
        writer stopped), else None: ``/readyz``'s "journal" check (any thread)."""
        if self._started and not self._writer.is_alive() and not self._closed:
            return "the journal's writer thread has stopped"
        return None if self.last_failure is None else f"the last commit failed: {self.last_failure}"

    def schedule_states(self) -> dict[str, float]:
        """Each schedule's last fire time (Unix time), as the last server left it (before
        ``start()``: main thread)."""
        rows = self._db.execute("SELECT name, last_fire FROM schedules WHERE last_fire IS NOT NULL")
        return {name: float(fire) for name, fire in rows}

    # -- producers (any thread; never block) --------------------------------------------------

    def schedule_fired(self, name: str, tick: float) -> None:
        self._ops.put(("schedule_fired", name, tick))

    def schedule_ended(self, name: str, outcome: str, seconds: float | None) -> None:
        self._ops.put(("schedule_ended", name, outcome, seconds))

    def start(self) -> None:
        self._next_prune = time.monotonic()
        self._writer.start()
        self._started = True

    def submit(self, client: bytes, sub: int, payload: bytes, policy: bytes | None,
               on_commit: OnCommit) -> None:
        self._ops.put(("submit", client, sub, payload, policy, on_commit))

    def find(self, client: bytes, sub: int, on_row: Callable[[Row | None], None]) -> None:
        """The record of submission ``sub`` of ``client``, if any (after what is queued)."""
        self._ops.put(("find", client, sub, on_row))

    def started(self, task_id: int, attempts: int) -> None:
        self._ops.put(("started", task_id, attempts))

    def finished(self, task_id: int, outcome: int, attempts: int, seconds: float | None,
                 data: bytes) -> None:
        self._ops.put(("finished", task_id, outcome, attempts, seconds, data))

    def forget(self, task_id: int, then: Callable[[], None]) -> None:
        """Delete a record that was committed but not enqueued (the server was stopping)."""
        self._ops.put(("forget", task_id, then))

    def lookup(self, task_id: int, on_row: Callable[[Row | None], None]) -> None:
        self._ops.put(("lookup", task_id, on_row))

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the file, release the lock."""
        if self._closed:
            return
        self._closed = True
        if self._writer.is_alive():
            self._ops.put(None)
            self._writer.join()
        self._db.close()
        self._unlock()

    # -- the writer ---------------------------------------------------------------------------

    def _write_guarded(self) -> None:
        while True:
            try:
                if not self._write():
                    return
            except BaseException:  # a bug: log it and go on, the server depends on this thread
                log.exception("taskorch serve: the journal writer failed; continuing")

    def _write(self) -> bool:
        """One batch. False once the sentinel is seen (after committing what preceded it)."""
        timeout = max(0.0, self._next_prune - time.monotonic())
        try:
            first = self._ops.get(timeout=timeout)
        except queue.Empty:
            self._prune()
            return True
        ops = [first]
        while first is not None and len(ops) < MAX_BATCH:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                break
            ops.append(op)
            if op is None:
                break
        more = ops[-1] is not None
        # A task that started and ended within one batch needs no "running" record.
        ended = {op[1] for op in ops if op is not None and op[0] == "finished"}
        batch = [op for op in ops
                 if op is not None and not (op[0] == "started" and op[1] in ended)]
        callbacks: list[Callable[[], None]] = []
        try:
            with self._transaction():
                for op in batch:
                    callbacks.append(self._apply(op))
            self.last_failure = None
        except sqlite3.Error as exc:
            self.last_failure = f"{type(exc).__name__}: {exc}"
            callbacks = [self._refuse(op, exc) for op in batch]
        for callback in callbacks:
            try:
                callback()
            except BaseException:
                log.exception("taskorch serve: a journal callback failed")
        if time.monotonic() >= self._next_prune:
            self._prune()
        return more

    def _apply(self, op: tuple[Any, ...]) -> Callable[[], None]:
        """Apply one op inside the batch's transaction; return what to call after COMMIT."""
        db = self._db
        kind = op[0]
        if kind == "submit":
            _, client, sub, payload, policy, on_commit = op
            cursor = db.execute(
                "INSERT OR IGNORE INTO tasks (client, sub, payload, policy, state, submitted) "
                "VALUES (?, ?, ?, ?, 'queued', ?)", (client, sub, payload, policy, time.time()))
            if cursor.rowcount == 1:
                task_id = cursor.lastrowid
                assert task_id is not None
                return lambda: on_commit(task_id, None, None)
            existing = self._find(client, sub)
            assert existing is not None
            return lambda: on_commit(existing.id, existing, None)
        if kind == "find":
            _, client, sub, on_row = op
            row = self._find(client, sub)
            return lambda: on_row(row)
        if kind == "started":
            _, task_id, attempts = op
            db.execute("UPDATE tasks SET state='running', attempts=?, started=? "
                       "WHERE id=? AND state != 'done'", (attempts, time.time(), task_id))
            return _nothing
        if kind == "finished":
            _, task_id, outcome, attempts, seconds, data = op
            db.execute(
                "UPDATE tasks SET state='done', payload=NULL, attempts=?, finished=?, outcome=?, "
                "seconds=?, data=? WHERE id=?",
                (attempts, time.time(), outcome, seconds, data, task_id))
            return _nothing
        if kind == "schedule_fired":
            db.execute("INSERT INTO schedules (name, last_fire) VALUES (?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET last_fire=excluded.last_fire", (op[1], op[2]))
            return _nothing
        if kind == "schedule_ended":
            db.execute("INSERT INTO schedules (name, last_outcome, last_seconds) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET last_outcome=excluded.last_outcome, "
                       "last_seconds=excluded.last_seconds", (op[1], op[2][:1000], op[3]))
            return _nothing
        if kind == "forget":
            _, task_id, then = op
            db.execute("DELETE FROM tasks WHERE id=?", (task_id,))
            return then  # type: ignore[no-any-return]
        assert kind == "lookup", op
        _, task_id, on_row = op
        found = db.execute(f"SELECT {_ROW_COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
        result = None if found is None else Row(*found)
        return lambda: on_row(result)

    def _refuse(self, op: tuple[Any, ...], exc: sqlite3.Error) -> Callable[[], None]:
        """The batch failed: what each op's caller learns."""
        kind = op[0]
        if kind == "submit":
            on_commit = op[-1]
            error = JournalError(
                f"taskorch serve could not write the task to its journal ({exc}): it was NOT "
                "accepted and will not run. The server's disk may be full")
            return lambda: on_commit(0, None, error)
        if kind in ("find", "lookup"):
            on_row = op[-1]
            return lambda: on_row(None)
        if kind == "forget":
            return op[-1]  # type: ignore[no-any-return]
        log.error("taskorch serve: journal write failed (%s): the %s record of task %d is lost; "
                  "after a restart that task would run again", exc, kind, op[1])
        return _nothing

    def _find(self, client: bytes, sub: int) -> Row | None:
        found = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM tasks WHERE client=? AND sub=?", (client, sub)).fetchone()
        return None if found is None else Row(*found)

    def _prune(self) -> None:
        """Delete up to PRUNE_CHUNK outcomes older than the TTL; come back soon if more."""
        cutoff = time.time() - self.result_ttl
        try:
            with self._transaction():
                deleted = self._db.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished < ? "
                    "LIMIT ?)", (cutoff, PRUNE_CHUNK)).rowcount
            self.last_failure = None  # a commit went through: writable again (readiness)
        except sqlite3.Error as exc:
            log.warning("taskorch serve: pruning the journal failed: %s", exc)
            deleted = 0
        pause = 0.0 if deleted == PRUNE_CHUNK else max(
            PRUNE_MIN_INTERVAL, min(PRUNE_INTERVAL, self.result_ttl / 2))
        self._next_prune = time.monotonic() + pause

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


class _Transaction:
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


def _lock(path: str) -> int:
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


def _nothing() -> None:
    pass
