"""The local pool's reading of a worker's events (``LocalPool._read_events``): what reaches the
dispatcher core, in what order. A first attempt's Started is held back one event, so that a
short task whose outcome comes in the same read is one TaskFinished (its rule announces the
start); any other event after it must find the start already passed on.

Unit tests over a stand-in worker: the order of events within one read is what they are
about, and a real worker's reads cannot be made to split where a test wants."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pytest

from taskorch import Policy
from taskorch._parent.local import LocalPool
from taskorch._parent.pool import AttemptRetrying, AttemptStarted, PoolEvent, TaskFinished
from taskorch._parent.task import TaskFuture, WorkItem
from taskorch._wire import Event, Recalled, Reported, Retrying, Started, Succeeded


class _Worker:
    """What ``_read_events`` reads and writes of a ``process.WorkerProcess``."""

    pid = 4242

    def __init__(self, items: list[WorkItem]) -> None:
        self.inflight = deque(items)
        self.inflight_bytes = sum(len(item.payload) for item in items)
        self.events_seen = False
        self.last_progress = 0.0
        self.tasks_run = 0
        self.retiring: str | None = None
        self.recall_sent = False

    def record_duration(self, seconds: float) -> None:
        pass


@pytest.fixture
def pool() -> Iterator[LocalPool]:
    pool = LocalPool(1, b"", kill_grace=1.0, max_tasks_per_worker=None,
                     max_memory_per_worker=None)  # (no worker: open() would spawn it)
    try:
        yield pool
    finally:
        pool.close()


def _items(*task_ids: int) -> list[WorkItem]:
    return [WorkItem(task_id, TaskFuture(), b"call", Policy(), None) for task_id in task_ids]


def _read(pool: LocalPool, worker: _Worker, events: list[Event]) -> list[PoolEvent]:
    pool._read_events(worker, events)  # type: ignore[arg-type]
    return pool._handing_back()


def _kinds(events: list[PoolEvent]) -> list[tuple[str, int, int | None]]:
    """(event type, task id, attempt) of each pool event."""
    out: list[tuple[str, int, int | None]] = []
    for event in events:
        if isinstance(event, AttemptStarted):
            out.append(("started", event.item.task_id, event.attempt))
        elif isinstance(event, AttemptRetrying):
            out.append(("retrying", event.item.task_id, event.attempt))
        elif isinstance(event, TaskFinished):
            out.append(("finished", event.item.task_id, event.outcome.attempts))
        else:
            out.append((type(event).__name__, -1, None))
    return out


def test_a_first_start_followed_by_its_outcome_is_one_finished_event(pool: LocalPool) -> None:
    worker = _Worker(_items(1, 2))
    got = _read(pool, worker, [Started(1, 1, None), Succeeded(1, 1, 0.001, b"r"),
                               Started(2, 1, None), Succeeded(2, 1, 0.001, b"r")])
    assert _kinds(got) == [("finished", 1, 1), ("finished", 2, 1)]
    assert not worker.inflight and worker.tasks_run == 2


def test_a_first_start_is_passed_on_before_any_other_event(pool: LocalPool) -> None:
    worker = _Worker(_items(1))
    got = _read(pool, worker, [Started(1, 1, None), Reported(1, 1.0, 2.0, "half", 0.0),
                               Succeeded(1, 1, 0.001, b"r")])
    assert _kinds(got) == [("started", 1, 1), ("finished", 1, 1)]
    assert worker.inflight == deque()

    worker = _Worker(_items(2))
    got = _read(pool, worker, [Started(2, 1, None), Retrying(2, 1, "ValueError: x", 0.0, False),
                               Started(2, 2, None), Succeeded(2, 2, 0.002, b"r")])
    # (a later attempt's start is never held back: its rule counts every attempt)
    assert _kinds(got) == [("started", 2, 1), ("retrying", 2, 1), ("started", 2, 2),
                           ("finished", 2, 2)]


def test_a_first_start_at_the_end_of_a_read_is_passed_on_then(pool: LocalPool) -> None:
    items = _items(1, 2)
    worker = _Worker(items)
    got = _read(pool, worker, [Started(1, 1, None)])
    assert _kinds(got) == [("started", 1, 1)]
    assert items[0].started_on is worker  # type: ignore[comparison-overlap]
    got = _read(pool, worker, [Succeeded(1, 1, 0.001, b"r"), Started(2, 1, None),
                               Recalled([])])
    assert _kinds(got) == [("finished", 1, 1), ("started", 2, 1)]
    assert list(worker.inflight) == [items[1]]
