"""``taskorch serve``'s journal: every accepted task, in SQLite (server process).

One thread, "taskorch-serve-journal" (the writer), owns the sqlite3 connection after
``start()``; before it, the main thread opens the file (``journal_file``: lock, schema,
checks) and reads it for recovery. Everyone else (connection readers, the dispatcher's start
hook, whichever thread resolves a task's future, the asyncio thread) only puts operations on
``_ops`` and is called back by the writer.

    submitters / hooks                     "taskorch-serve-journal"
    ------------------                     ------------------------
    submit(..., on_commit) --+
    started(id, attempts) ---+--> _ops --> take every op queued (up to MAX_BATCH),
    finished(id, ..., then) -+             apply them in ONE transaction (one executemany
    lookup(id, on_row) ------+             per kind of write), COMMIT, then call back: the
                                           submissions in order, the outcomes, then the
                                           rest in order (``_apply_all``): group commit;
                                           the registry's callbacks one call per batch
                                           and kind (``callbacks.Grouped``)

Group commit: while one transaction commits (an fsync with ``synchronous=FULL``), the
submissions that arrive queue up, and the next transaction takes them all; a submitter waits
for at most the commit in progress plus its own. There is one writer, so SQLite's "database is
locked" between writers cannot happen (a second server is refused by ``journal_file``'s lock).

Records (table ``tasks``): the task id clients see (given by the writer, never reused), the
client's token and submission number (unique together: a submission retried over a new
connection finds its record instead of making a second one), the call and policy bytes, state
(queued, running, done), attempts charged, timestamps (wall clock: the result TTL spans
restarts), its ``options()`` (priority, times, key, the ids it runs after: ``submissions``
dedups by key and checks those ids as it inserts), and for a done task its outcome (the
``S_DONE`` fields: outcome code, seconds, data).
A task that succeeded drops its call bytes (others keep them: ``Client.retry()``). ``records``
has the operator's columns. Outcomes older than ``result_ttl`` are deleted by the writer, at
most PRUNE_CHUNK rows per transaction, so that pruning never holds submissions long.

Failure: a transaction that fails (a full disk, an I/O error, or any exception while applying
it) is rolled back whole; its submissions are refused (their callbacks get ``JournalError``:
never run, never half-written), and the state changes it carried (starts, outcomes, schedule
records, forgotten records) are kept and applied again with the next batch, at the latest
after RETRY_PAUSE: an outcome is published only once committed, so a client never sees the
result of a task that the journal would run again. Until they are committed the journal says
why it is unwritable (``/readyz``). The writer itself never dies of it.

Durability: ``synchronous=FULL`` (the default) syncs the WAL at every commit, so an accepted
task survives a power loss; ``NORMAL`` syncs only at checkpoints: it survives a crash of the
process (SIGKILL, OOM), not of the machine. ``path=None`` keeps the journal in memory
(``--no-journal``): the same code, ids and dedup, no durability.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Any, Callable

from taskorch._errors import JournalError
from taskorch._service.protocol import SERVICE_MAX_FRAME, WireTiming
from taskorch._service.server.callbacks import Calls, Grouped, nothing
from taskorch._service.server.journal_file import (
    ROW_COLUMNS,
    Mark,
    Row,
    Transaction,
    next_task_id,
    open_journal,
    open_marked,
)
from taskorch._service.server.journal_rows import write_starts_and_ends
from taskorch._service.server.outbox import OUTBOX_LIMIT, ByteBound, data_bytes
from taskorch._service.server.submissions import (
    Existing,
    OnCommit,
    dependency_rows,
    find_submission,
    insert_submissions,
)

log = logging.getLogger("taskorch")

#: Most operations applied in one transaction: bounds how long a commit keeps the callbacks of
#: the submissions in it waiting, and the memory of one batch.
MAX_BATCH = 2000
#: Rows deleted per pruning transaction; another follows at once while more are due.
PRUNE_CHUNK = 1000
#: Longest and shortest pause between two pruning passes (half the TTL between them).
PRUNE_INTERVAL = 60.0
PRUNE_MIN_INTERVAL = 1.0
#: After a failed transaction, the longest wait before its state changes are tried again (a
#: disk that was full may have room now).
RETRY_PAUSE = 0.5
#: Kinds of operation that a failed transaction keeps for the next one (the others are
#: answered at once: submissions refused, reads answered "not found").
_KEPT = frozenset({"started", "finished", "forget", "schedule_fired", "schedule_ended"})

QUEUED, RUNNING, DONE = "queued", "running", "done"
_PLAIN = (0, None, None)  # a submission's timing without options()
#: Outcomes of at least this many bytes count in MAX_QUEUED_BYTES (smaller ones skip its lock).
LARGE_OUTCOME = 4096
#: Most bytes of large outcomes waiting for the writer: past it, whoever ends a task waits.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
#: Default largest result a task may return through ``taskorch serve``: what one frame carries.
MAX_RESULT_BYTES = SERVICE_MAX_FRAME - 4096



class Journal:
    """Open (and lock) the journal at ``path``, or an in-memory one for ``path=None``.

    Raises ``JournalError`` with the reason for a journal it cannot use: locked by another
    server, not a database or corrupt, a schema it does not know, not writable. Nothing in
    the file is changed then. ``rows_to_recover()``, then ``start()``; ``close()`` at the end.
    """

    def __init__(self, path: str | None, *, result_ttl: float = 3600.0,
                 synchronous: str = "FULL", recover_damaged: bool = False,
                 max_result_bytes: int = MAX_RESULT_BYTES,
                 outbox_bytes: int = OUTBOX_LIMIT) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        # What the journal keeps out of RAM (read by the registry and the connections): a
        # larger result fails its task; past ``outbox_bytes`` of outcomes a connection has not
        # sent, the rest wait here (``outbox``).
        self.max_result_bytes = max_result_bytes
        self.outbox_bytes = outbox_bytes
        self.path = path
        self.durable = path is not None
        self.result_ttl = result_ttl
        self._lock_fd: int | None = None
        self._mark: Mark | None = None
        if path is None:
            self._db, self._inserted, marked_next = open_journal(None, synchronous, True), 0, 0
        else:  # (locked, checked against its mark: see journal_file)
            self._lock_fd, self._mark, self._db, self._inserted = open_marked(
                path, synchronous, recover_damaged)
            marked_next = self._mark.next_id
        # Operations for the writer (see the module docstring). Unbounded: its producers must
        # never block (one runs under the backlog lock); every submission in it holds a
        # backlog slot, which bounds the submissions; the rest are a few per task.
        self._ops: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        # The writer: blocks in _ops.get() (wakeups: an op, the None sentinel from close(), the
        # next pruning time). Not a daemon: close() joins it, so that what was queued before
        # the server stopped is committed; it never waits on anything but the disk.
        self._writer = threading.Thread(target=self._write_guarded, name="taskorch-serve-journal")
        self._next_prune = 0.0
        # Large outcomes queued or kept, not yet committed: finished() waits past the bound.
        self._queued = ByteBound(MAX_QUEUED_BYTES)
        self._started = self._closed = False
        # The next task id (writer thread): ids are given here rather than by SQLite, so that
        # a batch of submissions is one executemany(); never reused, as AUTOINCREMENT's are
        # (an explicit id above the table's sequence moves the sequence).
        # (Above the mark's too: ids of tasks lost to damage are never given again.)
        self._next_id = max(next_task_id(self._db), marked_next)
        if self._mark is not None:
            self._mark.write(self._inserted, self._next_id)
        self.last_failure: str | None = None  # the last failed transaction (writer thread)
        # State changes of failed transactions, to apply again (writer thread; see _KEPT).
        self._kept: list[tuple[Any, ...]] = []
        self._retry_at = 0.0

    # -- before start(): recovery (main thread) ---------------------------------------------

    def rows_to_recover(self) -> list[Row]:
        """Tasks not done, oldest first: the ones a previous server accepted and did not end
        (their status is queued or running, ``journal_file``'s listing index finds them; a
        server older than the status column wrote none, and left a finished row's stale:
        its state says)."""
        cursor = self._db.execute(
            f"SELECT {ROW_COLUMNS} FROM tasks WHERE (status IN ('queued', 'running') "
            "OR status IS NULL) AND state != 'done' ORDER BY id")
        return [Row(*r) for r in cursor]

    def dependency_rows(self, ids: list[int]) -> dict[int, Row]:
        """Recovery: the rows of those of ``ids`` that exist (the dependencies that ended)."""
        return dependency_rows(self._db, ids)

    def requeue(self, charged: list[tuple[int, int]]) -> None:
        """Recovery: these running tasks go back to queued with their attempts charged."""
        with self._transaction():
            self._db.executemany(
                "UPDATE tasks SET state='queued', attempts=? WHERE id=?",
                [(attempts, task_id) for task_id, attempts in charged])

    def unwritable(self) -> str | None:
        """Why the journal cannot take submissions now (its last transaction failed, or its
        writer stopped), else None: ``/readyz``'s "journal" check (any thread)."""
        if self._started and not self._writer.is_alive() and not self._closed:
            return "the journal's writer thread has stopped"
        failure = self.last_failure
        return None if failure is None else (
            f"the last commit failed ({failure}); outcomes wait for the next one")

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
               on_commit: OnCommit | Grouped, timing: WireTiming | None = None,
               key: str | None = None, after: tuple[int, ...] | None = None) -> None:
        """Journal a submission (``submissions``: a retry, a key or a bad ``after`` may
        answer it otherwise); ``on_commit`` once committed or refused (a ``Grouped``: with
        the batch's others, ``callbacks``)."""
        self._ops.put(("submit", client, sub, payload, policy, on_commit, timing or _PLAIN,
                       key, after))

    def find(self, client: bytes, sub: int, on_row: Callable[[Existing | None], None]) -> None:
        """The record of submission ``sub`` of ``client``, if any: its own or the one it
        joined (after what is queued)."""
        self._ops.put(("find", client, sub, on_row))

    def started(self, task_id: int, attempts: int, pid: int | None = None) -> None:
        self._ops.put(("started", task_id, attempts, pid))

    def finished(self, task_id: int, outcome: int, attempts: int, seconds: float | None,
                 data: Any, then: Callable[[], None] | Grouped, status: str = "failed",
                 progress: bytes | None = None) -> None:
        """The task's outcome (``data``: S_DONE's, builtins, pickled by the writer; ``status``
        and ``progress``, pickled: ``records``'); ``then()`` once committed (or failed to be)."""
        size = len(data) if type(data) is bytes else data_bytes(data)  # (once per task)
        if size >= LARGE_OUTCOME:  # (small ones are bounded by the tasks in flight)
            self._queued.add(size, self._may_wait)
        self._ops.put(("finished", task_id, outcome, attempts, seconds, data, then, status,
                       progress))

    def run(self, fn: Callable[[sqlite3.Connection], Any], then: Callable[[Any], None]) -> None:
        """``fn(db)`` in a transaction; then ``then(its result, or a JournalError)``."""
        self._ops.put(("run", fn, then))

    def forget(self, task_id: int, then: Callable[[], None]) -> None:
        """Delete a record that was committed but not enqueued (withdrawn, or the server was
        stopping), before the submissions of its batch; then ``then()``."""
        self._ops.put(("forget", task_id, then))

    def lookup(self, task_id: int, on_row: Callable[[Row | None], None]) -> None:
        self._ops.put(("lookup", task_id, on_row))

    def flush(self, timeout: float) -> bool:
        """Wait until every op queued before this call is applied and its callback has run
        (outcomes published included); False if ``timeout`` passed first. Any thread but the
        writer."""
        if not self._writer.is_alive():
            return True  # not started, or closed: nothing is pending
        done = threading.Event()
        self._ops.put(("flush", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the file, release the lock."""
        if self._closed:
            return
        self._closed = True
        if self._writer.is_alive():
            self._ops.put(None)
            self._writer.join()
        self._queued.release(0)  # (wakes a producer waiting for the writer that ended)
        if self._kept:
            log.error("taskorch serve: %d journal records could not be committed before the "
                      "server stopped (their tasks run again at the next start)",
                      len(self._kept))
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
        due = min(self._next_prune, self._retry_at) if self._kept else self._next_prune
        try:
            first = self._ops.get(timeout=max(0.0, due - time.monotonic()))
        except queue.Empty:
            if self._kept:
                self._commit([])
            if time.monotonic() >= self._next_prune:
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
        self._commit([op for op in ops if op is not None])
        if time.monotonic() >= self._next_prune:
            self._prune()
        return more

    def _commit(self, new: list[tuple[Any, ...]]) -> None:
        """Apply what failed before and ``new`` in one transaction, then call back."""
        batch = self._kept + new
        self._kept = []
        inserted = self._inserted
        try:
            with self._transaction():
                calls = self._apply_all(batch)
            self.last_failure = None
            if self._mark is not None and self._inserted != inserted:
                self._mark.write(self._inserted, self._next_id)
            self._release(batch)
        except Exception as exc:  # any: the batch failed, and with it only its submissions
            self._inserted = inserted
            self.last_failure = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + RETRY_PAUSE
            if len(batch) > 1 and not isinstance(exc, sqlite3.Error):
                log.warning("taskorch serve: a journal transaction failed (%s); its "
                            "submissions are refused", self.last_failure)
            calls = Calls()
            for op in batch:
                self._refuse(op, exc, calls)
            if self._kept and not isinstance(exc, sqlite3.Error) and len(batch) == len(
                    self._kept):  # nothing but kept changes, and not the disk: a bad one
                self._kept = self._apply_alone(self._kept)
        calls.run()

    def _release(self, done: list[tuple[Any, ...]]) -> None:
        """The large outcomes among ``done`` (committed, or dropped) leave the byte bound."""
        if self._queued.queued:
            self._queued.release(sum(n for n in (data_bytes(op[5]) for op in done if op[0]
                                                 == "finished") if n >= LARGE_OUTCOME))

    def _may_wait(self) -> bool:
        return self._writer.is_alive() and threading.current_thread() is not self._writer

    def _apply_alone(self, kept: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Kept changes that failed together for another reason than the disk: each in its
        own transaction, so that one that cannot be applied (a bug) does not hold the others;
        it is logged and dropped. Returns the ones that failed for the disk."""
        left: list[tuple[Any, ...]] = []
        for op in kept:
            try:
                with self._transaction():
                    calls = self._apply_all([op])
            except sqlite3.Error:
                left.append(op)
                continue
            except Exception:
                log.exception("taskorch serve: cannot journal the %s record of task %s; "
                              "dropped", op[0], op[1])
                self._release([op])
                continue
            self._release([op])
            calls.run()
        return left

    def _apply_all(self, batch: list[tuple[Any, ...]]) -> Calls:
        """Apply a batch inside its transaction; return what to call after COMMIT, in order:
        the submissions (in their order), the outcomes, the forgotten, then the other ops in
        theirs. The writes go first, by kind, one ``executemany`` each (one task's ops are never
        in one batch out of order: it starts only once its submission is committed; forgotten
        records go before the new ones, which must not join them), then the reads, which see
        every write of the batch."""
        db = self._db
        now = time.time()
        by_kind: dict[str, list[tuple[Any, ...]]] = {"forget": [], "submit": [], "started": [],
                                                     "finished": []}
        others: list[tuple[Any, ...]] = []
        for op in batch:
            (by_kind[op[0]] if op[0] in by_kind else others).append(op)
        if by_kind["forget"]:  # first: no submission of the batch joins a record forgotten here
            db.executemany("DELETE FROM tasks WHERE id=?", [(op[1],) for op in by_kind["forget"]])
        calls = Calls()
        self._insert(by_kind["submit"], now, calls)
        write_starts_and_ends(db, by_kind["started"], by_kind["finished"], now)
        for op in by_kind["finished"]:
            calls.add(op[6])
        for op in by_kind["forget"]:
            calls.add(op[2])
        for op in others:
            calls.add(self._apply(op))
        return calls

    def _insert(self, submits: list[tuple[Any, ...]], now: float, calls: Calls) -> None:
        """New records for submissions, with the next ids (``submissions``)."""
        if not submits:
            return
        first = self._next_id
        self._next_id += len(submits)
        inserted = insert_submissions(self._db, submits, first, now, calls)
        if inserted:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key='inserted'",
                             (inserted,))
            self._inserted += inserted

    def _apply(self, op: tuple[Any, ...]) -> Callable[[], None]:
        """Apply one op other than a submission, start or outcome inside the batch's
        transaction; return what to call after COMMIT."""
        db = self._db
        kind = op[0]
        if kind == "find":
            _, client, sub, on_row = op
            row = find_submission(db, client, sub)
            return lambda: on_row(row)
        if kind == "schedule_fired":
            db.execute("INSERT INTO schedules (name, last_fire) VALUES (?, ?) ON CONFLICT (name) "
                       "DO UPDATE SET last_fire=excluded.last_fire", (op[1], op[2]))
            return nothing
        if kind == "schedule_ended":
            db.execute("INSERT INTO schedules (name, last_outcome, last_seconds) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET last_outcome=excluded.last_outcome, "
                       "last_seconds=excluded.last_seconds", (op[1], op[2][:1000], op[3]))
            return nothing
        if kind == "run":  # (the operator's)
            return functools.partial(op[2], op[1](db))
        if kind == "flush":  # (its callback runs after every other of the batch: see above)
            return op[1].set  # type: ignore[no-any-return]
        assert kind == "lookup", op
        _, task_id, on_row = op
        found = db.execute(f"SELECT {ROW_COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
        result = None if found is None else Row(*found)
        return lambda: on_row(result)

    def _refuse(self, op: tuple[Any, ...], exc: Exception, calls: Calls) -> None:
        """The batch failed: what each op's caller learns; the state changes are kept."""
        kind = op[0]
        if kind == "submit":
            calls.add(op[5], 0, None, JournalError(
                f"taskorch serve could not write the task to its journal ({exc}): it was NOT "
                "accepted and will not run. The server's disk may be full"), None)
        elif kind in ("find", "lookup", "run"):  # answered, not kept
            calls.add(op[-1], JournalError(f"the journal failed: {exc}") if kind == "run"
                      else None)
        elif kind == "flush":
            calls.add(op[1].set)
        else:
            if kind == "finished" and not any(k[0] == "finished" for k in self._kept):
                log.error("taskorch serve: journal write failed (%s): outcomes wait until "
                          "they are committed (task %d first)", exc, op[1])
            self._kept.append(op)

    def _prune(self) -> None:
        """Delete up to PRUNE_CHUNK outcomes older than the TTL; come back soon if more."""
        cutoff = time.time() - self.result_ttl
        try:
            with self._transaction():
                deleted = self._db.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished < ? "
                    "LIMIT ?)", (cutoff, PRUNE_CHUNK)).rowcount
            if not self._kept:
                self.last_failure = None  # a commit went through: writable again (readiness)
        except sqlite3.Error as exc:
            log.warning("taskorch serve: pruning the journal failed: %s", exc)
            deleted = 0
        pause = 0.0 if deleted == PRUNE_CHUNK else max(
            PRUNE_MIN_INTERVAL, min(PRUNE_INTERVAL, self.result_ttl / 2))
        self._next_prune = time.monotonic() + pause

    def _transaction(self) -> Transaction:
        return Transaction(self._db)

    def _unlock(self) -> None:
        if self._mark is not None:
            self._mark.close()
            self._mark = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

