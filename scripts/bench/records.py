"""Child side: section R (taskorch only), paging the task records of ``taskorch serve``.

A durable journal (a file, WAL, ``synchronous=NORMAL``) holding R_TASKS retained records
(10,000: issue 25), written the way serve writes them (submissions by group commit, then
outcomes: 1 in 100 failed, the rest succeeded, 100 left queued); then pages of 100 read the
way ``Client.tasks()`` reads them (``records.list_rows`` through the journal's writer thread,
each row made a ``TaskInfo``): the newest page, a page from the middle (``before_id``), the
failed ones (the (status, id) index), and one name's. Milliseconds per page, medians of
R_PAGES reads each. A figure, never a verdict (the issue asks < 50 ms per page). Also the mean
cost of ``taskorch.progress()`` in a tight loop (the issue asks < 1 us), in ns.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

from .harness import median

R_PAGE = 100
R_PAGES = 20


def r_task_records(child: Any) -> dict[str, Any]:
    from taskorch._service.protocol import O_RAISED, O_RESULT
    from taskorch._service.server.journal import Journal
    from taskorch._service.server.records import info_of, list_rows
    from taskorch._wire import encode_call, encode_exception

    n = child.p["r_tasks"]
    with tempfile.TemporaryDirectory(prefix="taskorch-bench-r-") as tmp:
        journal = Journal(os.path.join(tmp, "j.sqlite3"), synchronous="NORMAL")
        try:
            journal.start()
            ids = _submit(journal, n, encode_call)
            error = encode_exception(ValueError("bench"))
            ended = threading.Semaphore(0)
            for i, task_id in enumerate(ids[:-100]):
                failed = i % 100 == 0
                journal.finished(task_id, O_RAISED if failed else O_RESULT, 1, 0.001,
                                 error if failed else b"\x80\x05K*.", ended.release,
                                 "failed" if failed else "succeeded")
            for _ in ids[:-100]:
                ended.acquire()

            def page(states: tuple[str, ...], name: str | None,
                     before: int | None) -> float:
                done = threading.Event()
                box: list[Any] = []
                t0 = time.perf_counter()
                journal.run(lambda db: list_rows(db, states, name, R_PAGE, before),
                            lambda rows: (box.append([info_of(r) for r in rows]), done.set()))
                done.wait(30)
                seconds = time.perf_counter() - t0
                assert box and box[0], "an empty page"
                return seconds * 1000

            out = {"tasks": n, "page": R_PAGE, "progress_call_ns": _progress_call_ns()}
            for label, args in (("newest", ((), None, None)),
                                ("middle", ((), None, ids[n // 2])),
                                ("failed", (("failed",), None, None)),
                                ("name", ((), "bench.tasks.noop", ids[n // 3]))):
                out[f"{label}_ms"] = median([page(*args) for _ in range(R_PAGES)])
            return out
        finally:
            journal.close()


def _progress_call_ns(calls: int = 1_000_000) -> float:
    """Mean cost of ``taskorch.progress()`` in a tight loop while a task runs (its sink set as
    a worker sets it; the reports that pass the rate limit go nowhere), ns per call."""
    from taskorch._worker import progress

    sent: list[Any] = []
    progress.begin(lambda *report: sent.append(report))
    try:
        report = progress.progress
        t0 = time.perf_counter()
        for i in range(calls):
            report(i, calls)
        return (time.perf_counter() - t0) / calls * 1e9
    finally:
        progress.end()


def _submit(journal: Any, n: int, encode_call: Any) -> list[int]:
    from . import tasks as T

    payload = encode_call(T.noop, (), {})
    ids: list[int] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def committed(task_id: int, existing: Any, error: Any, dependencies: Any = None) -> None:
        with lock:
            ids.append(task_id)
        done.release()

    token = os.urandom(16)
    for sub in range(n):
        journal.submit(token, sub, payload, None, committed)
    for _ in range(n):
        done.acquire()
    return sorted(ids)
