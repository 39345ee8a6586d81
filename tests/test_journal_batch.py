"""The journal's writer folds a task's start and end into one write when both are in one
batch (short tasks at speed): the record must read as if the two had been written in turn."""

from __future__ import annotations

import threading
from typing import Any

from test_serve_keys import Hold
from test_service import R

from taskorch._service.protocol import O_RESULT
from taskorch._service.server.journal import Journal


def _record(journal: Journal, task_id: int) -> tuple[Any, ...]:
    got: list[Any] = []
    done = threading.Event()
    journal.run(lambda db: db.execute(
        "SELECT state, status, attempts, started, worker_pid, finished, outcome FROM tasks "
        "WHERE id=?", (task_id,)).fetchone(), lambda row: (got.append(row), done.set()))
    assert done.wait(R)
    return tuple(got[0])


def _submitted(journal: Journal, sub: int) -> int:
    ids: list[int] = []
    committed = threading.Event()
    journal.submit(b"c" * 16, sub, b"call", None,
                   lambda task_id, *rest: (ids.append(task_id), committed.set()))
    assert committed.wait(R)
    return ids[0]


def test_a_start_and_an_end_in_one_batch_leave_both_in_the_record() -> None:
    journal = Journal(None)
    journal.start()
    try:
        alone, together = _submitted(journal, 1), _submitted(journal, 2)
        journal.started(alone, 1, 4242)  # its own batch: running, with its pid
        assert journal.flush(R)
        state, status, attempts, started, pid, _, _ = _record(journal, alone)
        assert (state, status, attempts, pid) == ("running", "running", 1, 4242)
        assert started is not None
        hold = Hold(journal).wait_entered()  # what follows goes into one batch
        try:
            journal.started(together, 1, 4343)
            journal.started(together, 2, 4444)  # a retry's start: the last one wins
            journal.finished(together, O_RESULT, 2, 0.01, None, lambda: None, "succeeded")
            journal.started(alone, 2, 4545)  # no end in this batch: written as a start
        finally:
            hold.release()
        assert journal.flush(R)
        state, status, attempts, started, pid, finished, outcome = _record(journal, together)
        assert (state, status, attempts, pid, outcome) == ("done", "succeeded", 2, 4444, O_RESULT)
        assert started is not None and finished is not None and started <= finished
        assert _record(journal, alone)[1:5:3] == ("running", 4545)
    finally:
        journal.close()
