"""The benchmark still runs (its quick mode): a smoke test, never a speed test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tasks import scaled

BENCH = Path(__file__).parent.parent / "scripts" / "bench.py"


# The quick mode runs every pool and section in fresh interpreters: minutes on a busy machine;
# the subprocess's own timeout is the deadlock guard.
@pytest.mark.slow
@pytest.mark.timeout(scaled(660))
def test_bench_quick_runs_every_pool_and_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Each pool's child runs every section under one deadline (45 s in quick mode): on a busy
    # machine that is not enough, and a child killed mid-run leaves its later sections out.
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out),
                           "--child-timeout", str(scaled(150))],
                          capture_output=True, text=True, timeout=scaled(600))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| A no-op throughput" in proc.stdout and "Ratios" in proc.stdout
    data = json.loads(out.read_text())
    taskorch = data["pools"]["taskorch"]["sections"]
    assert set(data["pools"]) == {"taskorch", "cf", "loky", "mp", "pebble", "taskorch-dask", "dask",
                                  "taskorch-remote", "taskorch-remote-nj"}
    for section in "ABCDEFGHI":
        assert section in taskorch and "error" not in taskorch[section], (
            section, taskorch.get(section), data["pools"]["taskorch"].get("killed"))
    assert taskorch["F"]["ok"] == 199 and taskorch["F"]["usable"]
    # M (taskorch only): metrics off and on, in the same run; a ratio, never asserted.
    assert "error" not in taskorch["M"] and taskorch["M"]["on_vs_off"] > 0, taskorch["M"]
    assert "M" not in data["pools"]["loky"]["sections"]
    # P (taskorch only): no-op tasks past delayed ones; a ratio, never asserted.
    assert "error" not in taskorch["P"] and taskorch["P"]["with_vs_without"] > 0, taskorch["P"]
    # R (taskorch only): paging 10,000 retained task records; a figure, never asserted.
    assert "error" not in taskorch["R"] and taskorch["R"]["failed_ms"] > 0, taskorch["R"]
    # D runs in interpreters of its own (one per pool in quick mode), the import timed apart.
    for pool in ("taskorch", "loky"):
        cold = data["pools"][pool]["sections"]["D"]
        assert len(cold["cold_each"]) == 1 and cold["cold_ms"] > 0 and cold["import_ms"] > 0, cold
    for pool in ("taskorch-dask", "dask"):
        sections = data["pools"][pool]["sections"]
        assert set(sections) == {"A", "B"} and not any(
            "error" in r for r in sections.values()), sections
    for pool in ("taskorch-remote", "taskorch-remote-nj"):  # remote run(), journal on and off
        sections = data["pools"][pool]["sections"]
        assert set(sections) == {"A"} and "error" not in sections["A"], sections
    assert "remote run() through connect()" in proc.stdout


@pytest.mark.timeout(360)
def test_bench_cost_quick_prints_the_per_task_cost(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--cost", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| local: the TaskOrchestrator's process |" in proc.stdout
    cost = json.loads(out.read_text())["cost"]
    for kind in ("local", "remote", "remote-nj", "floor"):
        assert "error" not in cost[kind] and cost[kind]["own_us"] > 0, cost[kind]
    assert "| floor: the bare mechanism" in proc.stdout
    assert cost["remote"]["server_us"] > 0


def test_bench_defaults_quick_prints_remote_and_local_at_serves_defaults() -> None:
    from taskorch.cli.serve import SERVICE_BACKLOG

    proc = subprocess.run([sys.executable, str(BENCH), "--defaults", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {SERVICE_BACKLOG:,}")
            or line.startswith("| 128 ")]
    assert len(rows) == 2 and "error" not in proc.stdout, proc.stdout
    assert all(row.rstrip(" |").endswith("x") for row in rows), rows  # both ran: a ratio each
