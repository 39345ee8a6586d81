"""Metrics in process: the collector's exposition, parsed back with prometheus_client's own
parser, agrees with ``stats()`` after a known workload; the figures the dispatcher records
(queue wait, run time, failures with tracebacks, workers, restarts by reason)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import _tasks as T
import pytest
from _tasks import scaled
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskorch import Policy, TaskOrchestrator, WorkerCrashedError
from taskorch._parent import figures
from taskorch._parent.observe import Observer
from taskorch.metrics import COUNTERS, TaskorchCollector

FAST = Policy(backoff_initial=0.001, backoff_max=0.001, jitter=False)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition, parsed back: (sample name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def by_label(parsed: dict[Any, float], name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (n, labels), value in parsed.items()
            if n == name and label in dict(labels)}


def run_known_workload(o: TaskOrchestrator, tmp_path: Path, fifo: Callable[[str], str]) -> None:
    """3 successes, a failure, a task that succeeds on its 2nd attempt (a retry), a crash
    (retried: it succeeds), a timeout (fails)."""
    futures = [o.run(T.square, i) for i in range(3)]
    failing = o.run(T.raise_value_error, "boom")
    retried = o.with_policy(Policy(retries=2, backoff_initial=0.001, backoff_max=0.001)).run(
        T.fail_until, str(tmp_path / "counter"), 2)
    crashed = o.with_policy(Policy(retries=1, backoff_initial=0.001, backoff_max=0.001)).run(
        T.exit_first_time, str(tmp_path / "marker"), "back")
    timed_out = o.with_policy(Policy(timeout=0.3)).run(
        T.hang, str(tmp_path / "hang.started"), fifo("never"))
    assert [f.result(timeout=scaled(30)) for f in futures if f] == [0, 1, 4]
    assert failing and isinstance(failing.exception(timeout=scaled(30)), ValueError)
    assert retried and retried.result(timeout=scaled(30)) == 2
    assert crashed and crashed.result(timeout=scaled(30)) == "back"
    assert timed_out and isinstance(timed_out.exception(timeout=scaled(30)), TimeoutError)


def test_exposition_matches_stats_after_a_known_workload(
    make_orchestrator: Callable[..., TaskOrchestrator], tmp_path: Path,
    fifo: Callable[[str], str],
) -> None:
    o = make_orchestrator(worker_count=2, policy=FAST)
    registry = CollectorRegistry()
    registry.register(TaskorchCollector(o))
    run_known_workload(o, tmp_path, fifo)
    parsed = samples(registry)
    stats = o.stats()
    assert (stats.succeeded, stats.failed, stats.crashes, stats.timeouts) == (5, 2, 1, 1)
    assert stats.retried == 2  # the exception's retry and the crash's
    for field, name, _ in COUNTERS:
        assert parsed[(f"taskorch_{name}_total", ())] == getattr(stats, field), field
    assert parsed[("taskorch_tasks_queued", ())] == stats.queued == 0
    assert parsed[("taskorch_workers_wanted", ())] == 2
    assert parsed[("taskorch_breaker_state", (("taskorch_breaker_state", "closed"),))] == 1
    restarts = by_label(parsed, "taskorch_worker_restarts_total", "reason")
    assert restarts == {"crash": 1} and sum(restarts.values()) == stats.worker_restarts

    run_counts = by_label(parsed, "taskorch_task_run_seconds_count", "task")
    wait_counts = by_label(parsed, "taskorch_task_queue_wait_seconds_count", "task")
    failures = by_label(parsed, "taskorch_task_failures_total", "task")
    # Every task that ended with an outcome has a run time; every task that started, a wait.
    assert sum(run_counts.values()) == stats.succeeded + stats.failed
    assert sum(wait_counts.values()) == stats.submitted
    assert run_counts["_tasks.square"] == 3 and wait_counts["_tasks.square"] == 3
    assert failures == {"_tasks.square": 0, "_tasks.raise_value_error": 1, "_tasks.hang": 1,
                        "_tasks.fail_until": 0, "_tasks.exit_first_time": 0}
    inf = by_label({k: v for k, v in parsed.items() if ("le", "+Inf") in k[1]},
                   "taskorch_task_run_seconds_bucket", "task")
    assert inf == run_counts  # cumulative buckets end at the count


def test_failures_carry_their_traceback_and_crashes_their_error(
    make_orchestrator: Callable[..., TaskOrchestrator],
) -> None:
    o = make_orchestrator(worker_count=1, policy=FAST)
    observer = Observer(o)
    assert o.run(T.raise_value_error, "kaput").exception(timeout=scaled(30))  # type: ignore[union-attr]
    crash = o.run(T.crash_os_exit, 9)
    assert crash and isinstance(crash.exception(timeout=scaled(30)), WorkerCrashedError)
    snap = observer.snapshot()
    crashed, failed = snap.failures  # newest first
    assert (failed.name, failed.type, failed.message) == (
        "_tasks.raise_value_error", "ValueError", "kaput")
    assert "raise ValueError(message)" in failed.traceback and failed.attempts == 1
    assert crashed.name == "_tasks.crash_os_exit" and crashed.type == "WorkerCrashedError"
    assert "exit code 9" in crashed.message or "9" in crashed.message


def test_workers_show_the_running_task(
    make_orchestrator: Callable[..., TaskOrchestrator], gates: Callable[[str], T.Gate],
) -> None:
    o = make_orchestrator(worker_count=1)
    observer = Observer(o)
    gate = gates("busy")
    future = o.run(T.blocker, str(gate.started), str(gate.release_fifo))
    pid = gate.wait_started()
    T.wait_until(lambda: observer.workers()[0]["task_id"] is not None, what="the start ack")
    (worker,) = observer.workers()
    assert worker["pid"] == pid and worker["task_name"] == "_tasks.blocker"
    assert worker["running_for"] >= 0 and worker["tasks_run"] == 0
    assert worker["rss_bytes"] is None or worker["rss_bytes"] > 1_000_000
    gate.release()
    assert future and future.result(timeout=scaled(30)) == "go"
    T.wait_until(lambda: observer.workers()[0]["tasks_run"] == 1, what="the outcome")


def test_task_names_are_bounded_and_never_unpickled() -> None:
    from taskorch._wire import encode_call

    assert figures.name_of_payload(encode_call(T.square, (3,), {})) == "_tasks.square"
    assert figures.name_of_payload(encode_call(lambda: 1, (), {})) == figures.BY_VALUE
    f = figures.Figures()
    item: Any = type("Item", (), {"name": "", "task_id": 1, "attempts": 1, "accepted_at": 0.0})()
    for i in range(figures.MAX_NAMES + 10):
        item.name = f"m.f{i}"
        f.finished(item, 0.001, None)
    assert len(f.by_name) == figures.MAX_NAMES + 1
    assert f.by_name[figures.OTHER].run.counts[1] == 10 + 0  # 0.001 s: the 2nd bucket


def test_import_taskorch_imports_no_metrics_library() -> None:
    code = ("import sys, taskorch; o = taskorch.TaskOrchestrator; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prometheus_client', 'playwright') or m == 'taskorch.metrics'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=scaled(60), check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("labels", [None, {"pool": "thumbnails"}])
def test_collector_labels(make_orchestrator: Callable[..., TaskOrchestrator],
                          labels: dict[str, str] | None) -> None:
    o = make_orchestrator(worker_count=1)
    registry = CollectorRegistry()
    registry.register(TaskorchCollector(o, namespace="app", labels=labels))
    assert o.run(T.square, 2).result(timeout=scaled(30)) == 4  # type: ignore[union-attr]
    parsed = samples(registry)
    key = tuple(sorted((labels or {}).items()))
    assert parsed[("app_tasks_succeeded_total", key)] == 1
