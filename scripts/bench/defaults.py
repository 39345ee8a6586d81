"""The default-settings section (``--defaults``): remote run() at ``taskorch serve``'s defaults
against a local pool, with a producer that waits for room (issue 23).

Runs in the interpreter the user started, on its main thread, like ``cost``. Each setting
submits N no-op tasks one by one, waiting for room whenever the backlog is full, then collects
every result; tasks/s from the first submission to the last result, after a warm-up:

  local     ``taskorch.Executor(max_workers=W, max_backlog=B).submit``: waits for room
  remote    ``taskorch serve`` started with no ``--backlog`` (its default, B) and its journal,
            ``taskorch.connect().with_wait(None).run``: spends credits, waits for room
            when it has none

both at serve's default backlog, and again at an in-process pool's default (128) for
comparison, the settings interleaved, medians of ``--reps``. The target (issue 23): remote at
or above 0.5x local at serve's defaults.
"""

from __future__ import annotations

import sys
import time
from typing import Any

QUICK_N = 2_000
FULL_N = 20_000
SMALL_BACKLOG = 128  # TaskOrchestrator's default, and serve's before issue 23


class _LocalWaiting:
    """A local pool whose producer waits for room: ``taskorch.Executor.submit``."""

    def __init__(self, workers: int, backlog: int) -> None:
        import taskorch

        self.pool = taskorch.Executor(max_workers=workers, max_backlog=backlog)

    def submit(self, fn: Any) -> Any:
        return self.pool.submit(fn)

    def stop(self) -> None:
        self.pool.shutdown(wait=True)


class _RemoteWaiting:
    """``taskorch serve`` at its defaults (or ``--backlog``), a producer that waits for room."""

    def __init__(self, workers: int, backlog: int | None) -> None:
        from .pools import TaskorchRemoteAdapter

        adapter = TaskorchRemoteAdapter(workers)
        adapter.backlog_args = () if backlog is None else ("--backlog", str(backlog))
        adapter.create()
        self.adapter = adapter
        self.waiting = adapter.pool.with_wait(None)

    def submit(self, fn: Any) -> Any:
        return self.waiting.run(fn)

    def stop(self) -> None:
        self.adapter.stop(30.0)


def serve_default_backlog() -> int:
    from taskorch.cli.serve import SERVICE_BACKLOG

    return int(SERVICE_BACKLOG)


def rate(kind: str, workers: int, backlog: int, n: int) -> float:
    from . import tasks as T

    default = serve_default_backlog()
    pool: Any = (_LocalWaiting(workers, backlog) if kind == "local" else
                 _RemoteWaiting(workers, None if backlog == default else backlog))
    try:
        for f in [pool.submit(T.noop) for _ in range(min(n, 1000))]:  # warm-up
            f.result(120.0)
        t0 = time.perf_counter()
        futures = [pool.submit(T.noop) for _ in range(n)]
        for f in futures:
            f.result(120.0)
        return n / (time.perf_counter() - t0)
    finally:
        pool.stop()


def main(args: Any) -> int:
    from .harness import describe, median

    n = QUICK_N if args.quick else FULL_N
    reps = args.reps or (1 if args.quick else 3)
    default = serve_default_backlog()
    settings = [(kind, backlog) for backlog in (default, SMALL_BACKLOG)
                for kind in ("local", "remote")]
    runs: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    errors: dict[tuple[str, int], str] = {}
    for rep in range(reps):
        for kind, backlog in settings:
            print(f"bench: defaults {rep + 1}/{reps}: {kind}, backlog {backlog} ...",
                  file=sys.stderr, flush=True)
            try:
                runs[(kind, backlog)].append(rate(kind, args.workers, backlog, n))
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                errors[(kind, backlog)] = describe(exc)
    print(f"## Default settings: no-op tasks/s with a producer that waits for room ({n:,} tasks, "
          f"{args.workers} workers, median of {reps})")
    print()
    print("| backlog | local: Executor.submit | remote: connect().with_wait(None).run, journal "
          "| remote / local |")
    print("|---|---|---|---|")
    for backlog in (default, SMALL_BACKLOG):
        cells = []
        for kind in ("local", "remote"):
            values = runs[(kind, backlog)]
            cells.append(f"error: {errors[(kind, backlog)]}" if not values and (kind, backlog)
                         in errors else f"{median(values):,.0f}" if values else "")
        local, remote = (runs[(k, backlog)] for k in ("local", "remote"))
        ratio = f"{median(remote) / median(local):.2f}x" if local and remote else ""
        label = (f"{backlog:,} (serve's default)" if backlog == default
                 else f"{backlog} (an in-process pool's default)")
        print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    print()
    print("Target (issue 23): remote at or above 0.5x local at serve's defaults. The remote "
          "producer spends the credits the server grants (no round trip) and, out of them, "
          "waits for room in one round trip; the local one waits in the backlog's room waiters.")
    return 0
