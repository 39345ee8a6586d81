"""``taskorch run --joblog FILE`` and ``--resume`` / ``--resume-failed`` (CLI, parent process).

The joblog holds the records ``taskorch run`` writes, each with two more keys: ``line``, the
input line number (from 1, counting empty lines, as error messages do), and ``input_hash``, a
hash of that line's bytes. ``--resume`` reads it first and skips every input line it has a
record of (GNU parallel's convention); ``--resume-failed`` reruns those whose last record
failed. A line whose hash differs from the one recorded means the joblog was made from another
input: the run stops there with a usage error instead of skipping the wrong work.

Threads: ``seen`` is called by the reader thread, ``write`` and ``flush`` by the writer thread;
the one dict they share (``_pending``: index -> line and hash) is only set and popped, atomic
operations under the GIL. The records of a run that dies are kept up to its last flush (after
every batch of records, as the output is flushed); a record torn by the death (its last line)
is ignored on resume, and its input runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any

from taskorch.cli.options import UsageError


def line_hash(raw: bytes) -> str:
    """The hash recorded for an input line (its bytes, without the line ending)."""
    return hashlib.blake2b(raw, digest_size=10).hexdigest()


class Joblog:
    """An open joblog: what a previous run recorded, and the file the records go to."""

    def __init__(self, path: str, file: IO[str], recorded: dict[int, tuple[str, bool]],
                 rerun_failed: bool) -> None:
        self.path = path
        self._file = file
        self._recorded = recorded  # line number -> (its hash, whether its last record was ok)
        self._rerun_failed = rerun_failed
        self._pending: dict[int, tuple[int, str]] = {}  # index -> (line number, line hash)

    @classmethod
    def open(cls, path: str, *, resume: bool, rerun_failed: bool) -> Joblog:
        """Open ``path`` for writing; with ``resume``, read what it recorded first and append
        (a missing file is an empty joblog). Without ``resume`` the file is replaced."""
        recorded: dict[int, tuple[str, bool]] = {}
        try:
            if resume:
                recorded = _read(path)
                file = open(path, "a+", encoding="utf-8")
                file.seek(0, os.SEEK_END)
                if file.tell() > 0:
                    file.seek(file.tell() - 1)
                    if file.read(1) != "\n":  # a record torn by the death of the last run
                        file.write("\n")
            else:
                file = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot open --joblog {path}: {exc}") from exc
        return cls(path, file, recorded, rerun_failed)

    def seen(self, index: int, line_number: int, raw: bytes) -> bool:
        """Whether to skip this input (resume); else note its line for its record. ValueError
        when the joblog recorded another line under this number."""
        digest = line_hash(raw)
        before = self._recorded.get(line_number)
        if before is not None:
            if before[0] != digest:
                raise ValueError(
                    f"--resume: input line {line_number} is not the line the joblog "
                    f"{self.path} recorded under that number: the joblog was made from another "
                    "input. Give the same input, or another --joblog (or none) to start afresh"
                )
            if before[1] or not self._rerun_failed:
                return True
        self._pending[index] = (line_number, digest)
        return False

    def write(self, record: dict[str, Any], dumped: str) -> None:
        """Write ``record`` (``dumped``: its JSON line as written to the output) with its line
        number and hash."""
        line_number, digest = self._pending.pop(record["index"])
        self._file.write(f'{dumped.rstrip()[:-1]}, "line": {line_number}, '
                         f'"input_hash": "{digest}"}}\n')

    def flush(self) -> None:
        self._file.flush()

    def __enter__(self) -> Joblog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _read(path: str) -> dict[int, tuple[str, bool]]:
    recorded: dict[int, tuple[str, bool]] = {}
    try:
        file = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return recorded
    torn = 0
    with file:
        for text in file:
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                line, digest, ok = rec["line"], rec["input_hash"], rec["ok"]
                if not isinstance(line, int) or not isinstance(digest, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                torn += 1  # a record torn by the death of a run: its input runs again
                continue
            recorded[line] = (digest, bool(ok))
    if torn and not recorded:
        raise UsageError(f"--resume: {path} is not a joblog of taskorch run (no record in it)")
    return recorded
