"""Tests of the ready-made jobs in the top-level ``workers/`` folder, on small real data.

The job modules are plain files, loaded here by path as ``taskorch run workers/X.py:fn``
loads them (no package, nothing on ``sys.path``).  Most tests call them in-process; the last
ones run them in worker processes, where they arrive by value, and check that they import
only the standard library.

Each job is checked for: the right result, idempotence (a second run reports zero work),
clear errors on bad input, and completion after a partially done run (a leftover temp file,
a blob already deleted, an attempt interrupted mid-transaction).  Interruptions are injected
by wrapping one internal call, never by timing; nothing here sleeps.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _tasks import scaled

WORKERS = Path(__file__).resolve().parents[1] / "workers"
JOB_MODULES = ("dedupe", "demo_workload", "log_rotate", "pq_compact", "sqlite_purge")


def _load(name: str) -> ModuleType:
    """Execute ``workers/<name>.py`` by path under a private name (not in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"_test_workers_{name}", WORKERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dedupe, demo_workload, log_rotate, pq_compact, sqlite_purge = (_load(m) for m in JOB_MODULES)

NOW = 1_700_000_000.0


# --------------------------------------------------------------------------- sqlite_purge


def _make_sessions(
    path: Path, rows: int, is_expired: Callable[[int], bool] = lambda i: i % 3 == 0
) -> set[int]:
    """Rows 1..rows, expired where ``is_expired(id)``.  Returns the ids that must survive."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE Sessions (id INTEGER PRIMARY KEY, token TEXT, expires_at REAL);
        CREATE INDEX sessions_expires ON Sessions (expires_at);
        """
    )
    live = set()
    data = []
    for i in range(1, rows + 1):
        if is_expired(i):
            data.append((i, "x" * 200, NOW - i))
        else:
            data.append((i, "x" * 200, NOW + i))
            live.add(i)
    conn.executemany("INSERT INTO Sessions VALUES (?, ?, ?)", data)
    conn.commit()
    conn.close()
    return live


def _ids(path: Path, table: str = "Sessions") -> set[int]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute(f"SELECT id FROM {table}")}
    finally:
        conn.close()


def test_purge_expired_deletes_exactly_the_expired_rows_in_chunks(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    live = _make_sessions(db, 300)  # 100 expired

    result = sqlite_purge.purge_expired(str(db), "sessions", "EXPIRES_AT", now=NOW, chunk_size=30)

    assert result["deleted"] == 100
    assert result["chunks"] == 4  # 30 + 30 + 30 + 10
    assert result["table"] == "Sessions" and result["expires_column"] == "expires_at"
    assert result["vacuumed"] is True
    assert result["bytes_after"] < result["bytes_before"]
    assert _ids(db) == live
    json.dumps(result)


def test_purge_expired_rerun_does_nothing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    live = _make_sessions(db, 90)
    sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, chunk_size=10)

    again = sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, chunk_size=10)

    assert (again["deleted"], again["chunks"], again["vacuumed"]) == (0, 0, False)
    assert again["bytes_after"] == again["bytes_before"]
    assert _ids(db) == live


def test_purge_expired_chunk_size_dividing_the_count_exactly(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    live = _make_sessions(db, 90)  # 30 expired
    result = sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, chunk_size=10)
    assert (result["deleted"], result["chunks"]) == (30, 3)
    assert _ids(db) == live


def test_purge_expired_without_rowid_table_and_text_timestamps(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE cache (ns TEXT, k INTEGER, expires TEXT, PRIMARY KEY (ns, k)) WITHOUT ROWID"
    )
    rows: list[tuple[str, int, str | None]] = [
        (ns, k, f"2024-0{1 + k % 9}-15T00:00:00") for ns in ("a", "b") for k in range(20)
    ]
    rows.append(("a", 99, None))  # NULL never expires
    conn.executemany("INSERT INTO cache VALUES (?, ?, ?)", rows)
    conn.commit()
    conn.close()
    cutoff = "2024-05-01T00:00:00"
    expected = sum(1 for r in rows if r[2] is not None and r[2] < cutoff)

    # A numeric cut-off against text timestamps deletes nothing rather than the wrong rows.
    numeric = sqlite_purge.purge_expired(str(db), "cache", "expires", now=NOW, chunk_size=3)
    assert numeric["deleted"] == 0

    result = sqlite_purge.purge_expired(str(db), "cache", "expires", now=cutoff, chunk_size=3)

    assert result["deleted"] == expected
    conn = sqlite3.connect(db)
    left = conn.execute("SELECT expires FROM cache").fetchall()
    conn.close()
    assert len(left) == len(rows) - expected
    assert all(e is None or e >= cutoff for (e,) in left)


class _InterruptOnCommit(sqlite3.Connection):
    """Raises, like an in-process timeout would, at the COMMIT of the Nth chunk."""

    commits_before_interrupt = 2

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            if type(self).commits_before_interrupt == 0:
                raise TimeoutError("attempt timed out (injected)")
            type(self).commits_before_interrupt -= 1
        return super().execute(sql, *args)


def test_purge_expired_interrupted_mid_chunk_rolls_back_and_a_retry_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    live = _make_sessions(db, 300)  # 100 expired
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(*args, factory=_InterruptOnCommit, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)  # the module sqlite_purge uses
    with pytest.raises(TimeoutError):
        sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, chunk_size=30)
    monkeypatch.undo()
    assert len(_ids(db)) == 300 - 60  # two chunks committed, the third rolled back

    retry = sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, chunk_size=30)

    assert retry["deleted"] == 40
    assert _ids(db) == live


def test_purge_expired_vacuum_left_undone_is_finished_by_the_rerun(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _make_sessions(db, 300, lambda i: i <= 200)  # contiguous: whole pages become free
    first = sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW, vacuum=False)
    assert (first["deleted"], first["vacuumed"]) == (200, False)

    rerun = sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=NOW)

    assert (rerun["deleted"], rerun["vacuumed"]) == (0, True)
    assert rerun["bytes_after"] < rerun["bytes_before"]


@pytest.mark.parametrize(
    ("table", "column", "message"),
    [
        ("nope", "expires_at", "no table 'nope'.*'Sessions'"),
        ('Sessions"; DROP TABLE Sessions; --', "expires_at", "no table"),
        ("Sessions", "expires_at < 0 OR 1=1 --", "no column.*'expires_at'"),
        ("sqlite_master", "name", "no table 'sqlite_master'"),
        ("SQLITE_SEQUENCE", "seq", "internal table 'sqlite_sequence'"),
    ],
)
def test_purge_expired_rejects_unknown_identifiers(
    tmp_path: Path, table: str, column: str, message: str
) -> None:
    db = tmp_path / "app.db"
    _make_sessions(db, 30)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL)")
    conn.execute("INSERT INTO events (at) VALUES (1)")  # creates sqlite_sequence
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=message):
        sqlite_purge.purge_expired(str(db), table, column, now=NOW)
    assert len(_ids(db)) == 30  # nothing touched


def test_purge_expired_rejects_bad_arguments(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _make_sessions(db, 10)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        sqlite_purge.purge_expired(
            str(db), "Sessions", "expires_at", chunk_size="10"  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="finite"):
        sqlite_purge.purge_expired(str(db), "Sessions", "expires_at", now=float("nan"))
    with pytest.raises(TypeError, match="table must be"):
        sqlite_purge.purge_expired(str(db), "", "expires_at")

    missing = tmp_path / "missing.db"
    with pytest.raises(FileNotFoundError, match="never creates one"):
        sqlite_purge.purge_expired(str(missing), "Sessions", "expires_at")
    assert not missing.exists()

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 50)
    with pytest.raises(ValueError, match="is not a SQLite database"):
        sqlite_purge.purge_expired(str(garbage), "Sessions", "expires_at")


# --------------------------------------------------------------------------- log_rotate


def _log_text(lines: int, tag: str = "") -> bytes:
    return "".join(
        f"2024-05-01T12:00:{i % 60:02d}Z INFO {tag}request id={i} path=/api/{i * 7} status=200\n"
        for i in range(lines)
    ).encode()


def _gunzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


def test_compress_file_writes_archive_and_removes_original(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    content = _log_text(2000)
    log.write_bytes(content)
    os.utime(log, (NOW, NOW))

    result = log_rotate.compress_file(str(log))

    gz = tmp_path / "app.log.gz"
    assert result["status"] == "compressed"
    assert result["bytes_in"] == len(content)
    assert result["bytes_out"] == gz.stat().st_size < len(content)
    assert not log.exists()
    assert _gunzip(gz) == content
    assert gz.stat().st_mtime == NOW  # the log's age, for retention
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log.gz"]
    json.dumps(result)


def test_compress_file_rerun_is_already_done(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(_log_text(10))
    log_rotate.compress_file(str(log))
    again = log_rotate.compress_file(str(log))
    assert (again["status"], again["bytes_in"]) == ("already_done", 0)


def test_compress_file_overwrites_a_leftover_temp_of_a_crashed_attempt(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    content = _log_text(500)
    log.write_bytes(content)
    (tmp_path / "app.log.gz.tmp").write_bytes(b"\x1f\x8b half of an archive")

    result = log_rotate.compress_file(str(log))

    assert result["status"] == "compressed"
    assert _gunzip(tmp_path / "app.log.gz") == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log.gz"]


def test_compress_file_crash_after_replace_recovers_without_doubling(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    content = _log_text(500)
    log.write_bytes(content)
    with gzip.open(tmp_path / "app.log.gz", "wb") as f:  # the archive the crashed run wrote
        f.write(content)

    result = log_rotate.compress_file(str(log))

    assert result["status"] == "recovered"
    assert not log.exists()
    assert _gunzip(tmp_path / "app.log.gz") == content


def test_compress_file_refuses_to_clobber_a_different_archive(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(_log_text(50, tag="new "))
    with gzip.open(tmp_path / "app.log.gz", "wb") as f:
        f.write(_log_text(50, tag="old "))  # same length, different bytes

    with pytest.raises(FileExistsError, match="does not hold the log's current content"):
        log_rotate.compress_file(str(log))

    assert log.read_bytes() == _log_text(50, tag="new ")
    assert _gunzip(tmp_path / "app.log.gz") == _log_text(50, tag="old ")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_compress_file_is_busy_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    import fcntl

    log = tmp_path / "app.log"
    log.write_bytes(_log_text(10))
    with open(log, "rb") as holder:  # a second open file description: flock conflicts
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = log_rotate.compress_file(str(log))
    assert result["status"] == "busy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log"]


def test_compress_file_leaves_a_log_that_changes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(_log_text(100))
    real_copy = shutil.copyfileobj

    def copy_then_append(src: Any, dst: Any, length: int = 0) -> None:
        real_copy(src, dst, length)
        with open(log, "ab") as f:  # the application writes one more line
            f.write(b"late line\n")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_append)
    result = log_rotate.compress_file(str(log))

    assert result["status"] == "changed"
    assert log.read_bytes().endswith(b"late line\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log"]


def test_compress_file_interrupted_mid_write_leaves_no_temp_and_retry_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "app.log"
    content = _log_text(100)
    log.write_bytes(content)

    def interrupted(src: Any, dst: Any, length: int = 0) -> None:
        dst.write(src.read(100))
        raise TimeoutError("attempt timed out (injected)")

    monkeypatch.setattr(shutil, "copyfileobj", interrupted)
    with pytest.raises(TimeoutError):
        log_rotate.compress_file(str(log))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log"]

    assert log_rotate.compress_file(str(log))["status"] == "compressed"
    assert _gunzip(tmp_path / "app.log.gz") == content


def test_compress_file_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        log_rotate.compress_file(str(tmp_path / "missing.log"))
    with pytest.raises(ValueError, match="already a gzip archive"):
        log_rotate.compress_file(str(tmp_path / "x.log.gz"))
    with pytest.raises(ValueError, match="not a regular file"):
        log_rotate.compress_file(str(tmp_path))
    target = tmp_path / "real.log"
    target.write_bytes(b"data\n")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(ValueError, match="symlink"):
        log_rotate.compress_file(str(tmp_path / "link.log"))
    with pytest.raises(ValueError, match="compresslevel"):
        log_rotate.compress_file(str(target), compresslevel=10)
    assert target.read_bytes() == b"data\n"


def test_compress_logs_compresses_old_logs_prunes_archives_and_cleans_temps(tmp_path: Path) -> None:
    contents = {}
    for i, name in enumerate(["a.log", "b.log", "c.log"]):
        contents[name] = _log_text(100, tag=name)
        (tmp_path / name).write_bytes(contents[name])
        os.utime(tmp_path / name, (NOW + i, NOW + i))  # a oldest, c newest of the three
    (tmp_path / "fresh.log").write_bytes(b"still being written\n")  # mtime: now
    (tmp_path / "notes.txt").write_bytes(b"not a log\n")
    (tmp_path / "link.log").symlink_to(tmp_path / "notes.txt")
    for i, name in enumerate(["old1.log.gz", "old2.log.gz"]):  # archives of older logs
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"old\n")
        os.utime(tmp_path / name, (NOW - 100 + i, NOW - 100 + i))
    (tmp_path / "gone.log.gz.tmp").write_bytes(b"leftover of a crash")

    result = log_rotate.compress_logs(str(tmp_path), min_age_seconds=3600, keep=3)

    assert result["compressed"] == 3
    assert result["skipped_recent"] == 1
    assert result["removed_temps"] == 1
    assert result["deleted_archives"] == ["old1.log.gz", "old2.log.gz"]
    assert result["conflicts"] == []
    assert result["bytes_in"] == sum(len(c) for c in contents.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.log.gz", "b.log.gz", "c.log.gz", "fresh.log", "link.log", "notes.txt",
    ]
    for name, content in contents.items():
        assert _gunzip(tmp_path / f"{name}.gz") == content
    json.dumps(result)

    again = log_rotate.compress_logs(str(tmp_path), min_age_seconds=3600, keep=3)
    assert again["compressed"] == again["removed_temps"] == 0
    assert again["deleted_archives"] == []
    assert again["skipped_recent"] == 1


def test_compress_logs_reports_conflicts_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"current\n")
    with gzip.open(tmp_path / "a.log.gz", "wb") as f:
        f.write(b"something else\n")
    (tmp_path / "b.log").write_bytes(b"fine\n")

    result = log_rotate.compress_logs(str(tmp_path), keep=1)

    assert result["conflicts"] == ["a.log"]
    assert result["compressed"] == 1
    assert result["deleted_archives"] == []  # a.log.gz awaits a decision, not retention
    assert (tmp_path / "a.log").exists() and (tmp_path / "b.log.gz").exists()


def test_compress_logs_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        log_rotate.compress_logs(str(tmp_path / "nope"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        log_rotate.compress_logs(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="keep=None"):
        log_rotate.compress_logs(str(tmp_path), keep=0)
    with pytest.raises(ValueError, match="no separator"):
        log_rotate.compress_logs(str(tmp_path), "sub/*.log")
    with pytest.raises(ValueError, match="min_age_seconds"):
        log_rotate.compress_logs(str(tmp_path), min_age_seconds=-1)


# --------------------------------------------------------------------------- dedupe


def _write(root: Path, rel: str, content: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _tree(root: Path) -> None:
    _write(root, "b/photo.png", b"P" * 5000)
    _write(root, "a/photo-copy.png", b"P" * 5000)
    _write(root, "c/deep/photo.png", b"P" * 5000)
    _write(root, "doc.txt", b"D" * 300)
    _write(root, "z/doc-backup.txt", b"D" * 300)
    _write(root, "same-size-1.bin", b"1" * 5000)  # same size as the photos, other bytes
    _write(root, "unique.txt", b"only one")
    _write(root, "empty1", b"")
    _write(root, "empty2", b"")
    (root / "link-to-doc.txt").symlink_to(root / "doc.txt")


def test_find_duplicates_groups_by_content(tmp_path: Path) -> None:
    _tree(tmp_path)

    result = dedupe.find_duplicates(str(tmp_path))

    paths = [g["paths"] for g in result["groups"]]
    assert paths == [
        [os.path.join("a", "photo-copy.png"), os.path.join("b", "photo.png"),
         os.path.join("c", "deep", "photo.png")],
        ["doc.txt", os.path.join("z", "doc-backup.txt")],
    ]
    assert [g["size"] for g in result["groups"]] == [5000, 300]
    assert result["files_scanned"] == 9  # the symlink is not a file here
    assert result["files_hashed"] == 6  # unique sizes and empty files are never read
    assert (result["duplicate_files"], result["duplicate_bytes"]) == (3, 2 * 5000 + 300)
    json.dumps(result)


def test_remove_duplicates_dry_run_by_default_deletes_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    result = dedupe.remove_duplicates(str(tmp_path))

    assert result["dry_run"] is True
    assert len(result["duplicates"]) == 3
    assert (result["removed_files"], result["bytes_freed"]) == (0, 0)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_remove_duplicates_keeps_the_first_path_and_rerun_does_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)

    result = dedupe.remove_duplicates(str(tmp_path), dry_run=False)

    assert result["kept"] == [os.path.join("a", "photo-copy.png"), "doc.txt"]
    assert (result["removed_files"], result["bytes_freed"]) == (3, 10_300)
    assert (tmp_path / "a" / "photo-copy.png").exists()
    assert not (tmp_path / "b" / "photo.png").exists()
    assert not (tmp_path / "z" / "doc-backup.txt").exists()
    assert (tmp_path / "link-to-doc.txt").is_symlink() and (tmp_path / "empty2").exists()
    json.dumps(result)

    again = dedupe.remove_duplicates(str(tmp_path), dry_run=False)
    assert (again["groups"], again["removed_files"], again["duplicates"]) == (0, 0, [])


def test_remove_duplicates_after_a_partial_run_keeps_the_same_copy(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "c" / "deep" / "photo.png").unlink()  # the crashed run got this far

    result = dedupe.remove_duplicates(str(tmp_path), dry_run=False)

    assert result["kept"] == [os.path.join("a", "photo-copy.png"), "doc.txt"]
    assert result["removed_files"] == 2
    assert (tmp_path / "a" / "photo-copy.png").read_bytes() == b"P" * 5000


def test_remove_duplicates_skips_files_changed_after_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path)
    real_scan = dedupe._scan

    def scan_then_edit(root: str, min_size: int) -> Any:
        result = real_scan(root, min_size)
        _write(tmp_path, "z/doc-backup.txt", b"edited, now different")
        return result

    monkeypatch.setattr(dedupe, "_scan", scan_then_edit)
    result = dedupe.remove_duplicates(str(tmp_path), dry_run=False)

    assert result["skipped_changed"] == [os.path.join("z", "doc-backup.txt")]
    assert (tmp_path / "z" / "doc-backup.txt").read_bytes() == b"edited, now different"
    assert result["removed_files"] == 2


def test_hard_links_are_copies_hashed_once(tmp_path: Path) -> None:
    original = _write(tmp_path, "a.dat", b"H" * 1000)
    os.link(original, tmp_path / "b.dat")
    result = dedupe.find_duplicates(str(tmp_path))
    assert result["files_hashed"] == 1
    assert result["groups"][0]["paths"] == ["a.dat", "b.dat"]


def test_dedupe_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dedupe.find_duplicates(str(tmp_path / "nope"))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        dedupe.remove_duplicates(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="min_size"):
        dedupe.find_duplicates(str(tmp_path), min_size=-1)
    with pytest.raises(TypeError, match="dry_run"):
        dedupe.remove_duplicates(str(tmp_path), dry_run="no")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pq_compact


def _queue(tmp_path: Path, nodes: int) -> tuple[str, list[int]]:
    db = str(tmp_path / "queue.db")
    with pq_compact.ExternalPriorityQueue.create(db, tmp_path / "blobs") as queue:
        ids = queue.push_many((float(i % 7), f"element {i}".encode() * 10) for i in range(nodes))
    return db, ids


def _blobs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "blobs").iterdir()}


def test_external_priority_queue_pops_in_priority_order(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    with pq_compact.ExternalPriorityQueue.create(db, tmp_path / "blobs") as queue:
        a = queue.push(5, b"five")
        b = queue.push(1.5, b"one and a half")
        c = queue.push(5, b"five again")
        assert len(queue) == 3
        assert queue.pop_min() == (b, 1.5, b"one and a half")
        assert queue.mark_deleted(a) is True
        assert queue.mark_deleted(a) is False  # one-way: already dead
        assert queue.pop_min() == (c, 5.0, b"five again")
        assert queue.pop_min() is None
        assert (len(queue), queue.dead_count()) == (0, 3)
        assert len(_blobs(tmp_path)) == 3  # logical deletion leaves the blobs for the purge
    with pq_compact.ExternalPriorityQueue.create(db, tmp_path / "blobs") as reopened:
        assert reopened.dead_count() == 3  # create() on an existing store just opens it


def test_purge_deleted_removes_dead_blobs_and_rows_only(tmp_path: Path) -> None:
    db, ids = _queue(tmp_path, 25)
    with pq_compact.ExternalPriorityQueue(db) as queue:
        dead = ids[::3]
        for node_id in dead:
            queue.mark_deleted(node_id)
        assert queue.pop_min() is not None  # a pop is a logical deletion too
        live_blobs_before = len(_blobs(tmp_path))

    result = pq_compact.purge_deleted(db, chunk_size=4)

    assert result["rows_deleted"] == result["blobs_deleted"] == len(dead) + 1
    assert result["blobs_missing"] == 0
    assert result["chunks"] == 3  # 10 dead nodes in chunks of 4
    assert result["bytes_freed"] > 0
    assert len(_blobs(tmp_path)) == live_blobs_before - len(dead) - 1
    with pq_compact.ExternalPriorityQueue(db) as queue:
        assert (len(queue), queue.dead_count()) == (25 - len(dead) - 1, 0)
    json.dumps(result)

    again = pq_compact.purge_deleted(db, chunk_size=4)
    assert (again["rows_deleted"], again["blobs_deleted"], again["chunks"]) == (0, 0, 0)
    with pq_compact.ExternalPriorityQueue(db) as queue:
        assert queue.pop_min() is not None  # the live nodes' blobs are all still there


def test_purge_deleted_after_a_partial_run_with_blobs_already_gone(tmp_path: Path) -> None:
    db, ids = _queue(tmp_path, 10)
    with pq_compact.ExternalPriorityQueue(db) as queue:
        for node_id in ids[:6]:
            queue.mark_deleted(node_id)
    conn = sqlite3.connect(db)
    gone = [b for (b,) in conn.execute("SELECT blob FROM nodes WHERE id IN (?, ?)", ids[:2])]
    conn.close()
    for name in gone:  # the crashed attempt unlinked these, then died before the DELETE
        (tmp_path / "blobs" / name).unlink()

    result = pq_compact.purge_deleted(db)

    assert (result["rows_deleted"], result["blobs_deleted"], result["blobs_missing"]) == (6, 4, 2)
    assert len(_blobs(tmp_path)) == 4


def test_purge_deleted_refuses_a_blob_name_outside_the_blob_directory(tmp_path: Path) -> None:
    db, ids = _queue(tmp_path, 3)
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"keep me")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE nodes SET blob = '../precious.txt', deleted = 1 WHERE id = ?", (ids[0],))
    conn.commit()
    conn.close()

    with pytest.raises(ValueError, match="invalid blob name"):
        pq_compact.purge_deleted(db)
    assert victim.read_bytes() == b"keep me"


def test_purge_deleted_rejects_bad_input(tmp_path: Path) -> None:
    db, ids = _queue(tmp_path, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        pq_compact.purge_deleted(db, chunk_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pq_compact.purge_deleted(str(tmp_path / "nope.db"))
    assert not (tmp_path / "nope.db").exists()

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError, match="not an ExternalPriorityQueue store"):
        pq_compact.purge_deleted(str(other))
    with pytest.raises(ValueError, match="not an ExternalPriorityQueue store"):
        pq_compact.ExternalPriorityQueue.create(other, tmp_path / "blobs2")
    conn = sqlite3.connect(other)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["t"]
    conn.close()

    with pytest.raises(ValueError, match="already exists with blob directory"):
        pq_compact.ExternalPriorityQueue.create(db, tmp_path / "elsewhere")

    with pq_compact.ExternalPriorityQueue(db) as queue:
        queue.mark_deleted(ids[0])
    (tmp_path / "blobs").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="moved without its blobs"):
        pq_compact.purge_deleted(db)
    with pq_compact.ExternalPriorityQueue(db) as queue:
        assert queue.dead_count() == 1  # no row dropped while its blob is elsewhere


# --------------------------------------------------------------------------- demo_workload


def _resolve(target: str) -> Callable[..., dict[str, Any]]:
    from taskorch.cli.run import resolve_target  # the CLI's own resolution of a path target

    return resolve_target(target)


def test_demo_workload_builds_and_every_job_runs_serially(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    info = demo_workload.build(str(root), scale=0.05)
    json.dumps(info)
    calls = demo_workload.jobs(str(root))
    targets = [target for target, _, _ in calls]
    assert targets.count(f"{WORKERS / 'log_rotate.py'}:compress_file") == 6
    assert targets.count(f"{WORKERS / 'dedupe.py'}:remove_duplicates") == 4
    assert all(Path(target.rpartition(":")[0]).parent == WORKERS for target in targets)

    results = []
    for target, args, kwargs in calls:
        json.dumps([args, kwargs])  # the calls themselves are plain data
        result = _resolve(target)(*args, **kwargs)
        json.dumps(result)
        results.append((target, result))

    by_target: dict[str, list[dict[str, Any]]] = {}
    for target, result in results:
        by_target.setdefault(target.rpartition(":")[2], []).append(result)
    assert all(r["status"] == "compressed" for r in by_target["compress_file"])
    assert sum(r["bytes_in"] for r in by_target["compress_file"]) == info["logs"]["bytes"]
    assert by_target["purge_expired"][0]["deleted"] == info["sqlite"]["expired"] > 0
    removed = sum(r["removed_files"] for r in by_target["remove_duplicates"])
    assert removed == info["files"]["duplicates"]
    assert by_target["purge_deleted"][0]["rows_deleted"] == info["pq"]["deleted"] > 0

    # The same calls again: every job finds nothing left to do.
    for target, args, kwargs in calls:
        result = _resolve(target)(*args, **kwargs)
        if "status" in result:
            assert result["status"] == "already_done"
        else:
            counts = ("deleted", "removed_files", "rows_deleted")
            work = {k: result[k] for k in counts if k in result}
            assert set(work.values()) == {0}, (target, result)


def test_demo_workload_rejects_bad_input(tmp_path: Path) -> None:
    (tmp_path / "something").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        demo_workload.build(str(tmp_path), scale=0.05)
    with pytest.raises(ValueError, match="scale"):
        demo_workload.build(str(tmp_path / "new"), scale=0)
    with pytest.raises(FileNotFoundError, match="run build"):
        demo_workload.jobs(str(tmp_path / "never-built"))


# --------------------------------------------------------------------------- the folder itself


def _imports(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in ``tree``, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def test_job_modules_import_only_the_stdlib_and_nothing_relative() -> None:
    """Every import statement of every ``workers/*.py``, module level or inside a function,
    names a stdlib module: a file run by path has no package for a relative import, and a
    worker that receives it by value may have nothing else installed."""
    files = sorted(WORKERS.glob("*.py"))
    assert {f.stem for f in files} >= set(JOB_MODULES)
    assert not (WORKERS / "__init__.py").exists()  # plain modules, not a package
    bad = []
    for path in files:
        for line, module, level in _imports(ast.parse(path.read_text(), str(path))):
            if level or module.split(".")[0] not in sys.stdlib_module_names:
                bad.append(f"{path.name}:{line}: {'.' * level}{module}")
    assert not bad, "non-stdlib or relative imports in workers/:\n" + "\n".join(bad)


def test_job_modules_load_by_path_adding_only_stdlib_modules_and_no_thread(tmp_path: Path) -> None:
    """In a fresh interpreter that never imports taskorch, from a directory where nothing of
    ours is importable: loading every job module by path (and building the demo workload,
    which loads its sibling ``pq_compact`` by path) adds only stdlib modules, no thread."""
    code = f"""
import importlib.util, sys, threading
before = set(sys.modules)
loaded = {{}}
for name in {JOB_MODULES!r}:
    path = {str(WORKERS)!r} + "/" + name + ".py"
    spec = importlib.util.spec_from_file_location("_job_" + name, path)
    loaded[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded[name])
loaded["demo_workload"].build({str(tmp_path / "demo")!r}, scale=0.02)
added = set(sys.modules) - before
foreign = sorted(m for m in added if m.split(".")[0] not in sys.stdlib_module_names)
print(foreign, threading.active_count(), "taskorch" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
        check=True,
    ).stdout
    assert out.split() == ["[]", "1", "False"]


def test_every_job_runs_in_a_worker_by_path_and_arrives_by_value(
    tmp_path: Path, make_orchestrator: Callable[..., Any]
) -> None:
    """The path form end to end: targets resolved as ``taskorch run`` resolves them, run in
    worker processes that never import the job files (the private module names the parent
    gave them are absent there), including ``demo_workload.build``, whose sibling
    ``pq_compact`` is loaded by path inside the worker."""
    from _tasks import has_module

    from taskorch import Policy

    o = make_orchestrator(worker_count=2, policy=Policy(retries=0, timeout=120.0))
    build = _resolve(f"{WORKERS / 'demo_workload.py'}:build")
    info = o.run(build, str(tmp_path / "demo"), scale=0.05).result(timeout=scaled(120))
    assert info["pq"]["deleted"] > 0

    calls = _resolve(f"{WORKERS / 'demo_workload.py'}:jobs")(str(tmp_path / "demo"))
    functions = {target: _resolve(target) for target, _, _ in calls}
    futures = [(t, o.run(functions[t], *args, **kwargs)) for t, args, kwargs in calls]
    results: dict[str, list[dict[str, Any]]] = {}
    for target, future in futures:
        results.setdefault(target.rpartition(":")[2], []).append(future.result(timeout=scaled(120)))
    assert sum(r["bytes_in"] for r in results["compress_file"]) == info["logs"]["bytes"]
    assert results["purge_expired"][0]["deleted"] == info["sqlite"]["expired"]
    removed = sum(r["removed_files"] for r in results["remove_duplicates"])
    assert removed == info["files"]["duplicates"]
    assert results["purge_deleted"][0]["rows_deleted"] == info["pq"]["deleted"]

    private_names = {fn.__module__ for fn in functions.values()} | {build.__module__}
    assert len(private_names) == 5 and all(name in sys.modules for name in private_names)
    # Belt and braces: had any of them been pickled by reference, its task would have failed
    # above with ModuleNotFoundError in the worker.
    assert not any(o.run(has_module, name).result(timeout=scaled(60)) for name in private_names)


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskorch", "demo", "--no-progress", *args],
        capture_output=True, text=True, timeout=scaled(120),
    )


def test_demo_default_jobs_folder_is_the_checkouts_workers() -> None:
    from taskorch.cli.demo import default_jobs_dir

    assert default_jobs_dir() == WORKERS


def test_demo_runs_the_jobs_of_a_folder_given_with_jobs(tmp_path: Path) -> None:
    jobs = tmp_path / "my-jobs"
    shutil.copytree(WORKERS, jobs, ignore=shutil.ignore_patterns("__pycache__"))
    out = _demo("--jobs", str(jobs), "--scale", "0.02", "--no-serial",
                "--keep", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    assert "12 jobs succeeded, 0 failed" in out.stdout


def test_demo_without_a_jobs_folder_says_where_the_jobs_are(tmp_path: Path) -> None:
    out = _demo("--jobs", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert "holds no demo_workload.py" in out.stderr and "--jobs path/to/workers" in out.stderr
    assert "Traceback" not in out.stderr
