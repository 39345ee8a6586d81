"""``taskorch run --joblog FILE`` and ``--resume`` / ``--resume-failed`` (CLI, parent process).

The joblog is GNU parallel's ``--joblog`` format: a tab-separated file whose first line is the
header ``Seq Host Starttime JobRuntime Send Receive Exitval Signal Command``, then one line per
input, so that tools reading parallel's joblogs read ours. The columns, ours after parallel's:

- ``Seq``: the input line number (from 1, counting empty lines, as error messages do);
- ``Host``: this machine's host name; ``Starttime``: epoch seconds (3 decimals) of the first
  attempt's start, as the parent heard of it (``-`` if it never started); ``JobRuntime``: the
  worker-side seconds of all its attempts; ``Send`` / ``Receive``: bytes of the input line and
  of the output record;
- ``Exitval``: 0 succeeded, 1 failed (the task raised, timed out or lost its worker), -1 never
  ran (cancelled by a signal, dropped); ``Signal``: the signal number that killed its worker,
  else 0;
- ``Command``: the input line (tabs and line breaks shown as spaces);
- ours: ``PID`` (the worker's process, empty where unknown: a Dask worker), ``InputHash`` (a
  hash of the line's bytes), ``Error`` (``Type: message``) and ``Traceback`` (the worker-side
  traceback), both with backslash, tab and line breaks escaped (``\\\\ \\t \\n \\r``), empty on
  success. Results are not kept: they are in the output.

``--resume`` reads it first and skips every input line it has a record of (parallel's
convention); ``--resume-failed`` reruns those whose last record failed (Exitval or Signal not
0). A line whose hash differs from the one recorded means the joblog was made from another
input: the run stops there with a usage error instead of skipping the wrong work. The JSON-lines
joblogs of taskorch 0.x before this format (one JSON record per line, with ``line`` and
``input_hash``) are read as well; resuming one appends the header, then records in this format.

Threads: ``seen`` is called by the reader thread, ``write`` and ``flush`` by the writer thread;
the one dict they share (``_pending``: index -> line, hash and command) is only set and popped,
atomic operations under the GIL. The records of a run that dies are kept up to its last flush
(after every batch of records, as the output is flushed); a record torn by the death (its last
line, too short or with a cut hash) is ignored on resume, and its input runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import IO

from taskorch.cli.options import UsageError

HEADER = ("Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
          "Command", "PID", "InputHash", "Error", "Traceback")
_HASH_LENGTH = 20  # hex digits of line_hash()


def line_hash(raw: bytes) -> str:
    """The hash recorded for an input line (its bytes, without the line ending)."""
    return hashlib.blake2b(raw, digest_size=_HASH_LENGTH // 2).hexdigest()


@dataclass(frozen=True)
class Entry:
    """What the joblog records of one input besides its line: how its task ran."""

    exitval: int  # 0 ok, 1 failed, -1 never ran
    started: float | None = None  # time.time() of its first attempt's start
    seconds: float = 0.0  # worker-side run time, all attempts
    pid: int | None = None  # the worker process
    signal: int = 0  # the signal that killed its worker
    received: int = 0  # bytes of its output record
    error: str = ""  # "Type: message"
    traceback: str = ""


def escape(text: str) -> str:
    """A text as one TSV field: backslash, tab and line breaks escaped."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


class Joblog:
    """An open joblog: what a previous run recorded, and the file the records go to."""

    def __init__(self, path: str, file: IO[str], recorded: dict[int, tuple[str, bool]],
                 rerun_failed: bool) -> None:
        self.path = path
        self._file = file
        self._recorded = recorded  # line number -> (its hash, whether its last record was ok)
        self._rerun_failed = rerun_failed
        # index -> (line number, line hash, bytes of the line, the line as Command)
        self._pending: dict[int, tuple[int, str, int, str]] = {}
        self._host = socket.gethostname()

    @classmethod
    def open(cls, path: str, *, resume: bool, rerun_failed: bool) -> Joblog:
        """Open ``path`` for writing; with ``resume``, read what it recorded first and append
        (a missing file is an empty joblog). Without ``resume`` the file is replaced."""
        recorded: dict[int, tuple[str, bool]] = {}
        try:
            if resume:
                recorded, has_header = _read(path)
                file = open(path, "a+", encoding="utf-8")
                file.seek(0, os.SEEK_END)
                if file.tell() > 0:
                    file.seek(file.tell() - 1)
                    if file.read(1) != "\n":  # a record torn by the death of the last run
                        file.write("\n")
                if not has_header:  # a new file, or a JSON-lines joblog of an older taskorch
                    file.write("\t".join(HEADER) + "\n")
            else:
                file = open(path, "w", encoding="utf-8")
                file.write("\t".join(HEADER) + "\n")
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
        command = raw.decode("utf-8", "replace")
        command = command.replace("\t", " ").replace("\r", " ").replace("\n", " ")
        self._pending[index] = (line_number, digest, len(raw), command)
        return False

    def write(self, index: int, entry: Entry) -> None:
        """Write the record of input ``index``."""
        line_number, digest, sent, command = self._pending.pop(index)
        started = "-" if entry.started is None else f"{entry.started:.3f}"
        fields = (str(line_number), self._host, started, f"{entry.seconds:.3f}", str(sent),
                  str(entry.received), str(entry.exitval), str(entry.signal), command,
                  "" if entry.pid is None else str(entry.pid), digest, escape(entry.error),
                  escape(entry.traceback))
        self._file.write("\t".join(fields) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def __enter__(self) -> Joblog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _read(path: str) -> tuple[dict[int, tuple[str, bool]], bool]:
    """line number -> (hash, ok) of each record in ``path``, and whether it has our header."""
    recorded: dict[int, tuple[str, bool]] = {}
    try:
        file = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return recorded, False
    torn = 0
    has_header = False
    with file:
        for text in file:
            if not text.strip():
                continue
            if text.rstrip("\r\n").split("\t") == list(HEADER):
                has_header = True
                continue
            rec = _parse_tsv(text) if not text.startswith("{") else _parse_json(text)
            if rec is None:
                torn += 1  # a record torn by the death of a run: its input runs again
                continue
            recorded[rec[0]] = rec[1:]
    if torn and not recorded:
        raise UsageError(f"--resume: {path} is not a joblog of taskorch run (no record in it)")
    return recorded, has_header


def _parse_tsv(text: str) -> tuple[int, str, bool] | None:
    fields = text.rstrip("\r\n").split("\t")
    if len(fields) < len(HEADER):
        return None
    seq, exitval, sig, digest = fields[0], fields[6], fields[7], fields[10]
    try:
        ok = int(exitval) == 0 and int(sig) == 0
        return (int(seq), digest, ok) if len(digest) == _HASH_LENGTH else None
    except ValueError:
        return None


def _parse_json(text: str) -> tuple[int, str, bool] | None:
    """A record of the JSON-lines joblog written before the TSV format."""
    try:
        rec = json.loads(text)
        line, digest, ok = rec["line"], rec["input_hash"], rec["ok"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(line, int) or not isinstance(digest, str):
        return None
    return line, digest, bool(ok)
