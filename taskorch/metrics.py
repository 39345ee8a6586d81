"""Prometheus metrics of a ``TaskOrchestrator``, for an application's own registry.

::

    from prometheus_client import REGISTRY
    from taskorch.metrics import TaskorchCollector

    orchestrator = TaskOrchestrator(worker_count=4)
    REGISTRY.register(TaskorchCollector(orchestrator))

Needs ``prometheus_client`` (``pip install 'taskorch[metrics]'``); ``import taskorch`` never
imports it, nor this module. Creating the collector turns the orchestrator's per-task figures
on (queue wait and run time histograms, labelled by the task's function): create it right
after the orchestrator, so that they cover every task. The counters come from ``stats()`` and
cover the orchestrator's whole life either way.

Threads: ``collect()`` runs in the scraper's thread (``prometheus_client``'s HTTP server, or
``taskorch serve --http``). It copies the figures under the orchestrator's backlog lock, as
``stats()`` does, and builds the exposition after releasing it; the dispatcher never waits on
a scrape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from taskorch._parent.figures import RUN_BUCKETS, WAIT_BUCKETS
from taskorch._parent.observe import Observer, Snapshot

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from taskorch._parent.orchestrator import TaskOrchestrator

__all__ = ["TaskorchCollector"]

#: ``Stats`` fields exposed as counters: (field, metric name without ``_total``, help).
COUNTERS = (
    ("submitted", "tasks_submitted", "Tasks accepted into the backlog."),
    ("succeeded", "tasks_succeeded", "Tasks that succeeded."),
    ("failed", "tasks_failed", "Tasks that failed (after their retries)."),
    ("cancelled", "tasks_cancelled", "Tasks cancelled before they started."),
    ("abandoned", "tasks_abandoned", "Tasks abandoned while running (stop timed out)."),
    ("expired", "tasks_expired", "Tasks not started by their expiry: ended without running."),
    ("rejected", "tasks_rejected", "Tasks refused with QueueFullError (backlog full)."),
    ("dropped", "tasks_dropped", "Tasks dropped with the backlog full (ALLOW_SYNC_TASK_DROP)."),
    ("retried", "task_retries", "Attempts after the first, whatever caused them."),
    ("crashes", "worker_crashes", "Worker deaths while running a task (timeout kills included)."),
    ("timeouts", "task_timeouts", "Attempts that ran past their timeout."),
)
BREAKER_STATES = ("closed", "open", "half_open")


class TaskorchCollector(Collector):
    """A ``prometheus_client`` collector for one orchestrator (register it in a registry).

    ``namespace`` prefixes every metric name (default ``taskorch``); ``labels`` are added to
    every sample (e.g. ``{"pool": "thumbnails"}`` when an application runs several).
    """

    def __init__(self, orchestrator: TaskOrchestrator, *, namespace: str = "taskorch",
                 labels: dict[str, str] | None = None) -> None:
        self._observer = Observer(orchestrator)
        self._prefix = f"{namespace}_" if namespace else ""
        self._label_names = list(labels or {})
        self._label_values = [str(v) for v in (labels or {}).values()]

    def collect(self) -> Iterator[Metric]:
        return iter(metrics_of(self._observer.snapshot(), self._prefix, self._label_names,
                               self._label_values))


def metrics_of(snap: Snapshot, prefix: str = "taskorch_", names: list[str] | None = None,
               values: list[str] | None = None) -> list[Metric]:
    """The metric families of one snapshot."""
    names, values = names or [], values or []
    out: list[Metric] = []
    stats = snap.stats
    for field, name, doc in COUNTERS:
        family = CounterMetricFamily(prefix + name, doc, labels=names)
        family.add_metric(values, getattr(stats, field))
        out.append(family)
    restarts = CounterMetricFamily(prefix + "worker_restarts",
                                   "Workers started to replace one that died, was killed or "
                                   "retired, by reason.", labels=[*names, "reason"])
    for reason, count in sorted(snap.restarts_by_cause.items()):
        restarts.add_metric([*values, reason], count)
    out.append(restarts)
    for name, doc, value in (
        ("tasks_queued", "Tasks accepted and not started.", stats.queued),
        ("tasks_running", "Tasks started and not finished.", stats.running),
        ("tasks_delayed", "Queued tasks waiting for their delay or start time.", stats.delayed),
        ("workers", "Worker processes alive.", stats.workers),
        ("workers_wanted", "Worker processes the pool keeps.", snap.worker_count),
        ("max_backlog", "The backlog's bound.", snap.max_backlog),
    ):
        gauge = GaugeMetricFamily(prefix + name, doc, labels=names)
        gauge.add_metric(values, value)
        out.append(gauge)
    breaker = StateSetMetricFamily(prefix + "breaker_state", "The circuit breaker's state.",
                                   labels=names)
    breaker.add_metric(values, {s: s == stats.breaker_state for s in BREAKER_STATES})
    out.append(breaker)
    last_success = GaugeMetricFamily(
        prefix + "schedule_last_success_timestamp_seconds",
        "When a schedule's run last succeeded (Unix time).", labels=[*names, "schedule"])
    next_run = GaugeMetricFamily(prefix + "schedule_next_run_timestamp_seconds",
                                 "When a schedule fires next (Unix time).",
                                 labels=[*names, "schedule"])
    for schedule in snap.schedules:
        if schedule.last_success is not None:
            last_success.add_metric([*values, schedule.name], schedule.last_success)
        if schedule.next_run is not None:
            next_run.add_metric([*values, schedule.name], schedule.next_run)
    out += [last_success, next_run]
    run = HistogramMetricFamily(prefix + "task_run_seconds",
                                "Worker-side run time of finished tasks (all attempts), by task.",
                                labels=[*names, "task"])
    wait = HistogramMetricFamily(prefix + "task_queue_wait_seconds",
                                 "From acceptance to the first attempt's start, by task.",
                                 labels=[*names, "task"])
    failed = CounterMetricFamily(prefix + "task_failures",
                                 "Tasks that failed (after their retries), by task.",
                                 labels=[*names, "task"])
    for task in snap.tasks:
        run.add_metric([*values, task.name], _buckets(RUN_BUCKETS, task.run_counts),
                       task.run_sum)
        wait.add_metric([*values, task.name], _buckets(WAIT_BUCKETS, task.wait_counts),
                        task.wait_sum)
        failed.add_metric([*values, task.name], task.failed)
    out += [run, wait, failed]
    return out


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
    cumulative, total = [], 0
    for bound, count in zip((*(repr(b) for b in bounds), "+Inf"), counts):
        total += count
        cumulative.append((bound, float(total)))
    return cumulative
