"""The command line, end to end, as subprocesses with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _tasks import scaled, wait_until

R = scaled(60)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def taskorch(
    *args: str, input: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskorch", *args], input=input,
                          capture_output=True, text=True, timeout=R, cwd=cwd, env=ENV)


def records(stdout: str) -> list[dict]:
    return sorted((json.loads(line) for line in stdout.splitlines() if line.strip()),
                  key=lambda r: r["index"])


def test_help_and_version() -> None:
    out = taskorch("--help")
    assert out.returncode == 0
    for command in ("run", "serve", "status", "demo"):
        assert command in out.stdout
    assert taskorch("run", "--help").returncode == 0
    assert taskorch("--version").stdout.startswith("taskorch ")


def test_run_over_a_jsonl_file_and_stdin(jobfile: Path, tmp_path: Path) -> None:
    lines = ['[1]', '[2, 10]', '{"x": 4, "factor": 2}',
             '{"args": [5], "kwargs": {"factor": 3}}', '']
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines))
    out_file = tmp_path / "out.jsonl"
    by_file = taskorch("run", f"{jobfile}:scale", "--input", str(source), "--output", str(out_file),
                       "--workers", "2", "--no-progress")
    assert by_file.returncode == 0, by_file.stderr
    by_stdin = taskorch("run", f"{jobfile}:scale", input="\n".join(lines), cwd=tmp_path)
    assert by_stdin.returncode == 0, by_stdin.stderr
    for recs in (records(out_file.read_text()), records(by_stdin.stdout)):
        assert [r["result"] for r in recs] == [1, 20, 8, 15]
        assert all(r["ok"] and r["attempts"] == 1 and r["seconds"] >= 0 for r in recs)
    assert "4 inputs: 4 ok, 0 failed" in by_stdin.stderr


def test_module_target_from_the_current_directory(jobfile: Path) -> None:
    out = taskorch("run", "jobs:scale", input="[6]\n", cwd=jobfile.parent)
    assert out.returncode == 0, out.stderr
    assert records(out.stdout)[0]["result"] == 6


def test_a_failing_item_gives_exit_1_and_its_error_record(jobfile: Path) -> None:
    out = taskorch("run", f"{jobfile}:scale", "--retries", "1", "--backoff-initial", "0",
                   "--retry-on", "ValueError", input="[2]\n[3]\n[4]\n")
    assert out.returncode == 1
    recs = records(out.stdout)
    assert [r["ok"] for r in recs] == [True, False, True]
    assert recs[1]["error"] == {"type": "ValueError", "message": "three is not allowed"}
    assert recs[1]["attempts"] == 2
    assert "1 failed" in out.stderr and "1 retries" in out.stderr


def test_a_result_that_is_not_json_is_written_as_repr(jobfile: Path) -> None:
    out = taskorch("run", f"{jobfile}:a_set", input="[7]\n")
    assert out.returncode == 0
    rec = records(out.stdout)[0]
    assert rec["result"] == "{7}" and rec["result_is_repr"] is True


@pytest.mark.parametrize("target, message", [
    ("nosuchmodule:fn", "cannot import module 'nosuchmodule'"),
    ("no_colon", "TARGET must be"),
    ("/nonexistent/file.py:fn", "does not exist"),
])
def test_bad_target_is_a_usage_error(target: str, message: str) -> None:
    out = taskorch("run", target, input="[1]\n")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bad_json_line_is_a_usage_error_with_its_line_number(jobfile: Path) -> None:
    out = taskorch("run", f"{jobfile}:scale", input='[1]\n\n[2\n[4]\n')
    assert out.returncode == 2
    assert "input line 3" in out.stderr
    recs = records(out.stdout)
    assert recs[0]["result"] == 1  # what was accepted before the bad line still ran


def start_gated_run(jobfile: Path, tmp_path: Path, n: int, *options: str,
                    **popen: Any) -> tuple[subprocess.Popen[str], Path]:
    """``taskorch run jobfile:gated`` over ``n`` inputs on 2 workers, its records in
    ``out.jsonl``; returns once inputs 0 and 1 have started, each blocked on its FIFO in the
    returned directory (``{i}.fifo``; ``{i}.started`` holds its worker's pid)."""
    gate_dir = tmp_path / "gates"
    gate_dir.mkdir()
    for i in range(2):
        os.mkfifo(gate_dir / f"{i}.fifo")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps([i, str(gate_dir)]) + "\n" for i in range(n)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskorch", "run", f"{jobfile}:gated", "--input", str(source),
         "--output", str(tmp_path / "out.jsonl"), "--workers", "2", *options],
        stderr=subprocess.PIPE, text=True, env=ENV, **popen,
    )
    try:
        for i in range(2):
            wait_until(lambda i=i: (gate_dir / f"{i}.started").exists(), what=f"input {i} started")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, gate_dir


def release_once_the_signal_is_noticed(proc: subprocess.Popen[str], fifos: list[Path]) -> str:
    """A signalled ``taskorch run``: wait until it says it reads no more input, release the
    tasks blocked on ``fifos``, and return its stderr once it exited (killed if anything here
    fails)."""
    try:
        assert proc.stderr is not None
        stderr = proc.stderr
        wait_until(lambda: "no more input is read" in stderr.readline(), what="the signal noticed")
        for fifo in fifos:
            with open(fifo, "w") as f:
                f.write("released")
        _, err = proc.communicate(timeout=R)
        return str(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_reading_drains_and_writes_a_record_for_every_input(
    jobfile: Path, tmp_path: Path
) -> None:
    proc, gate_dir = start_gated_run(jobfile, tmp_path, 1000, "--backlog", "4")
    proc.send_signal(signal.SIGTERM)
    err = release_once_the_signal_is_noticed(proc, [gate_dir / f"{i}.fifo" for i in range(2)])
    assert proc.returncode == 143, err
    recs = records((tmp_path / "out.jsonl").read_text())
    assert 2 <= len(recs) < 1000  # it stopped reading
    assert [r["index"] for r in recs] == list(range(len(recs)))  # every input read has a record
    assert all(r["ok"] for r in recs)  # the accepted ones were drained, not cancelled
    assert recs[0]["result"] == "released"


def test_a_second_signal_abandons_running_tasks_and_still_records_them(
    jobfile: Path, tmp_path: Path
) -> None:
    proc, _ = start_gated_run(jobfile, tmp_path, 1000, "--backlog", "4")
    try:
        assert proc.stderr is not None
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: "no more input is read" in proc.stderr.readline(), what="first signal")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=R)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    recs = records((tmp_path / "out.jsonl").read_text())
    assert [r["index"] for r in recs] == list(range(len(recs)))
    types = {r["index"]: r["error"]["type"] for r in recs if not r["ok"]}
    assert types[0] == types[1] == "TaskAbandonedError"
    assert set(types.values()) <= {"TaskAbandonedError", "Cancelled"}


def test_drop_writes_dropped_records(jobfile: Path, tmp_path: Path) -> None:
    out = taskorch("run", f"{jobfile}:scale", "--drop", "--backlog", "1", "--workers", "1",
                   input="".join(f"[{i}]\n" for i in range(300)))
    recs = records(out.stdout)
    assert [r["index"] for r in recs] == list(range(300))
    kinds = {r["error"]["type"] for r in recs if not r["ok"]}
    assert kinds <= {"Dropped", "ValueError"}


def test_the_demo_runs(tmp_path: Path) -> None:
    out = taskorch("demo", "--scale", "0.05", "--no-progress", "--keep", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "12 jobs succeeded, 0 failed" in out.stdout
    assert "speed-up" in out.stdout


def test_chunksize_sends_inputs_in_bulk_with_per_input_records(jobfile: Path) -> None:
    lines = "".join(f"[{i}]\n" for i in range(1000)) + '{"x": 5, "factor": 10}\n'
    out = taskorch("run", f"{jobfile}:scale", "--chunksize", "64", input=lines)
    assert out.returncode == 1  # input 3 fails, alone
    recs = records(out.stdout)
    assert [r["index"] for r in recs] == list(range(1001))
    assert recs[3]["error"]["type"] == "ValueError" and not recs[3]["ok"]
    assert all(r["ok"] and r["result"] == r["index"] for r in recs[:1000] if r["index"] != 3)
    assert recs[1000]["result"] == 50
    assert "1001 inputs: 1000 ok, 1 failed" in out.stderr


def test_output_reader_going_away_ends_the_run_instead_of_hanging(
    jobfile: Path, tmp_path: Path
) -> None:
    # `taskorch run ... | head -1`: the records have nowhere to go.
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"[{i}]\n" for i in range(20000)))
    proc = subprocess.Popen([sys.executable, "-m", "taskorch", "run", f"{jobfile}:scale", "--input",
                             str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=R) == 3  # its own code: not "some tasks failed" (1)
    assert "writing the output failed" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["stdout", "--output"])
def test_a_full_disk_exits_3(jobfile: Path, tmp_path: Path, where: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f"[{i}]\n" for i in range(10)))
    command = [sys.executable, "-m", "taskorch", "run", f"{jobfile}:scale", "--input", str(source)]
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        out = subprocess.run(command + (["--output", "/dev/full"] if where == "--output" else []),
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=R, env=ENV)
    assert out.returncode == 3, out.stderr
    assert "writing the output failed" in out.stderr and "No space left" in out.stderr
    assert "Traceback" not in out.stderr


def _run_bytes(
    jobfile: Path, data: bytes, tmp_path: Path, by_file: bool
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "taskorch", "run", f"{jobfile}:scale"]
    if by_file:
        source = tmp_path / "in.bin"
        source.write_bytes(data)
        return subprocess.run(command + ["--input", str(source)], capture_output=True,
                              timeout=R, env=ENV)
    return subprocess.run(command, input=data, capture_output=True, timeout=R, env=ENV)


def test_invalid_utf8_costs_its_line_alone_from_stdin_and_from_input(
    jobfile: Path, tmp_path: Path
) -> None:
    data = b"[0]\n[1]\n[2]\n[4]\n[5]\n[\"caf\xe9\"]\n[6]\n[7]\n"  # line 6 is Latin-1, not UTF-8
    outs = [_run_bytes(jobfile, data, tmp_path, by_file) for by_file in (True, False)]
    for out in outs:
        assert out.returncode == 1, out.stderr  # one input failed
        recs = records(out.stdout.decode())
        assert [r["index"] for r in recs] == list(range(8))
        assert [r.get("result") for r in recs] == [0, 1, 2, 4, 5, None, 6, 7]
        assert recs[5]["error"]["type"] == "UnicodeDecodeError"
        assert "input line 6: not valid UTF-8 (byte 0xe9 at column 6" in recs[5]["error"]["message"]
    by_file, by_stdin = ([{k: v for k, v in r.items() if k != "seconds"}
                          for r in records(out.stdout.decode())]
                         for out in outs)
    assert by_file == by_stdin


def test_cr_crlf_and_lf_line_endings_read_the_same_from_stdin_and_from_input(
    jobfile: Path, tmp_path: Path
) -> None:
    data = b"[1]\r[2]\r\n[4]\n\r\n[5]"  # a blank line (skipped), and no ending on the last
    for by_file in (True, False):
        out = _run_bytes(jobfile, data, tmp_path, by_file)
        assert out.returncode == 0, out.stderr
        assert [r["result"] for r in records(out.stdout.decode())] == [1, 2, 4, 5]


class _Chunks:
    """A stream whose reads return the given pieces, as a pipe would."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read1(self, size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_line_ends_split_across_reads() -> None:
    from taskorch.cli.lines import numbered_lines

    lines = list(numbered_lines(_Chunks(b"[1]\r", b"\n[2]\r", b"[3", b"]\n\n[4]\r")))  # type: ignore[arg-type]
    assert lines == [(1, b"[1]"), (2, b"[2]"), (3, b"[3]"), (4, b""), (5, b"[4]")]


def test_a_module_beside_the_user_reaches_the_dask_workers(tmp_path: Path) -> None:
    # `taskorch run mymodule:work --dask`: mymodule.py is only in the working directory, which
    # the cluster's workers (started here, elsewhere) cannot import from: it travels by value.
    # An installed module (json) still travels by reference.
    distributed = pytest.importorskip("distributed")
    (tmp_path / "mymodule.py").write_text(
        "import os\ndef work(x):\n    return [x * 2, os.getpid()]\n")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster, set_as_default=False) as client:
            worker_pids = set(client.run(os.getpid).values())
            proc = taskorch("run", "mymodule:work", "--dask", cluster.scheduler_address,
                            input="".join(f"[{i}]\n" for i in range(5)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [r["result"] for r in records(proc.stdout)]
    assert [r[0] for r in results] == [0, 2, 4, 6, 8]
    assert {r[1] for r in results} <= worker_pids  # ran on the cluster
    chosen = subprocess.run(
        [sys.executable, "-c", "import cloudpickle\n"
         "from taskorch.cli.run import resolve_target\n"
         "resolve_target('mymodule:work'), resolve_target('json:dumps')\n"
         "print(sorted(cloudpickle.list_registry_pickle_by_value()))"],
        capture_output=True, text=True, timeout=R, cwd=tmp_path, env=ENV)
    assert chosen.stdout.split() == ["['mymodule']"], chosen.stderr


def test_a_module_found_through_path_travels_by_value(tmp_path: Path) -> None:
    # `--path DIR`: a module found only there is not installed either (a Dask worker or a
    # `taskorch serve` elsewhere could not import it): by value, as one beside the user.
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "pathjob.py").write_text("def work(x):\n    return x + 1\n")
    chosen = subprocess.run(
        [sys.executable, "-c", "import sys, cloudpickle\n"
         f"sys.path.insert(0, {str(jobs)!r})\n"
         "from taskorch.cli.run import resolve_target\n"
         f"resolve_target('pathjob:work', [{str(jobs)!r}])\n"
         "print(sorted(cloudpickle.list_registry_pickle_by_value()))"],
        capture_output=True, text=True, timeout=R, cwd=tmp_path, env=ENV)
    assert chosen.stdout.split() == ["['pathjob']"], chosen.stderr
    proc = taskorch("run", "pathjob:work", "--path", str(jobs), input="[1]\n[2]\n",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["result"] for r in records(proc.stdout)] == [2, 3]


def test_a_pickling_error_about_main_in_a_task_says_why(tmp_path: Path) -> None:
    # What a task that starts a stdlib spawn pool on a __main__ function meets: pickle
    # looks the function up in the worker's __main__, which is taskorch's worker.
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import pickle

        def helper(x):
            return x

        helper.__module__ = "__main__"

        def work(x):
            return len(pickle.dumps(helper))
    """))
    out = subprocess.run([sys.executable, "-m", "taskorch", "run", "job.py:work",
                          "--no-progress"], input="[1]\n", capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    record = json.loads(out.stdout)
    assert record["error"]["type"].endswith("PicklingError")
    assert "__main__ is the worker, not your script" in record["error"]["message"]
    assert "import them from there" in record["error"]["message"]


def test_papercuts_of_the_command_line(tmp_path: Path) -> None:
    def taskorch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskorch", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)

    # an unknown flag after a subcommand: that subcommand's usage
    out = taskorch("run", "x:y", "--bogus")
    assert out.returncode == 2 and out.stderr.startswith("usage: taskorch run ")
    assert "unrecognized arguments: --bogus" in out.stderr
    # a word where a number goes: the option, what it expects, what it got
    out = taskorch("run", "x:y", "--workers", "two")
    assert "--workers: expected a positive integer, got 'two'" in out.stderr
    assert "positive_int" not in out.stderr
    # one input, singular
    (tmp_path / "job.py").write_text("def work(x):\n    return x\n")
    (tmp_path / "in.jsonl").write_text("[1]\n")
    out = taskorch("run", "job.py:work", "-i", "in.jsonl", "--no-progress")
    assert "taskorch run: 1 input: 1 ok" in out.stderr, out.stderr


def test_run_on_a_terminal_says_it_reads_stdin(tmp_path: Path) -> None:
    import pty

    (tmp_path / "job.py").write_text("def work(x):\n    return x\n")
    primary, secondary = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "taskorch", "run", "job.py:work",
                           "--no-progress"], stdin=secondary, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path) as proc:
        os.close(secondary)
        os.write(primary, b"[5]\n\x04")  # a line, then Ctrl-D
        out, err = proc.communicate(timeout=60)
    os.close(primary)
    assert proc.returncode == 0, err
    assert "reading the inputs from the terminal" in err and "Ctrl-D" in err
    assert json.loads(out)["result"] == 5
