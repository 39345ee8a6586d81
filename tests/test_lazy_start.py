"""Lazy start: an orchestrator starts its workers on first use, not in its constructor, so a
module-level one costs nothing in a process that never submits (a gunicorn master, taskorch's
own workers, which import the task's module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import _module_orchestrator as m
import _tasks as t
import psutil
import pytest
from conftest import FAST, leftover_processes

import taskorch
from taskorch import OrchestratorClosedError, TaskOrchestrator

R = t.DEADLOCK_TIMEOUT


def descendants() -> set[int]:
    """This process's descendants but the resource trackers, once that set holds still (a
    tracker just forked has not exec'd its command line yet)."""
    def same_twice() -> Any:
        first = {p.pid for p in leftover_processes()}
        return [first] if first == {p.pid for p in leftover_processes()} else None

    return t.wait_until(same_twice, what="a stable set of descendants")[0]


@pytest.fixture
def lazy_orchestrator() -> Iterator[Callable[..., TaskOrchestrator]]:
    """As conftest's make_orchestrator (always stopped), but not started."""
    made: list[TaskOrchestrator] = []

    def make(**kwargs: Any) -> TaskOrchestrator:
        made.append(TaskOrchestrator(policy=FAST, **kwargs))
        return made[-1]

    yield make
    for o in made:
        o.stop(R)


def pool_processes(workers: list[int]) -> set[int]:
    """The processes a pool of these workers is expected to have: each worker and its guardian
    (the one child it forks at its start; taskorch/_worker/main.py)."""
    def guardians() -> set[int]:
        return {child.pid for pid in workers for child in psutil.Process(pid).children()}

    t.wait_until(lambda: len(guardians()) >= len(workers), what="each worker's guardian")
    return set(workers) | guardians()


def test_the_constructor_starts_no_process_and_the_first_run_does() -> None:
    o = TaskOrchestrator(worker_count=2, policy=FAST)
    assert o.worker_pids() == [] and descendants() == set()
    assert "not started" in repr(o) and o.worker_count == 2 and o.stats().workers == 0
    try:
        assert o.run(t.square, 3).result(R) == 9
        assert len(o.worker_pids()) == 2
        expected = pool_processes(o.worker_pids())
        assert descendants() == expected
    finally:
        o.stop(R)


@pytest.mark.parametrize("first", ["start", "map", "schedule", "run_async"])
def test_each_entry_point_starts_the_workers(lazy_orchestrator: Any, first: str) -> None:
    import asyncio

    o = lazy_orchestrator(worker_count=1)
    assert o.worker_pids() == []
    if first == "start":
        o.start()
        o.start()  # idempotent
    elif first == "map":
        assert list(o.map(t.square, [1, 2])) == [1, 4]
    elif first == "schedule":
        o.schedule(t.square, every=3600, args=(2,)).cancel()
    else:
        assert asyncio.run(o.run_async(t.square, 4)).result(R) == 16
    assert len(o.worker_pids()) == 1


def test_stopped_before_any_use_it_starts_nothing_ever() -> None:
    o = TaskOrchestrator(worker_count=2, policy=FAST)
    report = o.stop(timeout=R)
    assert report.drained and (report.succeeded, report.cancelled) == (0, 0)
    with pytest.raises(OrchestratorClosedError):
        o.run(t.square, 2)
    o.start()  # nothing to start after a stop
    assert o.worker_pids() == [] and descendants() == set()
    assert "stopped" in repr(o)


def test_a_module_level_orchestrator_starts_nothing_in_the_workers_that_import_it(
        tmp_path: Path) -> None:
    # One orchestrator of 2 workers, whose tasks live in a module that makes its own
    # orchestrator at import: before lazy start each worker started an idle pool of 2 there.
    assert m.inner.worker_pids() == []
    with TaskOrchestrator(worker_count=2, policy=FAST) as o:
        calls = [o.run(m.where, str(tmp_path), 2) for _ in range(2)]
        seen = {f.result(R) for f in calls}  # both workers imported the task module
        assert seen == set(o.worker_pids())
        # The 2 workers and their guardians: no pool under them (there were 2 x 2 workers,
        # their guardians and resource trackers before lazy start).
        expected = pool_processes(o.worker_pids())
        assert descendants() == expected
        assert len(descendants()) == 4
        # Running a task from inside a task stays possible; it costs that worker a pool of
        # its own (its 2 workers at least), kept until that worker exits.
        assert o.run(m.square_inside, 5).result(R) == (25, 2)
        assert len(descendants()) >= 4 + 2
    assert m.inner.worker_pids() == []  # (the test's own: never used here)


def test_the_executor_starts_at_once() -> None:
    with taskorch.Executor(1, policy=FAST) as ex:
        assert len(ex._orchestrator.worker_pids()) == 1  # noqa: SLF001 - the test looks inside
