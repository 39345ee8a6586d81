"""``taskorch run --joblog FILE --resume / --resume-failed``, end to end, as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tasks import scaled

R = scaled(60)


def taskorch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskorch", *args], capture_output=True,
                          text=True, timeout=R, cwd=cwd, stdin=subprocess.DEVNULL)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    # fails on input 3 until the file "fixed" exists; records every call in calls/
    (tmp_path / "calls").mkdir()
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import os

        HERE = os.path.dirname(os.path.abspath(__file__))

        def work(x):
            open(os.path.join(HERE, "calls", str(x)), "a").write("x")
            if x == 3 and not os.path.exists(os.path.join(HERE, "fixed")):
                raise ValueError("three fails until fixed")
            return x * 10
    """))
    (tmp_path / "in.jsonl").write_text("[1]\n[2]\n\n[3]\n[4]\n[5]\n")
    return tmp_path


def calls(job: Path) -> dict[int, int]:
    return {int(p.name): len(p.read_text()) for p in (job / "calls").iterdir()}


def run(job: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return taskorch("run", "job.py:work", "-i", "in.jsonl", "-o", "out.jsonl", "--no-progress",
                    "--joblog", "log.jsonl", *options, cwd=job)


def test_joblog_keeps_the_records_with_line_numbers_and_hashes(job: Path) -> None:
    out = run(job)
    assert out.returncode == 1, out.stderr
    output, log = lines_of(job / "out.jsonl"), lines_of(job / "log.jsonl")
    assert len(log) == len(output) == 5
    for rec in log:
        assert set(rec) >= {"index", "ok", "attempts", "line", "input_hash"}
        assert {k: v for k, v in rec.items() if k not in ("line", "input_hash")} in output
    by_line = {rec["line"]: rec for rec in log}
    assert sorted(by_line) == [1, 2, 4, 5, 6]  # line 3 is empty: no input, no record
    assert not by_line[4]["ok"] and by_line[4]["error"]["type"] == "ValueError"
    assert len({rec["input_hash"] for rec in log}) == 5


def test_resume_skips_what_has_a_record_and_resume_failed_reruns_failures(job: Path) -> None:
    assert run(job).returncode == 1
    assert calls(job) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    again = run(job, "--resume")
    assert again.returncode == 0, again.stderr
    assert lines_of(job / "out.jsonl") == []  # everything had a record
    assert "5 inputs skipped (--resume)" in again.stderr
    assert calls(job) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    (job / "fixed").touch()
    rerun = run(job, "--resume-failed")
    assert rerun.returncode == 0, rerun.stderr
    assert [(r["index"], r["ok"], r["result"]) for r in lines_of(job / "out.jsonl")] == [
        (2, True, 30)]  # the failed input alone, under its index of the first run
    assert calls(job) == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    log = lines_of(job / "log.jsonl")
    assert len(log) == 6 and log[-1]["line"] == 4 and log[-1]["ok"]
    assert run(job, "--resume-failed").returncode == 0  # nothing left to do
    assert calls(job) == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}


def test_a_run_that_died_resumes_where_it_stopped(job: Path) -> None:
    (job / "fixed").touch()
    assert run(job).returncode == 0
    log = (job / "log.jsonl").read_text().splitlines(keepends=True)
    # As if the run had died after two records, in the middle of writing the third.
    (job / "log.jsonl").write_text("".join(log[:2]) + log[2][:25])
    for p in (job / "calls").iterdir():
        p.unlink()
    resumed = run(job, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    done_before = {rec["index"] for rec in lines_of(job / "out.jsonl")}
    assert len(done_before) == 3 and not done_before & {json.loads(x)["index"] for x in log[:2]}
    assert sum(calls(job).values()) == 3
    # The joblog now has a record of every input (the torn one stays, ignored).
    again = run(job, "--resume")
    assert again.returncode == 0 and "5 inputs skipped" in again.stderr


def test_a_joblog_of_another_input_is_refused(job: Path) -> None:
    assert run(job).returncode == 1
    (job / "in.jsonl").write_text("[7]\n[8]\n")
    out = run(job, "--resume")
    assert out.returncode == 2
    assert "input line 1 is not the line the joblog" in out.stderr
    assert "another input" in out.stderr
    assert not (job / "calls" / "7").exists()


def test_resume_needs_a_joblog_and_a_joblog_file(job: Path) -> None:
    out = taskorch("run", "job.py:work", "-i", "in.jsonl", "--resume", cwd=job)
    assert out.returncode == 2 and "need --joblog" in out.stderr
    (job / "not-a-log").write_text("hello\n")
    out = taskorch("run", "job.py:work", "-i", "in.jsonl", "--joblog", "not-a-log", "--resume",
                   cwd=job)
    assert out.returncode == 2 and "not a joblog" in out.stderr
    # A missing joblog with --resume: nothing was run yet; everything runs.
    out = taskorch("run", "job.py:work", "-i", "in.jsonl", "--joblog", "new.jsonl", "--resume",
                   cwd=job)
    assert out.returncode == 1 and len(lines_of(job / "new.jsonl")) == 5
    assert os.path.getsize(job / "new.jsonl") > 0
