"""``taskorch run TARGET``: a function over JSON-lines inputs (parent process).

Threads, each with one job:

- main: parses arguments, starts the others, then waits on ``_Run.finished``; it also runs
  the signal handlers, which only set flags and never touch the orchestrator's locks.
- "taskorch-cli-reader": reads input lines (``lines``: bytes, split and decoded the same way
  for stdin and ``--input``), parses them, submits them (one task per input,
  or one per ``--chunksize`` inputs: the bulk path). Submitting waits for room in the backlog
  (back-pressure: memory stays flat however long the input), or, with ``--drop``, drops. It
  is a daemon: after a signal the main thread stops waiting for it, since it may be blocked
  reading a stdin that never closes; ``_Run.lock`` (with ``busy`` and ``chunk``) makes sure
  every input it read is submitted or recorded as cancelled, never lost.
- "taskorch-cli-drain", started by a first signal: sends the inputs read but not yet sent,
  waits until every record is written, then lets the main thread finish.
- "taskorch-cli-writer": writes one JSON record per input as tasks finish, updates the
  progress bar and, on a terminal, the lines of the tasks running long (``live``). Fed by the
  futures' done callbacks (in the dispatcher thread) through a ``queue.SimpleQueue``, so the
  dispatcher never waits on output.

Every input line that was read gets exactly one record: a result, an error, ``Dropped``
(``--drop`` and a full backlog), or ``Cancelled`` (never started because of a signal). A line
that is not UTF-8 gets an error record (``UnicodeDecodeError``, with its line number) and
reading goes on; a line that is not valid JSON stops the run (a usage error, exit 2), after
the records of the lines before it.

Exit status: 0 every input succeeded, 1 some failed, 2 usage error, 3 the records could not be
written (``EXIT_OUTPUT``: a closed pipe, a full disk; the run is abandoned, since nobody can
read its outcome), 130 / 143 after SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from types import FrameType
from typing import IO, Any, BinaryIO, Callable, Iterator

from taskorch._parent.task import TaskFuture, TaskListener, WorkItem
from taskorch._wire import encode_call
from taskorch._worker.map import run_chunk
from taskorch.cli.joblog import Entry, Joblog
from taskorch.cli.lines import LineError, decode_line, numbered_lines
from taskorch.cli.live import Display
from taskorch.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    UsageError,
    add_pool_arguments,
    orchestrator_from_args,
    positive_int,
    prepend_import_paths,
)
from taskorch.cli.records import dump_record, parse_input, records_of
from taskorch.cli.target import resolve_target as resolve_target  # (demo, tests import it here)

#: A second SIGTERM this soon after the first is its echo (timeout(1) signals the process,
#: then its process group): ignored, as by ``taskorch serve`` (``_service.serving``).
SIGNAL_ECHO_WINDOW = 1.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run a function over JSON-lines inputs",
        description="Call TARGET once per input line, in worker processes. Each line is a JSON "
                    'array (positional arguments), an object (keyword arguments), or {"args": '
                    '[...], "kwargs": {...}}. One JSON record per input is written as it '
                    "finishes. Lines end with \\n, \\r\\n or \\r; a line that is not UTF-8 "
                    "gets an error record. Exit status: 0 all succeeded, 1 some failed, 2 usage "
                    "error, 3 the output could not be written (closed pipe, full disk), 130/143 "
                    "after SIGINT/SIGTERM (a first signal stops reading and drains, a second "
                    "abandons running tasks).",
    )
    p.add_argument("target", metavar="TARGET",
                   help="package.module:function, or path/to/file.py:function")
    p.add_argument("--input", "-i", metavar="FILE", help="JSON-lines input (default: stdin)")
    p.add_argument("--output", "-o", metavar="FILE", help="JSON-lines records (default: stdout)")
    p.add_argument("--chunksize", type=positive_int, default=1, metavar="N",
                   help="send N inputs per task, the bulk path (much faster for tiny tasks); "
                        "retries and timeouts then apply to the whole chunk, and records carry "
                        "the chunk's attempts and no seconds (default: 1)")
    p.add_argument("--joblog", metavar="FILE",
                   help="also log every input to FILE in GNU parallel's --joblog format (TSV: "
                        "Seq, Host, Starttime, JobRuntime, Exitval, Signal, the input, the "
                        "worker's PID, a hash of the line, the error and its traceback), for "
                        "--resume (appended to with --resume, else replaced)")
    p.add_argument("--resume", action="store_true",
                   help="skip the inputs that --joblog FILE has a record of (by line number; "
                        "a line that differs from the one recorded is refused: another input)")
    p.add_argument("--resume-failed", action="store_true",
                   help="like --resume, but run again the inputs whose record says they failed")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar on stderr (default: when stderr is a "
                               "terminal; there, tasks running over a second get a line each, "
                               "with their latest taskorch.progress())")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    add_pool_arguments(p)
    p.set_defaults(handler=main)




# -- the run -----------------------------------------------------------------------------------


_Done = tuple[list[int], "Future[Any] | None", "tuple[str, str] | None", bool]


class _Stamps(TaskListener):
    """For the joblog: when each task's first attempt started (wall clock) and the pid of the
    worker running its last. Set as each task's own listener; hears ``started`` on the
    dispatcher thread, with the backlog lock held: it only sets a dict entry (atomic under the
    GIL), which the writer thread pops once the task's future is done."""

    __slots__ = ("by_future",)

    def __init__(self) -> None:
        self.by_future: dict[TaskFuture, tuple[float, int | None]] = {}

    def started(self, item: WorkItem, now: float) -> None:
        first = self.by_future.get(item.future)
        # A local worker is the item's holder (its pid); a Dask worker's pid is not known here.
        pid = getattr(item.started_on, "pid", None)
        self.by_future[item.future] = (first[0] if first else time.time(),
                                       pid if isinstance(pid, int) else None)

    def pop(self, future: Future[Any] | None) -> tuple[float | None, int | None, float]:
        """(start time, worker pid, worker-side seconds) of ``future``'s task, once done."""
        if not isinstance(future, TaskFuture):
            return None, None, 0.0
        started, pid = self.by_future.pop(future, (None, None))
        return started, pid, future.seconds or 0.0


class _Run:
    def __init__(self, args: argparse.Namespace, fn: Callable[..., Any], out: IO[str],
                 joblog: Joblog | None = None) -> None:
        self.args = args
        self.fn = fn
        self.out = out
        self.joblog = joblog  # written by the writer thread; read (resume) by the reader
        self.stamps = _Stamps() if joblog is not None else None  # (joblog only)
        self.orchestrator = orchestrator_from_args(args)
        self.display = Display(args, out)  # (the writer thread's, but `track`)
        # Guards the fields below up to `stopping` (reader, writer, main and drain threads).
        self.lock = threading.Condition()
        self.read = 0  # inputs read (and so owed a record)
        self.numbered = 0  # non-empty input lines seen: the next record's "index"
        self.skipped = 0  # inputs skipped by --resume (reader thread only)
        self.outstanding = 0  # records owed and not yet written
        self.reader_done = False
        # Inputs read and parsed, not yet sent (fewer than --chunksize of them).
        self.chunk: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = []
        # A thread is between reading an input and putting it in `chunk`, or is sending a
        # chunk: its inputs are in no list the others can see.
        self.busy = False
        self.stopping = False  # a signal (or an input error): stop reading
        self.usage_error: str | None = None
        self.output_error: str | None = None
        self.signals: list[int] = []
        self.first_signal_at = 0.0  # time.monotonic() of the first signal (main thread)
        self.counts = {"ok": 0, "failed": 0}
        self.finished = threading.Event()  # all records written and no more input coming
        # (input indices, the task's future or None, (error type, message) or None, whether
        # the task is a chunk); None ends the writer.
        self.done_queue: queue.SimpleQueue[_Done | None] = queue.SimpleQueue()

    # main thread ----------------------------------------------------------------------

    def execute(self, lines: Iterator[tuple[int, bytes]]) -> int:
        started = time.monotonic()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        reader = threading.Thread(
            target=self._read, args=(lines,), name="taskorch-cli-reader", daemon=True
        )
        writer = threading.Thread(target=self._write, name="taskorch-cli-writer")
        writer.start()
        reader.start()
        try:
            while not self.finished.wait():  # signal handlers run here
                pass
        finally:
            report = self.orchestrator.stop()
            with self.lock:  # inputs in hand are submitted or recorded before we end
                self.stopping = True
                self.lock.wait_for(lambda: self.output_error is not None
                                   or not self.busy and self.outstanding == 0, timeout=5.0)
            self.done_queue.put(None)
            writer.join()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.output_error:
            with contextlib.suppress(OSError, ValueError):
                print(f"taskorch run: error: {self.output_error}", file=sys.stderr)
            with contextlib.suppress(OSError, ValueError):  # no second error at exit's flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            return EXIT_OUTPUT
        self._summary(time.monotonic() - started, report.drained)
        if self.signals:
            return EXIT_SIGINT if self.signals[0] == signal.SIGINT else EXIT_SIGTERM
        if self.usage_error:
            print(f"taskorch run: error: {self.usage_error}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_FAILED if self.counts["failed"] else EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if (self.signals and signum == self.signals[0] == signal.SIGTERM
                and now - self.first_signal_at < SIGNAL_ECHO_WINDOW):
            return  # an echo of the first: timeout(1) signals us, then our process group
        if not self.signals:
            self.first_signal_at = now
        self.signals.append(signum)
        if len(self.signals) == 1:
            # Stop first, then say so: a second signal may come (and run its handler inside
            # this one) as soon as the line is out, and the inputs it refuses are "Cancelled"
            # only once ``stopping`` is set.
            self._stop_reading()
            print(f"taskorch run: {signal.Signals(signum).name}: no more input is read; "
                  "finishing what was accepted (signal again to abandon it)", file=sys.stderr)
        elif len(self.signals) == 2:
            print(f"taskorch run: {signal.Signals(signum).name} again: abandoning running tasks",
                  file=sys.stderr)
            threading.Thread(target=self.orchestrator.stop, args=(0,), name="taskorch-cli-abandon",
                             daemon=True).start()

    def _stop_reading(self) -> None:
        # Never take self.lock here: a signal handler may run while the main thread holds it.
        self.stopping = True
        threading.Thread(
            target=self._finish_when_drained, name="taskorch-cli-drain", daemon=True
        ).start()

    def _finish_when_drained(self) -> None:
        # The reader may be blocked reading a stdin that never closes: the inputs it read and
        # had not sent yet (a partial --chunksize chunk) are sent from here.
        with self.lock:
            self.lock.wait_for(lambda: not self.busy)
            chunk, self.chunk = self.chunk, []
            self.busy = bool(chunk)
        if chunk:
            self._submit(chunk)
        with self.lock:
            self.lock.wait_for(lambda: not self.busy and self.outstanding == 0)
        self.finished.set()

    # reader thread ----------------------------------------------------------------------

    def _read(self, lines: Iterator[tuple[int, bytes]]) -> None:
        size = self.args.chunksize
        try:
            for line_number, raw in lines:
                if not raw.strip():
                    continue
                index = self.numbered
                self.numbered += 1
                if self.joblog is not None:
                    try:
                        if self.joblog.seen(index, line_number, raw):
                            self.skipped += 1
                            continue
                    except ValueError as exc:  # a joblog of another input
                        self.usage_error = str(exc)
                        self._stop_reading()
                        break
                with self.lock:
                    if self.stopping:
                        break
                    self.busy = True
                    self.read += 1
                    self.outstanding += 1
                try:
                    args, kwargs = parse_input(decode_line(raw, line_number), line_number)
                except LineError as exc:  # this line alone is lost: say so, read on
                    self._owe([index], None, ("UnicodeDecodeError", str(exc)))
                    continue
                except UsageError as exc:
                    self.usage_error = str(exc)
                    self._owe([index], None, ("UsageError", str(exc)))
                    self._stop_reading()
                    break
                with self.lock:
                    self.chunk.append((index, args, kwargs))
                    full, self.busy = len(self.chunk) >= size, False
                    if full:
                        chunk, self.chunk, self.busy = self.chunk, [], True
                    self.lock.notify_all()
                if full:
                    self._submit(chunk)
        except Exception as exc:  # reading the input failed (an I/O error)
            self.usage_error = f"reading the input failed: {type(exc).__name__}: {exc}"
            self.stopping = True
        finally:
            with self.lock:
                chunk, self.chunk = self.chunk, []
                self.busy = bool(chunk)
            if chunk:
                self._submit(chunk)
            with self.lock:
                self.reader_done = True
                self.lock.notify_all()
                if self.outstanding == 0:
                    self.finished.set()

    def _submit(self, chunk: list[tuple[int, tuple[Any, ...], dict[str, Any]]]) -> None:
        """One task per input, or, with --chunksize, one task for the whole chunk (the bulk
        path of ``map()``: one message for many inputs; the policy then applies per chunk).
        The caller set ``busy``; this clears it."""
        o = self.orchestrator
        indices = [index for index, _, _ in chunk]
        chunked = self.args.chunksize > 1
        try:
            if not chunked:
                _, args, kwargs = chunk[0]
                item = o.intake.prepare_call(self.fn, args, kwargs)
            else:
                payload = encode_call(run_chunk, (self.fn, [a for _, a, _ in chunk], True, True,
                                                  [k for _, _, k in chunk]), {})
                item = o.intake.prepare(payload)
            item.listener = self.stamps
            future = (o.intake.offer(item, self.fn) if self.args.drop
                      else o.intake.offer_blocking(item))
        except Exception as exc:  # closed by a signal, or the call does not pickle
            self._owe(indices, None, ("Cancelled", "never started: the run was interrupted")
                      if self.stopping else (type(exc).__name__, str(exc)))
            return
        if future is None:
            self._owe(indices, None, ("Dropped", "the backlog was full (--drop)"))
            return
        self.display.track(future, indices)  # (before its outcome can reach the writer)
        future.add_done_callback(lambda f: self.done_queue.put((indices, f, None, chunked)))
        with self.lock:
            self.busy = False
            self.lock.notify_all()

    def _owe(self, indices: list[int], future: Future[Any] | None, error: tuple[str, str]) -> None:
        self.done_queue.put((indices, future, error, False))
        with self.lock:
            self.busy = False
            self.lock.notify_all()

    # writer thread -----------------------------------------------------------------------

    def _write(self) -> None:
        try:
            self._write_records()
        except BaseException as exc:  # e.g. `taskorch run ... | head`: the reader went away
            # Nobody will read the records: abandon the run instead of hanging on them.
            self.output_error = f"writing the output failed: {type(exc).__name__}: {exc}"
            self.stopping = True
            self.orchestrator.stop(timeout=0)
            self.finished.set()

    def _write_records(self) -> None:
        display, out = self.display, self.out
        try:
            while True:
                entry = display.next_done(self.done_queue)
                if entry is None:
                    return
                indices, future, error, chunked = entry
                stamp = (self.stamps.pop(future) if self.stamps is not None
                         else (None, None, 0.0))
                with display.writing_records():
                    for rec in records_of(indices, future, error, chunked):
                        failure = rec.get("error", {})
                        tb, sig = failure.pop("traceback", ""), failure.pop("signal", 0)
                        line = dump_record(rec) + "\n"
                        out.write(line)
                        if self.joblog is not None:
                            self.joblog.write(rec["index"],
                                              _entry(rec, stamp, len(line), tb, sig))
                        self.counts["ok" if rec["ok"] else "failed"] += 1
                if self.done_queue.empty():
                    out.flush()
                    if self.joblog is not None:
                        self.joblog.flush()
                display.finished(future, len(indices))
                with self.lock:
                    self.outstanding -= len(indices)
                    if self.outstanding == 0:
                        self.lock.notify_all()
                        if self.reader_done and not self.busy and not self.chunk:
                            self.finished.set()
        finally:
            display.close()
            out.flush()

    def _summary(self, seconds: float, drained: bool) -> None:
        s = self.orchestrator.stats()
        n = self.counts["ok"] + self.counts["failed"]
        rate = n / seconds if seconds > 0 else 0.0
        print(
            f"taskorch run: {_count(n, 'input')}: {self.counts['ok']} ok, "
            f"{self.counts['failed']} failed "
            f"({s.cancelled} cancelled, {s.abandoned} abandoned, {s.dropped} dropped) in "
            f"{seconds:.2f} s ({rate:.0f}/s); {s.retried} retries, {s.crashes} worker crashes, "
            f"{s.timeouts} timeouts" + ("" if drained else "; not drained")
            + (f"; {_count(self.skipped, 'input')} skipped (--resume)" if self.skipped else ""),
            file=sys.stderr,
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _entry(rec: dict[str, Any], stamp: tuple[float | None, int | None, float], received: int,
           tb: str, sig: int) -> Entry:
    """The joblog's entry for an output record ``rec`` (``received``: its bytes)."""
    started, pid, seconds = stamp
    error = rec.get("error")
    exitval = 0 if rec["ok"] else 1 if started is not None or sig else -1
    return Entry(exitval=exitval, started=started, seconds=seconds,
                 pid=pid, signal=sig, received=received,
                 error=f"{error['type']}: {error['message']}" if error else "", traceback=tb)


def main(args: argparse.Namespace) -> int:
    prepend_import_paths(args.path)  # before the target is imported: it may live there
    fn = resolve_target(args.target, args.path)
    with contextlib.ExitStack() as stack:
        joblog = None
        if args.resume or args.resume_failed:
            if not args.joblog:
                raise UsageError("--resume and --resume-failed need --joblog FILE")
        if args.joblog:
            joblog = stack.enter_context(Joblog.open(
                args.joblog, resume=args.resume or args.resume_failed,
                rerun_failed=args.resume_failed,
            ))
        if args.input:
            try:
                source: BinaryIO = stack.enter_context(open(args.input, "rb"))
            except OSError as exc:
                raise UsageError(f"cannot read --input: {exc}") from exc
        else:
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise UsageError("there is no stdin to read the inputs from; pass --input FILE")
            if sys.stdin.isatty():  # else a user waits on a silent terminal
                print("taskorch run: reading the inputs from the terminal, one JSON line each "
                      "(end with Ctrl-D; --input FILE reads a file)", file=sys.stderr)
            source = stdin
        if args.output:
            try:
                out: IO[str] = stack.enter_context(open(args.output, "w", encoding="utf-8"))
            except OSError as exc:
                raise UsageError(f"cannot write --output: {exc}") from exc
        else:
            out = sys.stdout
        return _Run(args, fn, out, joblog).execute(numbered_lines(source))
