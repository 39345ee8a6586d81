"""A priority queue with external storage, and the job that physically deletes its dead nodes.

Runs in: ``ExternalPriorityQueue`` in the application's threads (one instance per thread: a
``sqlite3`` connection is not shared across threads); ``purge_deleted`` in a worker process,
main thread, sent there by value (``taskorch run workers/pq_compact.py:purge_deleted``).
Stdlib only, nothing at import.

The motivating consumer of taskorch: a concurrent priority queue whose elements are too big
for memory and live as blob files in a directory, indexed by a SQLite table of nodes
``(id, priority, deleted, blob, size)``.  On the hot path a pop or a removal only flips
``deleted`` to 1 in one short transaction; unlinking the blob and deleting the row is slow
I/O that the queue hands to taskorch as ``purge_deleted(db_path)``.

The invariant that makes the split safe: once a node is marked deleted it never comes back
and nobody opens its blob again (``pop_min`` reads the blob before it marks the node, inside
the same transaction).  So the purge can unlink blobs without holding any lock, and it does
so *before* deleting their rows: a crash in between leaves rows whose blobs are gone, which
the rerun counts as ``blobs_missing`` and deletes.  The opposite order could leak blob files
that no row points to any more.

Accepted limits of this model: blob files are not fsynced and the database runs WAL with
``synchronous=NORMAL``, so a process crash loses nothing committed but a power loss can lose
the last pushes; a crash inside ``push`` between writing the blob and inserting its row
leaves an orphan blob file that nothing removes (a sweep would race with pushes in flight).
"""

from __future__ import annotations

import math
import os
import pathlib
import secrets
import sqlite3
from collections.abc import Iterable
from types import TracebackType
from typing import Any

STORE_FORMAT = "taskorch.external_pq/1"
BLOB_SUFFIX = ".blob"

# See sqlite_purge._BUSY_TIMEOUT_S: wait out other connections' short transactions, but turn
# a wedged lock into a visible error rather than a hang.
_BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- AUTOINCREMENT: a purged id is never handed out again, so an id in a log stays unambiguous.
CREATE TABLE IF NOT EXISTS nodes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    priority REAL    NOT NULL,
    deleted  INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    blob     TEXT    NOT NULL UNIQUE,  -- file name inside the blob directory, never a path
    size     INTEGER NOT NULL
);
-- Partial indexes: pop_min walks only live nodes, the purge only dead ones.
CREATE INDEX IF NOT EXISTS nodes_live ON nodes (priority, id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS nodes_dead ON nodes (id) WHERE deleted = 1;
"""


class ExternalPriorityQueue:
    """Min-priority queue: SQLite holds the order, the elements are files in ``blob_dir``.

    Ties in priority pop in push order.  Removal is logical (``mark_deleted``, ``pop_min``);
    ``purge_deleted`` reclaims the space later.
    """

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        """Open an existing store (``create`` makes one)."""
        self.db_path = os.fspath(db_path)
        self._conn = _connect_store(self.db_path)
        try:
            self.blob_dir = _read_blob_dir(self._conn, self.db_path)
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def create(
        cls, db_path: str | os.PathLike[str], blob_dir: str | os.PathLike[str]
    ) -> ExternalPriorityQueue:
        """Create a store (or open it again: idempotent for the same ``blob_dir``)."""
        path = os.fspath(db_path)
        blobs = os.path.abspath(os.fspath(blob_dir))
        os.makedirs(blobs, exist_ok=True)
        # Stored relative to the database's directory, so the pair can be moved together.
        relative = os.path.relpath(blobs, os.path.dirname(os.path.abspath(path)))
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
        try:
            try:
                listing = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                tables = {row[0] for row in listing}
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_NOTADB":
                    raise
                raise ValueError(f"{path!r} exists and is not a SQLite database") from exc
            if tables and "meta" not in tables:
                # Never graft the queue's tables onto someone else's database.
                raise ValueError(
                    f"{path!r} is an existing database, not an ExternalPriorityQueue store"
                )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (STORE_FORMAT,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('blob_dir', ?)", (relative,))
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            conn.execute("COMMIT")
        finally:
            conn.close()
        if stored.get("format") != STORE_FORMAT:
            raise ValueError(f"{path!r} holds a different format: {stored.get('format')!r}")
        if stored["blob_dir"] != relative:
            raise ValueError(
                f"store {path!r} already exists with blob directory {stored['blob_dir']!r} "
                f"(relative to the database), not {relative!r}"
            )
        return cls(path)

    def push(self, priority: float, payload: bytes) -> int:
        """Store ``payload`` as a blob file and enqueue it; return the node id."""
        return self.push_many([(priority, payload)])[0]

    def push_many(self, items: Iterable[tuple[float, bytes]]) -> list[int]:
        """Push several elements in one transaction (one commit instead of one per element)."""
        written: list[tuple[float, str, int]] = []
        try:
            for priority, payload in items:
                _check_priority(priority)
                if not isinstance(payload, (bytes, bytearray, memoryview)):
                    raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
                name = secrets.token_hex(16) + BLOB_SUFFIX
                target = os.path.join(self.blob_dir, name)
                # Blob first, row second: a crash leaves an orphan file, never a row
                # pointing at nothing.  Temp + replace: a reader never sees half a blob.
                with open(target + ".tmp", "wb") as f:
                    f.write(payload)
                os.replace(target + ".tmp", target)
                written.append((float(priority), name, len(payload)))
            self._conn.execute("BEGIN IMMEDIATE")
            ids: list[int] = []
            for row in written:
                cur = self._conn.execute(
                    "INSERT INTO nodes (priority, blob, size) VALUES (?, ?, ?)", row
                )
                assert cur.lastrowid is not None  # set by every successful INSERT
                ids.append(cur.lastrowid)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.rollback()
            for _, name, _ in written:  # no row will point at them
                _unlink_missing_ok(os.path.join(self.blob_dir, name))
            raise
        return ids

    def mark_deleted(self, node_id: int) -> bool:
        """Logically delete a node: the hot-path half of removal.  True if it was live."""
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise TypeError(f"node_id must be an int, got {node_id!r}")
        cur = self._conn.execute(
            "UPDATE nodes SET deleted = 1 WHERE id = ? AND deleted = 0", (node_id,)
        )
        return cur.rowcount == 1

    def pop_min(self) -> tuple[int, float, bytes] | None:
        """Remove and return ``(id, priority, payload)`` of the lowest priority, or None."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute(
                "SELECT id, priority, blob FROM nodes WHERE deleted = 0 "
                "ORDER BY priority, id LIMIT 1"
            ).fetchone()
            if row is None:
                self._conn.execute("COMMIT")
                return None
            node_id, priority, blob = row
            with open(os.path.join(self.blob_dir, blob), "rb") as f:
                payload = f.read()
            self._conn.execute("UPDATE nodes SET deleted = 1 WHERE id = ?", (node_id,))
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.rollback()
            raise
        return int(node_id), float(priority), payload

    def __len__(self) -> int:
        """The number of live nodes."""
        return int(self._conn.execute("SELECT count(*) FROM nodes WHERE deleted = 0").fetchone()[0])

    def dead_count(self) -> int:
        """The number of nodes marked deleted and not purged yet."""
        return int(self._conn.execute("SELECT count(*) FROM nodes WHERE deleted = 1").fetchone()[0])

    def close(self) -> None:
        """Close the connection; idempotent."""
        self._conn.close()

    def __enter__(self) -> ExternalPriorityQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def purge_deleted(db_path: str | os.PathLike[str], *, chunk_size: int = 500) -> dict[str, Any]:
    """Unlink the blobs of nodes marked deleted, then delete their rows, ``chunk_size`` at a time.

    Each chunk: read up to ``chunk_size`` dead nodes (no lock held), unlink their blobs (an
    already missing blob is fine: a previous attempt got that far), then delete exactly
    those rows in one short write transaction, so the queue's hot path waits at most for
    one ``DELETE`` of ``chunk_size`` rows.  Nodes marked deleted while the purge runs, behind
    its cursor, are left for the next run.

    Returns ``{"db_path", "blob_dir", "rows_deleted", "blobs_deleted", "blobs_missing",
    "bytes_freed", "chunks"}``.
    """
    path = os.fspath(db_path)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    conn = _connect_store(path)
    try:
        blob_dir = _read_blob_dir(conn, path)
        if not os.path.isdir(blob_dir):
            # Deleting rows now would leak every blob wherever the directory really is.
            raise FileNotFoundError(
                f"blob directory {blob_dir!r} of store {path!r} does not exist; "
                "was the database moved without its blobs?"
            )
        rows_deleted = blobs_deleted = blobs_missing = bytes_freed = chunks = 0
        last_id = 0
        while True:
            dead = conn.execute(
                "SELECT id, blob FROM nodes WHERE deleted = 1 AND id > ? ORDER BY id LIMIT ?",
                (last_id, chunk_size),
            ).fetchall()
            if not dead:
                break
            # Check every name before unlinking any, so a bad row stops the chunk untouched.
            blob_paths = [os.path.join(blob_dir, _check_blob_name(b, path)) for _, b in dead]
            for blob_path in blob_paths:
                try:
                    size = os.lstat(blob_path).st_size
                    os.unlink(blob_path)
                except FileNotFoundError:
                    blobs_missing += 1
                    continue
                blobs_deleted += 1
                bytes_freed += size
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Exactly the ids whose blobs are gone; "deleted = 1" is a belt and braces.
                cur = conn.executemany(
                    "DELETE FROM nodes WHERE id = ? AND deleted = 1", [(i,) for i, _ in dead]
                )
                rows_deleted += cur.rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            chunks += 1
            last_id = int(dead[-1][0])
    finally:
        conn.close()
    return {
        "db_path": path,
        "blob_dir": blob_dir,
        "rows_deleted": rows_deleted,
        "blobs_deleted": blobs_deleted,
        "blobs_missing": blobs_missing,
        "bytes_freed": bytes_freed,
        "chunks": chunks,
    }


def _connect_store(path: str) -> sqlite3.Connection:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"priority-queue store {path!r} does not exist (ExternalPriorityQueue.create makes one)"
        )
    uri = pathlib.Path(path).absolute().as_uri() + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
    # Per connection, not stored in the file: WAL commits need no fsync with NORMAL.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _read_blob_dir(conn: sqlite3.Connection, path: str) -> str:
    not_a_store = f"{path!r} is not an ExternalPriorityQueue store"
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and "no such table" not in str(exc):
            raise  # e.g. "database is locked": transient, let a retry policy see it
        raise ValueError(f"{not_a_store} ({exc})") from exc
    if meta.get("format") != STORE_FORMAT or "blob_dir" not in meta:
        raise ValueError(f"{not_a_store} (format {meta.get('format')!r})")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), meta["blob_dir"]))


def _check_blob_name(blob: object, path: str) -> str:
    # Rows name files to delete: a path here (a corrupt or hostile row) could point anywhere.
    if (
        not isinstance(blob, str)
        or blob in ("", ".", "..")
        or "/" in blob
        or "\\" in blob
        or os.sep in blob
        or "\0" in blob
    ):
        raise ValueError(f"store {path!r} has a node with an invalid blob name {blob!r}")
    return blob


def _check_priority(priority: float) -> None:
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        raise TypeError(f"priority must be a number, got {priority!r}")
    if not math.isfinite(priority):
        raise ValueError(f"priority must be finite, got {priority!r}")


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
