"""Job: find files with identical content under a directory, and delete all but one copy.

Runs in: a worker process, main thread.  A plain file in ``workers/``, run by path
(``taskorch run workers/dedupe.py:FUNCTION``): the parent loads it and its functions travel to
the worker by value, so the worker needs nothing installed.  Stdlib only, nothing at import.

Files are grouped by size first (one ``lstat`` each, already paid for by ``scandir``), and
only files that share a size are hashed, with BLAKE2b (256-bit) in chunks: on ordinary trees
most sizes are unique, so most files are never read.  A collision of the hash is not a
practical concern at that width; this module does no byte-by-byte confirmation.

The copy kept in each group is the lexicographically first relative path (plain ``str``
order), so the choice does not depend on directory listing order and a rerun after a crash
midway keeps the same file: the keeper is never deleted, and the remaining copies are found
and removed again.  Symlinks are neither followed nor deleted; hard links to one inode are
hashed once and count as copies.  Between the scan and a deletion, each file's size and
modification time are checked again and a changed file is skipped (``skipped_changed``); a
change that keeps both within the clock's resolution is an accepted race.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, NamedTuple

# Digest width in bytes: 256 bits makes accidental collisions negligible for any tree size.
_DIGEST_SIZE = 32


class _Scanned(NamedTuple):
    """One regular file as the scan saw it (used to detect a change before deleting)."""

    relpath: str
    size: int
    mtime_ns: int
    inode: tuple[int, int]


def find_duplicates(directory: str | os.PathLike[str], *, min_size: int = 1) -> dict[str, Any]:
    """Report groups of files under ``directory`` with identical content.

    Files smaller than ``min_size`` bytes are ignored: by default empty files, which are
    usually markers (``__init__.py``, ``.keep``) rather than wasted space.

    Returns ``{"directory", "files_scanned", "files_hashed", "groups", "duplicate_files",
    "duplicate_bytes", "unreadable"}``; each group is ``{"digest", "size", "paths"}`` with
    relative paths sorted, the first being the copy ``remove_duplicates`` keeps.
    ``duplicate_*`` count the copies beyond the first of each group.
    """
    root = _check_arguments(directory, min_size)
    groups, files_scanned, files_hashed, unreadable = _scan(root, min_size)
    duplicate_files = sum(len(members) - 1 for _, members in groups)
    duplicate_bytes = sum((len(members) - 1) * members[0].size for _, members in groups)
    return {
        "directory": root,
        "files_scanned": files_scanned,
        "files_hashed": files_hashed,
        "groups": [
            {"digest": digest, "size": members[0].size, "paths": [m.relpath for m in members]}
            for digest, members in groups
        ],
        "duplicate_files": duplicate_files,
        "duplicate_bytes": duplicate_bytes,
        "unreadable": unreadable,
    }


def remove_duplicates(
    directory: str | os.PathLike[str], *, dry_run: bool = True, min_size: int = 1
) -> dict[str, Any]:
    """Delete every copy but the lexicographically first of each group of identical files.

    ``dry_run`` (the default, because deletion cannot be undone) only reports the plan.
    Empty directories left behind are not removed.

    Returns ``{"directory", "dry_run", "groups", "kept", "duplicates", "removed_files",
    "bytes_freed", "skipped_changed", "unreadable"}``: ``duplicates`` lists the copies that
    are to go (dry run) or went; ``bytes_freed`` sums their sizes (hard links share storage,
    so it can overstate what the disk gets back).
    """
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run must be a bool, got {dry_run!r}")
    root = _check_arguments(directory, min_size)
    groups, _, _, unreadable = _scan(root, min_size)
    kept: list[str] = []
    duplicates: list[str] = []
    skipped_changed: list[str] = []
    removed_files = 0
    bytes_freed = 0
    for _, members in groups:
        keeper, *copies = members
        kept.append(keeper.relpath)
        if not _unchanged(root, keeper):
            # The reference copy moved or changed: deleting "its" duplicates could lose the
            # only copy of this content.
            skipped_changed.extend(m.relpath for m in members)
            continue
        for copy in copies:
            if not _unchanged(root, copy):
                skipped_changed.append(copy.relpath)
                continue
            duplicates.append(copy.relpath)
            if dry_run:
                continue
            try:
                os.unlink(os.path.join(root, copy.relpath))
            except FileNotFoundError:
                continue  # gone already (a concurrent run): the goal holds
            removed_files += 1
            bytes_freed += copy.size
    return {
        "directory": root,
        "dry_run": dry_run,
        "groups": len(groups),
        "kept": kept,
        "duplicates": duplicates,
        "removed_files": removed_files,
        "bytes_freed": bytes_freed,
        "skipped_changed": skipped_changed,
        "unreadable": unreadable,
    }


def _scan(root: str, min_size: int) -> tuple[list[tuple[str, list[_Scanned]]], int, int, list[str]]:
    """Return the duplicate groups (sorted by keeper path), files seen, files hashed, errors."""
    by_size: dict[int, list[_Scanned]] = {}
    unreadable: list[str] = []
    files_scanned = 0
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                entries = list(it)
        except OSError:
            unreadable.append(rel_dir or ".")
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                unreadable.append(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(rel)
            elif stat.S_ISREG(st.st_mode):
                files_scanned += 1
                if st.st_size >= min_size:
                    scanned = _Scanned(rel, st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino))
                    by_size.setdefault(st.st_size, []).append(scanned)

    files_hashed = 0
    digest_of_inode: dict[tuple[int, int], str] = {}
    by_digest: dict[str, list[_Scanned]] = {}
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        for scanned in same_size:
            digest = digest_of_inode.get(scanned.inode)
            if digest is None:
                try:
                    digest = _hash_file(os.path.join(root, scanned.relpath))
                except OSError:
                    unreadable.append(scanned.relpath)
                    continue
                files_hashed += 1
                digest_of_inode[scanned.inode] = digest
            # Same digest implies same size, but key on both to keep groups exact anyway.
            by_digest.setdefault(f"{scanned.size}:{digest}", []).append(scanned)

    groups = []
    for key, members in by_digest.items():
        if len(members) > 1:
            members.sort(key=lambda m: m.relpath)
            groups.append((key.partition(":")[2], members))
    groups.sort(key=lambda g: g[1][0].relpath)
    unreadable.sort()
    return groups, files_scanned, files_hashed, unreadable


def _hash_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=_DIGEST_SIZE)).hexdigest()


def _unchanged(root: str, scanned: _Scanned) -> bool:
    try:
        st = os.lstat(os.path.join(root, scanned.relpath))
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == scanned.size
        and st.st_mtime_ns == scanned.mtime_ns
        and (st.st_dev, st.st_ino) == scanned.inode
    )


def _check_arguments(directory: str | os.PathLike[str], min_size: int) -> str:
    root = os.fspath(directory)
    if isinstance(min_size, bool) or not isinstance(min_size, int):
        raise TypeError(f"min_size must be an int, got {min_size!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if not os.path.exists(root):
        raise FileNotFoundError(f"directory {root!r} does not exist")
    if not os.path.isdir(root) or os.path.islink(root):
        raise NotADirectoryError(f"{root!r} is not a directory (symlinks are not followed)")
    return root
