"""``options(priority=, delay=, at=, expires=)`` with real worker processes: the order with one
worker held busy (its prefetch must not defeat it), delays, expiry before start and across a
crash retry, the exact bound with delayed tasks, and the ValueErrors. Handshakes (``Gate``),
never sleeps, order the events; a delay or an expiry is real time here (the backlog's own
tests move an injected clock: ``test_backlog_time``)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from taskorch import Policy, QueueFullError, TaskExpiredError, TaskOrchestrator
from tests._tasks import Gate, blocker, exit_first_time, identity, log_start, logged, wait_until

Make = Callable[..., TaskOrchestrator]


def busy_worker(o: TaskOrchestrator, tmp_path: Path) -> tuple[Gate, Any]:
    """Warm the one worker (so it prefetches, as under load), then hold it busy."""
    for f in [o.run(identity, i) for i in range(20)]:
        assert f is not None
        f.result(30)
    gate = Gate(tmp_path, "busy")
    held = o.run(blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    return gate, held


def prefetched(o: TaskOrchestrator) -> int:
    return sum(w["prefetched"] for w in o.status_details()["workers"])


def test_priority_order_with_one_worker_held_busy(make_orchestrator: Make,
                                                  tmp_path: Path) -> None:
    o = make_orchestrator(1)
    log = str(tmp_path / "log")
    gate, held = busy_worker(o, tmp_path)
    futures = [o.options(priority=0).run(log_start, log, "p0")]
    # The busy worker takes a call ahead (prefetch): the order must survive it.
    wait_until(lambda: prefetched(o) == 1, what="the call prefetched by the busy worker")
    for label, priority in (("p5a", 5), ("p1", 1), ("p5b", 5), ("p9", 9)):
        futures.append(o.options(priority=priority).run(log_start, log, label))
    wait_until(lambda: prefetched(o) == 0, what="the prefetched call recalled")
    gate.release()
    for f in [held, *futures]:
        f.result(30)
    assert [label for label, _ in logged(log)] == ["p9", "p5a", "p5b", "p1", "p0"]


def test_first_in_first_out_among_equal_priorities(make_orchestrator: Make,
                                                   tmp_path: Path) -> None:
    o = make_orchestrator(1)
    log = str(tmp_path / "log")
    gate, held = busy_worker(o, tmp_path)
    high = o.options(priority=3)
    futures = [high.run(log_start, log, f"t{i}") for i in range(6)]
    futures.append(o.run(log_start, log, "plain"))
    gate.release()
    for f in [held, *futures]:
        f.result(30)
    assert [label for label, _ in logged(log)] == [f"t{i}" for i in range(6)] + ["plain"]


def test_expiry_while_waiting_behind_a_busy_worker(make_orchestrator: Make,
                                                   tmp_path: Path) -> None:
    o = make_orchestrator(1)
    log = str(tmp_path / "log")
    gate, held = busy_worker(o, tmp_path)
    before = o.run(log_start, log, "before")
    doomed = o.options(expires=0.3).run(log_start, log, "doomed")
    after = o.run(log_start, log, "after")
    assert doomed is not None
    with pytest.raises(TaskExpiredError):
        doomed.result(30)  # while the worker is still held: it never got the call
    gate.release()
    for f in (held, before, after):
        assert f is not None
        f.result(30)
    assert [label for label, _ in logged(log)] == ["before", "after"]
    stats = o.stats()
    assert (stats.expired, stats.succeeded, stats.queued) == (1, 23, 0)
    assert stats.submitted == stats.succeeded + stats.expired


def test_a_delayed_task_waits_for_its_time_without_holding_anyone(make_orchestrator: Make,
                                                                  tmp_path: Path) -> None:
    o = make_orchestrator(1)
    log = str(tmp_path / "log")
    submitted = time.time()
    delayed = o.options(delay=datetime.timedelta(seconds=0.4)).run(log_start, log, "delayed")
    at = o.options(at=datetime.datetime.now(datetime.timezone.utc)
                   + datetime.timedelta(seconds=0.2)).run(log_start, log, "at")
    assert o.stats().delayed == 2
    now = o.run(log_start, log, "now")
    for f in (now, delayed, at):
        assert f is not None
        f.result(30)
    starts = dict(logged(log))
    assert [label for label, _ in logged(log)] == ["now", "at", "delayed"]
    assert starts["delayed"] >= submitted + 0.4
    assert starts["delayed"] - (submitted + 0.4) < 0.5  # not held back (a bound, not a timing)
    assert o.stats().delayed == 0


def test_expiry_across_a_crash_retry(make_orchestrator: Make, tmp_path: Path) -> None:
    o = make_orchestrator(1)
    marker = str(tmp_path / "crashed")
    # The crash's retry waits 1 s of backoff, past the expiry: it must not run again.
    retrying = o.options(expires=0.5, policy=Policy(retries=3, backoff_initial=1.0))
    f = retrying.run(exit_first_time, marker, "ran")
    assert f is not None
    with pytest.raises(TaskExpiredError):
        f.result(30)
    assert Path(marker).exists()  # the first attempt ran and crashed
    stats = o.stats()
    assert (stats.crashes, stats.expired, stats.running, stats.succeeded) == (1, 1, 0, 0)
    # Without an expiry, the same crash is retried and succeeds.
    Path(marker).unlink()
    g = o.options(policy=Policy(retries=3, backoff_initial=0.01)).run(exit_first_time, marker,
                                                                       "ran")
    assert g is not None and g.result(30) == "ran"


def test_the_bound_stays_exact_with_delayed_tasks(make_orchestrator: Make) -> None:
    o = make_orchestrator(1, max_backlog=3)
    later = o.options(delay=3600)
    futures = [later.run(identity, i) for i in range(3)]
    with pytest.raises(QueueFullError):
        o.run(identity, 99)
    stats = o.stats()
    assert (stats.queued, stats.delayed, stats.rejected) == (3, 3, 1)
    report = o.stop(timeout=0)
    assert report.cancelled == 3
    assert all(f is not None and f.cancelled() for f in futures)


@pytest.mark.parametrize("options, option", [
    ({"priority": True}, "priority"),
    ({"priority": 1.5}, "priority"),
    ({"delay": -1}, "delay"),
    ({"delay": float("nan")}, "delay"),
    ({"delay": datetime.timedelta(seconds=-2)}, "delay"),
    ({"at": datetime.datetime(2030, 1, 1)}, "at"),
    ({"expires": datetime.datetime(2030, 1, 1)}, "expires"),
    ({"expires": -0.5}, "expires"),
    ({"delay": 1, "at": time.time() + 5}, "delay"),
    ({"delay": 10, "expires": 5}, "expires"),
    ({"at": time.time() + 3600, "expires": 30}, "expires"),
    ({"policy": "fast"}, "policy"),
])
def test_bad_options_raise_value_error_naming_them(make_orchestrator: Make,
                                                   options: dict[str, Any], option: str) -> None:
    o = make_orchestrator(1)
    with pytest.raises(ValueError, match=option):
        o.options(**options).run(identity, 1)
    assert o.stats().submitted == 0


def test_with_policy_is_options_policy(make_orchestrator: Make) -> None:
    o = make_orchestrator(1)
    f = o.with_policy(Policy(retries=1)).run(identity, 5)
    g = o.options(priority=2, expires=60).run(identity, 6)
    assert f is not None and g is not None
    assert (f.result(30), g.result(30)) == (5, 6)
    with pytest.raises(ValueError, match="policy"):
        o.with_policy(None)  # type: ignore[arg-type]
