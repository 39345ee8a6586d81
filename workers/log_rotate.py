"""Job: gzip log files in place (``x.log`` -> ``x.log.gz``) and keep the N newest archives.

Runs in: a worker process, main thread.  A plain file in ``workers/``, run by path
(``taskorch run workers/log_rotate.py:FUNCTION``): the parent loads it and its functions travel to
the worker by value, so the worker needs nothing installed.  Stdlib only, nothing at import.

The crash protocol for one file, and why each step is where it is:

1. Open ``x.log`` and take an exclusive ``flock`` on it (non-blocking).  The lock makes two
   workers compressing the same file (a retry racing a slow first attempt, or two jobs
   whose patterns overlap) take turns instead of writing the same temp file; the kernel
   drops it when a worker dies, so a crash never leaves it stuck.  The loser reports
   ``"busy"``: the holder is doing the work.
2. Write ``x.log.gz.tmp`` (truncating a leftover of a crashed attempt), fsync it.
3. ``os.replace`` it onto ``x.log.gz``, fsync the directory: the archive appears whole or
   not at all.
4. Unlink ``x.log``, fsync the directory.

A crash before 3 leaves ``x.log`` intact (and maybe a temp file, overwritten by the rerun).
A crash between 3 and 4 leaves both files: the rerun decompresses the archive, and only if
it holds exactly the bytes of ``x.log`` does it unlink ``x.log`` (``"recovered"``); if they
differ, both are left alone and ``FileExistsError`` says so.  So no data is lost and none is
archived twice.  If ``x.log`` changes while it is being compressed (it is still being
written: raise ``min_age_seconds``), the temp file is dropped and the original kept
(``"changed"``).  Without ``fcntl`` (Windows) there is no lock, and two concurrent jobs on
one file are unsafe: run one job per file there.
"""

from __future__ import annotations

import fnmatch
import gzip
import math
import os
import shutil
import stat
import sys
import time
import zlib
from typing import IO, Any, Literal

if sys.platform != "win32":
    import fcntl

Status = Literal["compressed", "recovered", "already_done", "busy", "changed"]

GZ_SUFFIX = ".gz"
TMP_SUFFIX = ".gz.tmp"

# Read/compress block size: large enough that per-call overhead is negligible next to
# deflate, small enough that a worker's memory stays flat whatever the log size.
_CHUNK = 1 << 20

# How often compress_file re-opens a path that was replaced under it before giving up.
_MAX_REOPEN = 3


def compress_file(path: str | os.PathLike[str], *, compresslevel: int = 6) -> dict[str, Any]:
    """Gzip ``path`` to ``path + ".gz"`` atomically and remove ``path``; safe to rerun.

    Returns ``{"path", "gz_path", "status", "bytes_in", "bytes_out"}`` where ``status`` is
    ``"compressed"``, ``"recovered"`` (an earlier run crashed after writing the archive; the
    original was verified against it and removed), ``"already_done"`` (only the archive
    exists), ``"busy"`` (another process holds the file's lock and is compressing it) or
    ``"changed"`` (the file grew or was modified meanwhile; nothing was done).

    The archive keeps the original's modification time, so retention orders archives by the
    age of their logs rather than by when they happened to be compressed.
    """
    src = os.fspath(path)
    _check_compresslevel(compresslevel)
    if src.endswith(GZ_SUFFIX) or src.endswith(TMP_SUFFIX):
        raise ValueError(f"{src!r} is already a gzip archive or a temp file; pass the log itself")
    for _ in range(_MAX_REOPEN):
        result = _compress_once(src, compresslevel)
        if result is not None:
            return result
    raise RuntimeError(
        f"{src!r} was replaced by a new file {_MAX_REOPEN} times while being compressed; "
        "is something rotating it concurrently?"
    )


def compress_logs(
    directory: str | os.PathLike[str],
    pattern: str = "*.log",
    *,
    min_age_seconds: float = 0,
    keep: int | None = None,
    compresslevel: int = 6,
) -> dict[str, Any]:
    """Compress the files of ``directory`` (not recursive) matching ``pattern``; prune archives.

    Only regular files (no symlinks) last modified at least ``min_age_seconds`` ago are
    compressed, so a log still being written can be left alone.  With ``keep``, only the
    ``keep`` newest archives matching ``pattern + ".gz"`` are kept (newest by modification
    time, which is the log's own); an archive whose original is still present is never
    pruned.  Temp files left by a crashed run whose log no longer exists are removed.

    Returns counts (``compressed``, ``recovered``, ``busy``, ``changed``, ``skipped_recent``,
    ``removed_temps``), byte totals of the files compressed now, and the names in
    ``conflicts`` (archive and log both present with different content: left alone) and
    ``deleted_archives``.
    """
    root = os.fspath(directory)
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"pattern must be a non-empty str, got {pattern!r}")
    if "/" in pattern or os.sep in pattern:
        raise ValueError(f"pattern {pattern!r} must match file names, not paths (no separator)")
    if isinstance(min_age_seconds, bool) or not isinstance(min_age_seconds, (int, float)):
        raise TypeError(f"min_age_seconds must be a number, got {min_age_seconds!r}")
    if not math.isfinite(min_age_seconds) or min_age_seconds < 0:
        raise ValueError(f"min_age_seconds must be finite and >= 0, got {min_age_seconds!r}")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int or None, got {keep!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (use keep=None to keep every archive), got {keep}")
    _check_compresslevel(compresslevel)
    _check_directory(root)

    now = time.time()
    counts = {"compressed": 0, "recovered": 0, "busy": 0, "changed": 0}
    skipped_recent = 0
    removed_temps = 0
    bytes_in = 0
    bytes_out = 0
    conflicts: list[str] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        if name.endswith(TMP_SUFFIX):
            original = name[: -len(TMP_SUFFIX)]
            # Without its log, a temp file has no compressor left that could still want it.
            if fnmatch.fnmatchcase(original, pattern) and not os.path.lexists(
                os.path.join(root, original)
            ):
                _unlink_missing_ok(entry.path)
                removed_temps += 1
            continue
        if name.endswith(GZ_SUFFIX) or not fnmatch.fnmatchcase(name, pattern):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_seconds:
                skipped_recent += 1
                continue
            result = compress_file(entry.path, compresslevel=compresslevel)
        except FileNotFoundError:
            continue  # removed by someone else since the listing: nothing left to do
        except FileExistsError:
            conflicts.append(name)
            continue
        status: str = result["status"]
        if status in counts:
            counts[status] += 1
        if status == "compressed":
            bytes_in += result["bytes_in"]
            bytes_out += result["bytes_out"]

    deleted_archives = _prune_archives(root, pattern, keep) if keep is not None else []
    return {
        "directory": root,
        "pattern": pattern,
        **counts,
        "skipped_recent": skipped_recent,
        "removed_temps": removed_temps,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "conflicts": conflicts,
        "deleted_archives": deleted_archives,
    }


def _compress_once(src: str, compresslevel: int) -> dict[str, Any] | None:
    """Run the protocol of the module docstring once; None if ``src`` was replaced meanwhile."""
    gz_path = src + GZ_SUFFIX
    tmp_path = src + TMP_SUFFIX
    try:
        src_file = open(src, "rb", opener=_open_nofollow)
    except FileNotFoundError:
        if os.path.isfile(gz_path):
            return _result(src, "already_done", 0, os.path.getsize(gz_path))
        raise FileNotFoundError(f"log file {src!r} does not exist, and neither does {gz_path!r}")
    except OSError as exc:
        if os.path.islink(src):
            raise ValueError(f"{src!r} is a symlink; compress the file it points to") from exc
        if isinstance(exc, IsADirectoryError):
            raise ValueError(f"{src!r} is not a regular file (a directory)") from exc
        raise
    with src_file:  # closing it releases the lock, after the unlink
        before = os.fstat(src_file.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise ValueError(f"{src!r} is not a regular file")
        if not _try_lock(src_file):
            return _result(src, "busy", 0, 0)
        try:
            now_at_path = os.lstat(src)
        except FileNotFoundError:
            return None  # the previous holder finished and unlinked it: re-evaluate
        if (now_at_path.st_dev, now_at_path.st_ino) != (before.st_dev, before.st_ino):
            return None  # a new file took the name after we opened the old one

        directory = os.path.dirname(os.path.abspath(src))
        if os.path.exists(gz_path):
            if not _archive_matches(gz_path, src_file, before.st_size):
                raise FileExistsError(
                    f"both {src!r} and {gz_path!r} exist and the archive does not hold the "
                    "log's current content; left both untouched: move one away and rerun"
                )
            os.unlink(src)
            _fsync_directory(directory)
            return _result(src, "recovered", before.st_size, os.path.getsize(gz_path))

        try:
            with open(tmp_path, "wb") as raw:
                with gzip.GzipFile(
                    filename=os.path.basename(src),
                    mode="wb",
                    compresslevel=compresslevel,
                    fileobj=raw,
                    mtime=int(before.st_mtime),
                ) as gz:
                    shutil.copyfileobj(src_file, gz, _CHUNK)
                raw.flush()
                os.fsync(raw.fileno())
            after = os.fstat(src_file.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                _unlink_missing_ok(tmp_path)
                return _result(src, "changed", 0, 0)
            os.utime(tmp_path, ns=(before.st_atime_ns, before.st_mtime_ns))
            os.replace(tmp_path, gz_path)
        except BaseException:
            # Includes an in-process timeout: never leave a half-written temp behind.
            _unlink_missing_ok(tmp_path)
            raise
        _fsync_directory(directory)  # the archive is durable before the original goes
        os.unlink(src)
        _fsync_directory(directory)
        return _result(src, "compressed", before.st_size, os.path.getsize(gz_path))


def _archive_matches(gz_path: str, src_file: IO[bytes], size: int) -> bool:
    """True if ``gz_path`` decompresses to exactly the bytes of ``src_file``."""
    try:
        with open(gz_path, "rb") as raw:
            # The gzip trailer stores the length mod 2**32: a cheap first rejection.
            raw.seek(-4, os.SEEK_END)
            if int.from_bytes(raw.read(4), "little") != size % (1 << 32):
                return False
            raw.seek(0)
            src_file.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as archived:
                while True:
                    expected = src_file.read(_CHUNK)
                    actual = archived.read(len(expected)) if expected else archived.read(1)
                    if actual != expected:
                        return False
                    if not expected:
                        return True
    except (OSError, EOFError, zlib.error):
        return False  # truncated, corrupt or not gzip at all: not ours to trust


def _prune_archives(root: str, pattern: str, keep: int) -> list[str]:
    archive_pattern = pattern + GZ_SUFFIX
    archives: list[tuple[float, str]] = []
    with os.scandir(root) as it:
        for entry in it:
            if not fnmatch.fnmatchcase(entry.name, archive_pattern):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            if os.path.lexists(entry.path[: -len(GZ_SUFFIX)]):
                continue  # pending recovery or a conflict: its log decides, not retention
            archives.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
    archives.sort(reverse=True)  # newest first; equal times by name, deterministically
    deleted: list[str] = []
    for _, name in archives[keep:]:
        _unlink_missing_ok(os.path.join(root, name))
        deleted.append(name)
    return sorted(deleted)


def _result(src: str, status: Status, bytes_in: int, bytes_out: int) -> dict[str, Any]:
    return {
        "path": src,
        "gz_path": src + GZ_SUFFIX,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }


if sys.platform != "win32":

    def _try_lock(file: IO[bytes]) -> bool:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _fsync_directory(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

else:

    def _try_lock(file: IO[bytes]) -> bool:
        return True  # no flock: see the module docstring

    def _fsync_directory(path: str) -> None:
        pass  # directories cannot be opened for fsync on Windows


def _open_nofollow(path: str, flags: int) -> int:
    # O_NOFOLLOW: a symlinked log would be archived under the link's name and only the link
    # removed.  O_NONBLOCK: opening a FIFO that matched the pattern must not hang the worker
    # (the fstat check then rejects it); it changes nothing for regular files.
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.open(path, flags | extra)


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_compresslevel(compresslevel: int) -> None:
    if isinstance(compresslevel, bool) or not isinstance(compresslevel, int):
        raise TypeError(f"compresslevel must be an int, got {compresslevel!r}")
    if not 0 <= compresslevel <= 9:
        raise ValueError(f"compresslevel must be between 0 and 9, got {compresslevel}")


def _check_directory(root: str) -> None:
    if not os.path.exists(root):
        raise FileNotFoundError(f"directory {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root!r} is not a directory")
