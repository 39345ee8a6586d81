"""The public surface: exports, the layering of the modules, and map()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Callable

import _tasks as t
import pytest
from _tasks import scaled

import taskorch
from taskorch import Policy, TaskOrchestrator

Make = Callable[..., TaskOrchestrator]
R = scaled(30)


def test_all_is_sorted_and_everything_in_it_imports() -> None:
    assert taskorch.__all__ == sorted(taskorch.__all__)
    for name in taskorch.__all__:
        assert getattr(taskorch, name) is not None, name
    assert issubclass(taskorch.QueueFullError, taskorch.TaskorchError)
    assert issubclass(taskorch.SerializationError, TypeError)
    assert issubclass(taskorch.TaskTimeoutError, TimeoutError)


def test_worker_side_modules_import_no_parent_module_and_start_no_thread() -> None:
    # What a worker process imports: it must stay light, and never pull in the parent side.
    code = textwrap.dedent("""
        import sys, threading
        import taskorch._worker.main, taskorch._worker.map
        parent = sorted(m for m in sys.modules if m.startswith("taskorch._parent")
                        or m.startswith("taskorch._service") or m.startswith("taskorch.cli"))
        heavy = sorted(m for m in ("asyncio", "tenacity", "loky.process_executor")
                       if m in sys.modules)
        print(parent, heavy, threading.active_count())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=R)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]", "1"]


def test_import_taskorch_does_not_import_the_optional_backends() -> None:
    code = ("import sys, taskorch; "
            "print(sorted(m for m in ('distributed', 'dask', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=R)
    assert out.stdout.strip() == "[]"


def test_map_returns_results_in_order(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=2)
    assert list(o.map(t.square, range(1000))) == [i * i for i in range(1000)]
    assert list(o.map(t.add, [1, 2, 3], [10, 20, 30])) == [(11, ""), (22, ""), (33, "")]
    generator = (i for i in range(500))  # no len(): chunk size from measured item time
    assert list(o.map(t.square, generator)) == [i * i for i in range(500)]
    assert list(o.map(t.square, range(10), chunksize=3)) == [i * i for i in range(10)]
    assert list(o.map(t.square, [])) == []


def test_map_raises_an_items_exception_or_returns_them(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=2)
    with pytest.raises(ZeroDivisionError):
        list(o.map(lambda x: 1 / x, [1, 2, 0, 4]))
    results = list(o.map(lambda x: 1 / x, [1, 0, 4], return_exceptions=True))
    assert results[0] == 1.0 and results[2] == 0.25
    assert isinstance(results[1], ZeroDivisionError) and results[1].__cause__ is not None


def test_map_keeps_memory_flat_on_a_long_input(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=2, max_backlog=4)
    consumed = 0

    def endless():
        nonlocal consumed
        while True:
            consumed += 1
            yield consumed

    results = o.map(t.identity, endless(), chunksize=10)
    first = [next(results) for _ in range(100)]
    assert first == list(range(1, 101))
    # Lazy: at most 2 * worker_count chunks were read ahead of what we took.
    assert consumed <= 100 + 10 * (2 * 2 + 1)
    results.close()  # cancels what is still queued
    assert o.stop(timeout=scaled(10)).drained


def test_map_validates_its_arguments(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=1)
    with pytest.raises(ValueError, match="chunksize"):
        o.map(t.square, [1], chunksize=0)
    with pytest.raises(TypeError):
        o.map(t.square)
    with pytest.raises(ValueError, match="chunksize"):  # the options() view checks it too
        o.options(policy=Policy(retries=0)).map(t.square, [1], chunksize=0)


def test_map_applies_the_policy_per_chunk(make_orchestrator: Make, tmp_path) -> None:
    o = make_orchestrator(worker_count=1, policy=Policy(retries=1, backoff_initial=0.0))
    counter = tmp_path / "n"
    # The one chunk fails on its first attempt (fail_until raises until its 2nd call).
    assert list(o.map(t.fail_until, [str(counter)], [2])) == [2]
    assert o.stats().retried == 1


def test_map_with_return_exceptions_still_times_out_its_chunk(
    make_orchestrator: Make, gates, fifo,
) -> None:
    from taskorch import TaskTimeoutError

    o = make_orchestrator(worker_count=1, policy=Policy(timeout=0.3))
    g = gates("hung-item")
    with pytest.raises(TaskTimeoutError):
        list(o.map(t.hang, [str(g.started)], [fifo("never")], return_exceptions=True))
