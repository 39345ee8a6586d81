"""``taskorch run``'s display (the CLI process): the overall progress bar on stderr and, on a
terminal, a line under it for each task running longer than ``LONG_AFTER``, with its latest
``taskorch.progress()`` report (``future.progress()``; issue 25).

Threads: the reader (and the drain thread, after a signal) ``track`` each task it submits,
under ``_lock``, which guards ``_tracked`` only; everything else runs on the writer thread,
which owns the bar and the lines: it waits for outcomes ``TICK`` at a time (``next_done``) and
redraws the lines between them, so a task that reports progress while nothing finishes is
seen moving.

The lines are drawn below the bar with ANSI cursor moves, the cursor always left on the bar's
line (where tqdm draws, from the writer or from its monitor thread): "\\n", clear to the end of
the screen, the lines (each cut to the terminal's width, so none wraps), then back up as many.
Every such write holds tqdm's own lock (the one its monitor thread takes to refresh the bar),
so no bar refresh lands between the moves. Not on a stream that is not a terminal (a file, a
CI log): the bar alone then, as asked by ``--progress``.

Records written to the same terminal (stdout is it) would land among the lines: the lines and
the bar are cleared before a batch of records is written and flushed, and drawn again after.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import argparse
    from concurrent.futures import Future

    from taskorch._stats import Progress

#: A task running longer than this (seconds) gets a line of its own.
LONG_AFTER = 1.0
#: How often the lines are drawn again while no outcome comes (seconds): what a line lags.
TICK = 0.25
#: Lines of running tasks at most (the oldest first); one more says how many are not shown.
MAX_LINES = 4


def progress_bar(args: argparse.Namespace) -> Any:
    """The overall bar (tqdm), or None: ``--progress`` / ``--no-progress``, else when stderr
    is a terminal."""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="task", file=sys.stderr, dynamic_ncols=True)


def _isatty(stream: IO[Any]) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's StringIO)
        return False


class Display:
    """The bar (or nothing) and the lines of the long-running tasks, for one run."""

    def __init__(self, args: argparse.Namespace, out: IO[str]) -> None:
        self.bar = progress_bar(args)
        self._stream = sys.stderr
        # Lines only under a bar on a terminal: cursor moves would garble a file.
        self.lines_shown = self.bar is not None and _isatty(self._stream)
        self._out = out
        self._out_here = self.bar is not None and _isatty(out)  # records on this terminal
        self._lock = threading.Lock()
        # Tasks submitted and not written yet: future -> [label, when first seen running
        # (time.monotonic()), or None]. Added by the reader; read and removed by the writer.
        self._tracked: dict[Future[Any], list[Any]] = {}
        self._drawn = 0  # lines drawn under the bar now (writer thread)
        self._next_draw = 0.0

    # -- the reader (or drain) thread ----------------------------------------------------------

    def track(self, future: Future[Any], indices: list[int]) -> None:
        if not self.lines_shown:
            return
        label = (f"input {indices[0]}" if len(indices) == 1
                 else f"inputs {indices[0]}-{indices[-1]}")
        with self._lock:
            self._tracked[future] = [label, None]

    # -- the writer thread ---------------------------------------------------------------------

    def next_done(self, done: queue.SimpleQueue[Any]) -> Any:
        """The next entry of ``done``, drawing the lines every ``TICK`` while it waits."""
        if not self.lines_shown:
            return done.get()
        while True:
            try:
                return done.get(timeout=TICK)
            except queue.Empty:
                self._draw(force=True)

    def finished(self, future: Future[Any] | None, count: int) -> None:
        """``count`` inputs were written, those of ``future``'s task."""
        if self.bar is None:
            return
        self.bar.update(count)
        if self.lines_shown:
            with self._lock:
                self._tracked.pop(future, None)  # type: ignore[arg-type]
            self._draw(force=False)

    @contextlib.contextmanager
    def writing_records(self) -> Iterator[None]:
        """Around writing a batch of records: if they go to this terminal, the bar and the
        lines make room first, and the records are flushed before they are drawn again."""
        if not self._out_here:
            yield
            return
        with self.bar.get_lock():
            self._erase()
            self.bar.clear(nolock=True)
        yield
        self._out.flush()
        self.bar.refresh()
        self._next_draw = 0.0  # the lines come back at the next draw

    def close(self) -> None:
        if self.bar is None:
            return
        if self._drawn:
            with self.bar.get_lock():
                self._erase()
        self.bar.close()

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now < self._next_draw:
            return
        self._next_draw = now + TICK
        lines = self._lines(now)
        if not lines and not self._drawn:
            return
        width = max(20, _columns(self._stream)) - 1
        text = "\n\x1b[J" + "\n".join(line[:width] for line in lines)
        with self.bar.get_lock():
            self._write(text + (f"\x1b[{len(lines)}A\r" if lines else "\x1b[A\r"))
            self._drawn = len(lines)
        self.bar.refresh()  # (its elapsed time moves on too)

    def _erase(self) -> None:
        """Clear the lines under the bar (tqdm's lock held)."""
        if self._drawn:
            self._write("\n\x1b[J\x1b[A\r")
            self._drawn = 0

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a terminal gone: nothing to show
            self._stream.write(text)
            self._stream.flush()

    def _lines(self, now: float) -> list[str]:
        with self._lock:
            tracked = list(self._tracked.items())
        long = []
        for future, entry in tracked:
            if entry[1] is None:
                if not future.running():
                    continue
                entry[1] = now  # (only this thread writes it once tracked)
            if now - entry[1] >= LONG_AFTER and not future.done():
                long.append((entry[1], entry[0], future))
        long.sort(key=lambda e: e[0])
        lines = [describe(label, now - started, getattr(future, "progress", lambda: None)())
                 for started, label, future in long[:MAX_LINES]]
        if len(long) > MAX_LINES:
            lines.append(f"  ... and {len(long) - MAX_LINES} more running")
        return lines


def describe(label: str, seconds: float, progress: Progress | None) -> str:
    """One running task's line: "  input 7: 12 s, 40/100 (40%) resizing"."""
    head = f"  {label}: {seconds:.0f} s, "
    if progress is None:
        return head + "running (no progress reported)"
    done = amount(progress.done)
    if progress.total:
        done += f"/{amount(progress.total)} ({100 * progress.done / progress.total:.0f}%)"
    return head + done + (f" {progress.message}" if progress.message else "")


def amount(value: float) -> str:
    """A progress count as people read it: whole numbers in full with thousands separators
    (1,234,567, where ``:g`` wrote 1.23457e+06), others to two decimals (1,234.5; 0.25),
    a tiny fraction to three significant digits."""
    if math.isfinite(value) and value == int(value):
        return f"{int(value):,}"
    if abs(value) >= 0.01:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def _columns(stream: IO[Any]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80
