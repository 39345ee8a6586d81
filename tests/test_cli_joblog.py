"""``taskorch run --joblog FILE --resume / --resume-failed``, end to end, as subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _tasks import scaled

R = scaled(60)


def taskorch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskorch", *args], capture_output=True,
                          text=True, timeout=R, cwd=cwd, stdin=subprocess.DEVNULL)


HEADER = "Seq Host Starttime JobRuntime Send Receive Exitval Signal Command".split()


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def joblog_of(path: Path) -> list[dict[str, str]]:
    """The joblog's rows, by the names of its header line (parallel's, then ours)."""
    header, *rows = path.read_text().splitlines()
    names = header.split("\t")
    assert names[:9] == HEADER
    return [dict(zip(names, row.split("\t"), strict=True)) for row in rows]


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


def test_joblog_is_gnu_parallels_format_with_pid_hash_and_traceback(job: Path) -> None:
    before = time.time()
    out = run(job, "--workers", "1")
    assert out.returncode == 1, out.stderr
    output, log = lines_of(job / "out.jsonl"), joblog_of(job / "log.jsonl")
    assert len(log) == len(output) == 5
    by_seq = {int(row["Seq"]): row for row in log}
    assert sorted(by_seq) == [1, 2, 4, 5, 6]  # line 3 is empty: no input, no record
    assert {row["Host"] for row in log} == {socket.gethostname()}
    assert len({row["PID"] for row in log}) == 1 and int(log[0]["PID"]) != os.getpid()
    for row in log:
        assert before - 1 <= float(row["Starttime"]) <= time.time()
        assert float(row["JobRuntime"]) >= 0 and row["Signal"] == "0"
        assert int(row["Send"]) == 3 and int(row["Receive"]) > 0
    assert [by_seq[n]["Command"] for n in (1, 2, 4)] == ["[1]", "[2]", "[3]"]
    assert [by_seq[n]["Exitval"] for n in (1, 2, 4, 5, 6)] == ["0", "0", "1", "0", "0"]
    failed = by_seq[4]
    assert failed["Error"] == "ValueError: three fails until fixed"
    assert "Traceback" in failed["Traceback"] and "\\n" in failed["Traceback"]
    assert 'line 9, in work\\nValueError: three fails until fixed' in failed["Traceback"]
    assert by_seq[1]["Error"] == by_seq[1]["Traceback"] == ""
    assert len({row["InputHash"] for row in log}) == 5
    # Ours after parallel's; no result (it is in the output).
    assert list(log[0])[9:] == ["PID", "InputHash", "Error", "Traceback"]


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
    log = joblog_of(job / "log.jsonl")
    assert len(log) == 6 and log[-1]["Seq"] == "4" and log[-1]["Exitval"] == "0"
    assert run(job, "--resume-failed").returncode == 0  # nothing left to do
    assert calls(job) == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}


def test_a_run_that_died_resumes_where_it_stopped(job: Path) -> None:
    (job / "fixed").touch()
    assert run(job).returncode == 0
    log = (job / "log.jsonl").read_text().splitlines(keepends=True)
    # As if the run had died after two records, in the middle of writing the third.
    (job / "log.jsonl").write_text("".join(log[:3]) + log[3][:25])
    for p in (job / "calls").iterdir():
        p.unlink()
    # The two records kept are the first two tasks to end (with 2 workers, not always 0 and 1).
    lines = [n for n, text in enumerate((job / "in.jsonl").read_text().splitlines(), 1) if text]
    kept = {lines.index(int(record.split("\t")[0])) for record in log[1:3]}  # (Seq: its line)
    resumed = run(job, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    done_before = {rec["index"] for rec in lines_of(job / "out.jsonl")}
    assert len(kept) == 2 and done_before == {0, 1, 2, 3, 4} - kept
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
    assert out.returncode == 1 and len(joblog_of(job / "new.jsonl")) == 5
    assert os.path.getsize(job / "new.jsonl") > 0


# Written by taskorch 4b07cf1 (the JSON-lines joblog before the TSV format) from the fixture's
# in.jsonl: line 4 ([3]) failed.
OLD_JOBLOG = """\
{"index": 0, "ok": true, "result": 10, "attempts": 1, "seconds": 0.000782, "line": 1, "input_hash": "1045d1c18cd6ea273caa"}
{"index": 1, "ok": true, "result": 20, "attempts": 1, "seconds": 0.000444, "line": 2, "input_hash": "22d24ecb88fac1624798"}
{"index": 2, "ok": false, "error": {"type": "ValueError", "message": "three fails until fixed"}, "attempts": 1, "line": 4, "input_hash": "89f042c2a573ca21ecbc"}
{"index": 3, "ok": true, "result": 40, "attempts": 1, "seconds": 0.002248, "line": 5, "input_hash": "d8b8fa448fed2ed1a9ce"}
"""  # noqa: E501  (the run died before input 5's record)


def test_resume_reads_a_joblog_of_the_json_lines_format(job: Path) -> None:
    (job / "log.jsonl").write_text(OLD_JOBLOG)
    resumed = run(job, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert calls(job) == {5: 1}  # the one input without a record
    assert "4 inputs skipped" in resumed.stderr
    text = (job / "log.jsonl").read_text()
    assert text.startswith(OLD_JOBLOG + "\t".join(HEADER))  # appended: header, then rows
    (job / "fixed").touch()
    rerun = run(job, "--resume-failed")
    assert rerun.returncode == 0, rerun.stderr
    assert calls(job) == {3: 1, 5: 1}  # the failure the old joblog recorded, alone
    assert [r["result"] for r in lines_of(job / "out.jsonl")] == [30]
    assert "\t".join(HEADER) in (job / "log.jsonl").read_text().split("\n", 5)[4]
    assert run(job, "--resume-failed").returncode == 0
    assert calls(job) == {3: 1, 5: 1}


def test_a_joblog_of_another_input_is_refused_in_the_json_lines_format(job: Path) -> None:
    (job / "log.jsonl").write_text(OLD_JOBLOG)
    (job / "in.jsonl").write_text("[7]\n[8]\n")
    out = run(job, "--resume")
    assert out.returncode == 2 and "input line 1 is not the line the joblog" in out.stderr
    assert not (job / "calls" / "7").exists()
