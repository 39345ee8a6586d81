"""The journal's writer folds a task's start and end into one write when both are in one
batch (short tasks at speed): the record must read as if the two had been written in turn."""

from __future__ import annotations

import pickle
import threading
from typing import Any

from test_serve_keys import Hold
from test_service import R

from taskorch._service.protocol import O_RAISED, O_RESULT
from taskorch._service.server.journal import Journal
from taskorch._service.server.journal_rows import LARGE_VALUE


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


def test_a_batch_of_many_records_reads_as_if_written_one_by_one() -> None:
    """A batch's inserts and ends go many rows per statement (``write_rows``: chunks of 64,
    32, ... 1; large results one by one): 100 submissions in one batch get their ids in
    order, and 100 ends in one batch, some of them large or failed, leave each record as
    its own end says."""
    journal = Journal(None)
    journal.start()
    try:
        ids: dict[int, int] = {}
        committed = threading.Event()
        hold = Hold(journal).wait_entered()
        try:
            for sub in range(100):
                journal.submit(b"c" * 16, sub, b"call%d" % sub, None,
                               lambda task_id, *rest, sub=sub: (
                                   ids.__setitem__(sub, task_id),
                                   len(ids) == 100 and committed.set()))
        finally:
            hold.release()
        assert committed.wait(R)
        assert [ids[sub] for sub in range(100)] == list(range(ids[0], ids[0] + 100))
        hold = Hold(journal).wait_entered()
        try:
            for sub, task_id in ids.items():
                large = sub % 10 == 3
                journal.finished(task_id, O_RESULT if sub % 2 else O_RAISED, 1, 0.5,
                                 b"r" * (LARGE_VALUE if large else sub), lambda: None,
                                 "succeeded" if sub % 2 else "failed")
        finally:
            hold.release()
        assert journal.flush(R)
        got: list[Any] = []
        done = threading.Event()
        journal.run(lambda db: db.execute(
            "SELECT id, state, status, outcome, data, payload FROM tasks ORDER BY id").fetchall(),
            lambda rows: (got.extend(rows), done.set()))
        assert done.wait(R) and len(got) == 100
        for sub, (task_id, state, status, outcome, data, payload) in enumerate(got):
            assert task_id == ids[sub] and state == "done"
            assert (status, outcome) == (("succeeded", O_RESULT) if sub % 2 else
                                         ("failed", O_RAISED))
            assert pickle.loads(data) == b"r" * (LARGE_VALUE if sub % 10 == 3 else sub)
            assert payload == (None if sub % 2 else b"call%d" % sub)  # a success drops it
    finally:
        journal.close()


def test_a_submission_made_twice_in_one_batch_keeps_the_first_whatever_their_sizes() -> None:
    # The same (client, request) twice in one batch (a resend): the first one made the record,
    # the second is answered with it, even when one of them is large (written in its place).
    journal = Journal(None)
    journal.start()
    try:
        answers: dict[str, tuple[int, Any]] = {}
        both = threading.Event()
        hold = Hold(journal).wait_entered()
        try:
            for name, payload in (("small", b"call"), ("large", b"L" * LARGE_VALUE)):
                journal.submit(b"c" * 16, 7, payload, None,
                               lambda task_id, existing, *rest, name=name: (
                                   answers.__setitem__(name, (task_id, existing)),
                                   len(answers) == 2 and both.set()))
        finally:
            hold.release()
        assert both.wait(R)
        assert answers["small"][1] is None  # it made the record
        assert answers["large"][0] == answers["small"][0] and answers["large"][1] is not None
        got: list[Any] = []
        done = threading.Event()
        journal.run(lambda db: db.execute("SELECT payload FROM tasks").fetchall(),
                    lambda rows: (got.extend(rows), done.set()))
        assert done.wait(R) and got == [(b"call",)]
    finally:
        journal.close()


def test_an_answer_that_fails_leaves_the_other_answers_of_its_batch() -> None:
    # One connection's answer raising (a bug) is logged; the other connections of the batch
    # still hear of their outcomes (each sink is told in its own guarded call).
    import types

    from taskorch._service.server.callbacks import Calls, Grouped
    from taskorch._service.server.outcomes import Outcome
    from taskorch._service.server.registry import TaskRegistry

    heard: list[tuple[str, int]] = []

    class Sink:
        def __init__(self, name: str) -> None:
            self.name = name

        def outcomes(self, ended: list[tuple[int, Outcome]]) -> None:
            if self.name == "broken":
                raise RuntimeError("a bug in one connection")
            heard.extend((self.name, req) for req, _ in ended)

    registry = TaskRegistry.__new__(TaskRegistry)  # (only its live tasks are used here)
    registry._lock = threading.Lock()
    registry._live = {task_id: types.SimpleNamespace(more=None, sink=Sink(name), req=req)
                      for task_id, name, req in ((1, "broken", 11), (2, "fine", 22))}
    calls = Calls()
    for task_id in (1, 2):
        calls.add(Grouped(registry._publish_all, (task_id, Outcome(O_RESULT, 1, 0.1, None))))
    calls.run()
    assert heard == [("fine", 22)] and registry._live == {}
