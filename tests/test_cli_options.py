"""The pool options of ``taskorch run`` and ``serve``: one default policy with the library,
and what the library has (``--retry-on``, ``--kill-grace``, ``--breaker-*``, ``--path``).
End to end, as subprocesses; the parsing itself in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from _tasks import scaled, wait_until
from test_cli import records, release_once_the_signal_is_noticed

from taskorch import BreakerMode, Policy
from taskorch.cli.main import build_parser
from taskorch.cli.options import UsageError, exception_classes

R = scaled(60)


def taskorch(*args: str, cwd: Path, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskorch", *args], input=input,
                          capture_output=True, text=True, timeout=R, cwd=cwd)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "job.py").write_text(textwrap.dedent("""
        import os

        def read(path):
            with open(path) as f:
                return f.read()

        def flaky(counter, fail_times):
            # ConnectionError for the first `fail_times` calls (counted in a file)
            n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
            open(counter, "w").write(str(n))
            if n <= fail_times:
                raise ConnectionError(f"call {n}")
            return n

        def key_error(counter):
            n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
            open(counter, "w").write(str(n))
            raise KeyError(n)

        def fail(x):
            raise ValueError(x)
    """))
    return tmp_path


def test_the_cli_defaults_are_policy_default() -> None:
    for command in ("run", "serve"):
        argv = [command, "x:y"] if command == "run" else [command, "--socket", "s"]
        args = build_parser().parse_args(argv)
        d = Policy.default()
        assert (args.retries, args.timeout, args.backoff_initial, args.backoff_max) == (
            d.retries, d.timeout, d.backoff_initial, d.backoff_max)
        assert args.retry_on is None and args.retry_unless is None  # Policy.default()'s
        assert args.kill_grace == 1.0 and args.breaker_failures is None


def test_default_policy_on_the_command_line_fails_not_found_at_once_and_retries_transient(
    job: Path,
) -> None:
    out = taskorch("run", "job.py:read", "--backoff-initial", "0", "--backoff-max", "0",
                   input=json.dumps([str(job / "missing")]) + "\n"
                   + json.dumps([str(job / "counter"), 2]) + "\n", cwd=job)
    # (the second line calls read() with two arguments: a TypeError, not retried either)
    recs = records(out.stdout)
    assert recs[0]["error"]["type"] == "FileNotFoundError" and recs[0]["attempts"] == 1
    assert recs[1]["error"]["type"] == "TypeError" and recs[1]["attempts"] == 1
    out = taskorch("run", "job.py:flaky", "--backoff-initial", "0", "--backoff-max", "0",
                   input=json.dumps([str(job / "counter"), 2]) + "\n", cwd=job)
    assert out.returncode == 0, out.stderr
    assert records(out.stdout)[0] | {"seconds": 0} == {
        "index": 0, "ok": True, "result": 3, "attempts": 3, "seconds": 0}


def test_retry_on_and_retry_unless(job: Path) -> None:
    fast = ("--backoff-initial", "0", "--backoff-max", "0", "--retries", "2")
    out = taskorch("run", "job.py:key_error", *fast, "--retry-on", "LookupError",
                   input=json.dumps([str(job / "c1")]) + "\n", cwd=job)
    assert records(out.stdout)[0]["attempts"] == 3
    out = taskorch("run", "job.py:key_error", *fast, "--retry-on", "Exception",
                   "--retry-unless", "KeyError", input=json.dumps([str(job / "c2")]) + "\n",
                   cwd=job)
    assert records(out.stdout)[0]["attempts"] == 1
    out = taskorch("run", "job.py:read", "--retry-on", "NoSuchError", input="[]\n", cwd=job)
    assert out.returncode == 2 and "--retry-on: no exception class 'NoSuchError'" in out.stderr
    out = taskorch("run", "job.py:read", "--retry-unless", "json.dumps", input="[]\n", cwd=job)
    assert out.returncode == 2 and "is not an exception class" in out.stderr


def test_exception_classes_by_name() -> None:
    assert exception_classes("--retry-on", "OSError, ValueError") == (OSError, ValueError)
    assert exception_classes("--retry-on", "json.JSONDecodeError") == (json.JSONDecodeError,)
    assert exception_classes("--retry-on", "json:JSONDecodeError") == (json.JSONDecodeError,)
    assert exception_classes("--retry-unless", "none") == ()
    with pytest.raises(UsageError):
        exception_classes("--retry-on", "len")


def test_timeout_none_and_kill_grace_and_breaker_reach_the_orchestrator(monkeypatch) -> None:
    import taskorch
    from taskorch.cli.options import orchestrator_from_args

    given: dict = {}
    monkeypatch.setattr(taskorch, "TaskOrchestrator", lambda **kwargs: given.update(kwargs)
                        or SimpleNamespace(start=lambda: None))  # (the CLI starts it at once)
    args = build_parser().parse_args([
        "run", "x:y", "--workers", "1", "--timeout", "none", "--kill-grace", "0.25",
        "--breaker-failures", "3", "--breaker-duration", "5", "--breaker-mode", "hold",
        "--retry-on", "OSError,KeyError", "--retry-unless", "none"])
    orchestrator_from_args(args)
    assert given["policy"].timeout is None
    assert given["policy"].retry_on == (OSError, KeyError) and given["policy"].retry_unless == ()
    assert given["kill_grace"] == 0.25
    breaker = given["circuit_breaker"]
    assert (breaker.failure_threshold, breaker.break_duration, breaker.mode) == (
        3, 5.0, BreakerMode.HOLD)
    given.clear()
    orchestrator_from_args(build_parser().parse_args(["run", "x:y"]))
    assert given["policy"] == Policy.default() and given["circuit_breaker"] is None
    args = build_parser().parse_args(["run", "x:y", "--breaker-ratio", "1.5"])
    with pytest.raises(UsageError, match="failure_ratio"):
        orchestrator_from_args(args)


def test_an_open_breaker_fails_tasks_without_running_them(job: Path) -> None:
    out = taskorch("run", "job.py:fail", "--workers", "1", "--breaker-failures", "1",
                   "--breaker-duration", "600", input="".join(f"[{i}]\n" for i in range(40)),
                   cwd=job)
    types = {r["error"]["type"] for r in records(out.stdout)}
    assert out.returncode == 1 and "CircuitOpenError" in types and "ValueError" in types


def test_path_puts_a_directory_on_the_import_path_of_the_cli_and_its_workers(
    tmp_path: Path,
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    # A module target is imported by name, and its functions travel by reference: the
    # workers import `mytasks` (and `helper`) themselves, which only --path makes possible.
    (lib / "mytasks.py").write_text(
        "import os, helper\n\ndef work(x):\n    return [helper.double(x), os.getpid()]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = taskorch("run", "mytasks:work", "--path", str(lib), input="[21]\n", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    result, pid = records(out.stdout)[0]["result"]
    assert result == 42
    out = taskorch("run", "mytasks:work", input="[21]\n", cwd=elsewhere)
    assert out.returncode == 2 and "cannot import module 'mytasks'" in out.stderr
    out = taskorch("run", "mytasks:work", "--path", str(tmp_path / "nope"), input="[1]\n",
                   cwd=elsewhere)
    assert out.returncode == 2 and "not a directory" in out.stderr


def test_drop_help_says_what_happens_without_it() -> None:
    out = subprocess.run([sys.executable, "-m", "taskorch", "serve", "--help"],
                         capture_output=True, text=True, timeout=R)
    text = " ".join(out.stdout.split())
    assert "without it, taskorch run waits for room and a client's run() raises QueueFullError" \
        in text


def test_a_sigterm_echoed_by_timeout_is_one_signal_for_run(tmp_path: Path) -> None:
    # timeout(1) sends SIGTERM to the command, then to its whole process group: the run must
    # drain (a first signal), not abandon its running task (a second one).
    (tmp_path / "gate.py").write_text(textwrap.dedent("""
        import os

        def wait_for_release(directory):
            open(os.path.join(directory, "started"), "w").close()
            with open(os.path.join(directory, "release")) as f:
                return f.read()
    """))
    os.mkfifo(tmp_path / "release")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskorch", "run", "gate.py:wait_for_release", "--workers", "1",
         "--output", "out.jsonl"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, start_new_session=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([str(tmp_path)]) + "\n")
        proc.stdin.flush()
        wait_until(lambda: (tmp_path / "started").exists(), what="the task started")
        os.kill(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    err = release_once_the_signal_is_noticed(proc, [tmp_path / "release"])
    assert proc.returncode == 143 and "again" not in err, err
    assert records((tmp_path / "out.jsonl").read_text())[0]["result"] == "released"
