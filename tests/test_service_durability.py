"""The journal's promise under hostile input, a full disk, a deleted lock file and damage
(issue 22): real servers, real clients, real kills, a real full file system (a small tmpfs,
when run as root). Ordering comes from the journal's answers, ``/readyz`` and gate files;
never from sleeps."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import _tasks as t
import pytest
import test_service
from _tasks import wait_until
from test_http import get, http_url
from test_service import R, _env, _taskorch
from test_service_journal import journal_counts, kill

from taskorch import JournalError, SerializationError
from taskorch._service.protocol import submit_frame
from taskorch._service.server.journal import Journal

short_dir = test_service.short_dir
start_server = test_service.start_server


def test_a_batch_that_raises_refuses_its_submissions_and_the_writer_goes_on(tmp_path) -> None:
    """An exception other than sqlite3.Error inside a batch (here an integer SQLite cannot
    store, from a caller that skipped the decoding's checks) fails that batch: every
    submission in it is answered with JournalError; the next batch commits."""
    journal = Journal(str(tmp_path / "j.sqlite3"))
    answers: dict[int, Any] = {}
    answered = threading.Event()

    def on_commit(sub: int, task_id: int, existing: Any, error: Any, _after: Any) -> None:
        answers[sub] = error if error is not None else task_id
        if len(answers) == 3:
            answered.set()

    for sub in (1, 2**63, 3):  # queued before start(): one batch
        journal.submit(b"client", sub, b"call", None, lambda *a, sub=sub: on_commit(sub, *a))
    journal.start()
    try:
        assert answered.wait(R), answers
        assert all(isinstance(answers[s], JournalError) for s in (1, 2**63, 3)), answers
        done = threading.Event()
        journal.submit(b"client", 4, b"call", None, lambda task_id, e, error, _after: (
            answers.__setitem__(4, error or task_id), done.set()))
        assert done.wait(R) and isinstance(answers[4], int), answers
    finally:
        journal.close()
    assert journal.unwritable() is None


def test_an_oversized_integer_refuses_that_request_alone(start_server, short_dir) -> None:
    """``client.result(2**63)`` while another client streams tasks: that request is refused
    (ValueError), the connection and every other client's task go on."""
    server = start_server("--journal", str(short_dir / "j.sqlite3"), "--backlog", "5000")
    with server.connect() as honest, server.connect() as hostile:
        futures = [honest.run(t.square, i) for i in range(1500)]
        for _ in range(20):
            with pytest.raises(ValueError, match="refused this request"):
                hostile.result(2**63, timeout=R)
        futures += [honest.run(t.square, i) for i in range(1500, 2000)]
        assert [f.result(R) for f in futures] == [i * i for i in range(2000)]
        assert hostile.run(t.square, 3).result(R) == 9  # its connection still serves it


def test_deleting_the_lock_file_does_not_let_a_second_server_in(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    with a.connect() as client:
        assert client.run(t.square, 3).result(R) == 9
    os.unlink(str(journal) + ".lock")
    second = subprocess.run(
        _taskorch("serve", "--socket", str(short_dir / "other.sock"), "--journal", str(journal)),
        capture_output=True, text=True, timeout=R, env=_env())
    assert second.returncode == 2, second.stderr
    assert "in use by another taskorch serve" in second.stderr
    with a.connect() as client:
        assert client.run(t.square, 4).result(R) == 16


def test_journal_files_are_private(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    with a.connect() as client:
        assert client.run(t.square, 3).result(R) == 9
    for path in (journal, Path(f"{journal}-wal"), Path(f"{journal}.mark")):
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))


@pytest.mark.parametrize("damage", ["delete the -wal", "garble the -wal", "empty the file"])
def test_a_damaged_journal_is_refused_naming_what_would_be_lost(
        start_server, short_dir, damage) -> None:
    """300 tasks accepted (queued behind a task that never ends), then kill -9: they live in
    the -wal only. Damaged, the journal is refused at start with the count of accepted tasks
    lost, and nothing changed; ``--recover-damaged`` starts on what is left."""
    journal = short_dir / "j.sqlite3"
    started, never = short_dir / "started", short_dir / "never"
    os.mkfifo(never)
    a = start_server("--journal", str(journal), "--workers", "1", "--backlog", "1000")
    with a.connect() as client:
        client.run(t.hang, str(started), str(never))
        wait_until(started.exists, what="the blocking task's start")
        futures = [client.run(t.square, i) for i in range(300)]
        for f in futures:
            client.accepted(f, R)
        kill(a)
    wal = Path(f"{journal}-wal")
    assert wal.stat().st_size > 0
    if damage == "delete the -wal":
        wal.unlink()
    elif damage == "garble the -wal":
        with open(wal, "r+b") as f:
            f.seek(wal.stat().st_size // 2)
            f.write(os.urandom(4096))
    else:
        wal.unlink()
        journal.write_bytes(b"")
    before = journal.read_bytes()
    serve = _taskorch("serve", "--socket", str(short_dir / "s.sock"), "--journal", str(journal))
    refused = subprocess.run(serve, capture_output=True, text=True, timeout=R, env=_env())
    assert refused.returncode == 2, refused.stderr
    assert "accepted tasks would be lost" in refused.stderr, refused.stderr
    assert "--recover-damaged" in refused.stderr
    assert journal.read_bytes() == before
    b = start_server("--journal", str(journal), "--recover-damaged", "--backlog", "1000")
    with b.connect() as client:
        later = client.run(t.square, 7)
        assert later.result(R) == 49
        assert later.task_id > 301  # never an id a lost task had
    kill(b)  # (the hanging task may have been recovered: no drain)


def _mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a file system to fill) needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_an_outcome_that_cannot_be_committed_is_not_published(start_server, short_dir) -> None:
    """The journal on a small tmpfs: a task is accepted, the file system is filled, then the
    task returns 300 KB. Its outcome cannot be committed: the client does not get it and
    ``/readyz`` says 503; once space returns, the server commits it, publishes it, and is
    ready again. After a kill -9 that task is recorded done: it never runs again."""
    disk = short_dir / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        journal = disk / "j.sqlite3"
        started, release = short_dir / "started", short_dir / "release"
        os.mkfifo(release)
        a = start_server("--journal", str(journal), "--http", "127.0.0.1:0", tcp=True)
        url = http_url(a)
        with a.connect() as client:
            assert client.run(t.square, 2).result(R) == 4
            future = client.run(t.blocker, str(started), str(release))
            client.accepted(future, R)
            wait_until(started.exists, what="the task's start")
            filler = _fill(disk)
            with open(release, "w") as f:
                f.write("x" * 300_000)

            def unready() -> Any:
                status, body, _ = get(url + "readyz")
                return status == 503 and json.loads(body)["checks"]["journal"] != "ok"

            wait_until(unready, what="/readyz to report the failed commit")
            assert not future.done(), "an outcome that is not committed was published"
            host, port = a.address
            status = subprocess.run(
                _taskorch("status", "--tcp", f"{host}:{port}", "--authkey-file",
                          str(a.authkey_file)), capture_output=True, text=True, timeout=R,
                env=_env())
            assert "journal" in status.stdout and "NOT READY" in status.stdout, status.stdout
            filler.unlink()
            assert future.result(R) == "x" * 300_000
            wait_until(lambda: get(url + "readyz")[0] == 200, what="ready again")
            kill(a)
        counts = journal_counts(journal)
        assert counts.get("running", 0) == counts.get("queued", 0) == 0, counts
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_many_submitters_and_a_hostile_one_lose_nothing(start_server, short_dir) -> None:
    """Three honest clients stream tasks while a fourth sends out-of-range integers: every
    honest future resolves with its value."""
    server = start_server("--journal", str(short_dir / "j.sqlite3"), "--backlog", "5000")

    def honest(n: int) -> list[int]:
        with server.connect() as client:
            return [f.result(R) for f in [client.run(t.square, i) for i in range(n)]]

    with concurrent.futures.ThreadPoolExecutor(3) as pool, server.connect() as hostile:
        results = [pool.submit(honest, 800) for _ in range(3)]
        for _ in range(30):
            with pytest.raises(ValueError):
                hostile.result(-1 if _ % 2 else 2**64, timeout=R)
        assert all(r.result(R) == [i * i for i in range(800)] for r in results)


def test_a_truncated_call_is_refused_and_the_connection_goes_on(start_server) -> None:
    """A call cut short where the server reads it (its function reference) is refused as a
    bad request; the reader lives on and serves the next frame."""
    import pickle

    from test_service import _authenticated

    from taskorch._service.protocol import C_STATS, S_REJECTED, S_STATS
    from taskorch._wire import encode_call

    server = start_server()
    whole = encode_call(t.square, (3,), {})
    sock, conn = _authenticated(server)
    try:
        for cut in (whole[:len(whole) // 8], whole[:20]):
            conn.send_bytes(pickle.dumps(tuple(submit_frame(
                5, cut, None, wait=False, client=b"c" * 16, retry=False, credit=False))))
            tag, req, _ = pickle.loads(conn.recv_bytes())
            assert (tag, req) == (S_REJECTED, 5)
        conn.send_bytes(pickle.dumps((C_STATS, 7)))
        tag, req, _ = pickle.loads(conn.recv_bytes())
        assert (tag, req) == (S_STATS, 7)
    finally:
        conn.close()
        sock.close()
    assert "internal error" not in server.stderr()


def test_http_answers_carry_security_headers(start_server) -> None:
    server = start_server("--http", "127.0.0.1:0", "--workers", "1", tcp=True)
    url = http_url(server)
    for path in ("", "readyz", "metrics"):
        _, _, headers = get(url + path)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_result_over_max_result_bytes_fails_its_task_clearly(start_server) -> None:
    server = start_server("--max-result-bytes", "100000")
    with server.connect() as client:
        with pytest.raises(SerializationError, match="over this server's --max-result-bytes"):
            client.run(t.bytes_of, 200_000).result(R)
        assert client.run(t.bytes_of, 1000).result(R) == b"x" * 1000


def test_a_client_that_does_not_read_costs_the_server_only_its_outbox_bound(
        start_server, short_dir) -> None:
    """A raw client submits 150 tasks that return 1 MiB each and reads nothing: the server
    holds at most its --max-outbox-bytes of them (the rest wait in the journal); its RSS
    grows by far less than the 150 MiB of outcomes. Then the client reads: every outcome
    comes, whole, fetched back from the journal."""
    import pickle

    import psutil
    from test_service import _authenticated

    from taskorch._service.codec import decode_server_frames
    from taskorch._service.protocol import Accepted, Done
    from taskorch._wire import encode_call

    n, size = 150, 1 << 20
    server = start_server("--journal", str(short_dir / "j.sqlite3"), "--backlog", "1000",
                          "--max-outbox-bytes", "2000000")
    process = psutil.Process(server.proc.pid)
    with server.connect() as observer:
        assert observer.run(t.bytes_of, size).result(R) == b"x" * size  # warm: a first one
        before = process.memory_info().rss
        sock, conn = _authenticated(server)
        try:
            call = encode_call(t.bytes_of, (size,), {})
            for req in range(1, n + 1):
                conn.send_bytes(pickle.dumps(tuple(submit_frame(
                    req, call, None, wait=False, client=b"r" * 16, retry=False, credit=False))))
            wait_until(lambda: journal_counts(short_dir / "j.sqlite3").get("done:1", 0) > n,
                       timeout=120, what="every outcome to be committed")
            grown = process.memory_info().rss - before
            # (bound: the outbox, 2 MB, plus the journal writer's queue, MAX_QUEUED_BYTES)
            assert grown < 110 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"
            accepted, done = set(), {}
            while len(done) < n:
                assert conn.poll(R), (len(accepted), len(done))
                for frame in decode_server_frames(conn.recv_bytes()):
                    if isinstance(frame, Accepted):
                        accepted.add(frame.req)
                    elif isinstance(frame, Done):
                        assert frame.req in accepted
                        done[frame.req] = pickle.loads(frame.data)
        finally:
            conn.close()
            sock.close()
    assert all(v == b"x" * size for v in done.values()) and len(done) == n
