"""``taskorch serve --http``'s task records and actions (issue 25) against a real server:
every POST needs the bearer token (on loopback too) and a same-origin request or none."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import _tasks as T
import pytest
from test_http import get, http_url
from test_service import Server, short_dir, start_server  # noqa: F401 (fixtures)

from taskorch import Policy

R = T.scaled(30)  # deadline for any one result: only catches deadlocks


def post(url: str, token: str | None = None,
         origin: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"", method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if origin is not None:
        request.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(request, timeout=R) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_task_api_lists_shows_and_acts_with_the_token_and_origin_rules(
        start_server: Callable[..., Server], short_dir: Path) -> None:  # noqa: F811
    token_file = short_dir / "http-token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    server = start_server("--http", "127.0.0.1:0", "--http-token-file", str(token_file),
                          "--workers", "1", tcp=True)
    url = http_url(server)
    own = url.rstrip("/")
    gate = T.Gate(short_dir, "busy")
    counter = short_dir / "counter"
    with server.connect() as client:
        failed = client.with_policy(Policy(retries=0)).run(T.fail_until, str(counter), 2)
        with pytest.raises(ConnectionError):
            failed.result(R)
        running = client.run(T.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        queued = [client.run(T.square, i) for i in range(3)]
        ids = [client.accepted(f, R) for f in queued]

        assert get(url + "api/tasks")[0] == 401  # a token is configured: GETs need it too
        status, body, _ = get(url + "api/tasks?state=queued&limit=2", "s3cret-token")
        assert status == 200 and [t["id"] for t in json.loads(body)] == [ids[2], ids[1]]
        status, body, _ = get(url + f"api/tasks?state=queued,failed&before_id={ids[1]}",
                              "s3cret-token")
        assert [t["id"] for t in json.loads(body)] == [ids[0], failed.task_id]
        status, body, _ = get(url + f"api/tasks/{failed.task_id}", "s3cret-token")
        record = json.loads(body)
        assert record["state"] == "failed" and "ConnectionError" in record["traceback"]
        assert get(url + "api/tasks/999999", "s3cret-token")[0] == 404
        assert get(url + "api/tasks?limit=x", "s3cret-token")[0] == 400

        cancel = url + f"api/tasks/{ids[0]}/cancel"
        assert post(cancel)[0] == 401  # no token: refused, on loopback too
        assert post(cancel, "wrong")[0] == 401
        assert post(cancel, "s3cret-token", origin="http://evil.example")[0] == 403
        assert post(cancel, origin="http://evil.example")[0] == 403
        assert not queued[0].done()  # none of those acted
        assert post(cancel, "s3cret-token", origin=own) == (200, {"cancelled": True})
        assert post(cancel, "s3cret-token") == (200, {"cancelled": False})  # no Origin: curl
        assert post(url + "api/tasks/999999/cancel", "s3cret-token")[0] == 404
        busy = url + f"api/tasks/{running.task_id}/cancel"
        assert post(busy, "s3cret-token") == (200, {"cancelled": False})

        status, answer = post(url + f"api/tasks/{failed.task_id}/retry", "s3cret-token")
        assert status == 200 and answer["id"] > ids[-1]
        assert post(url + f"api/tasks/{ids[1]}/retry", "s3cret-token")[0] == 400
        assert post(url + "api/purge?name=_tasks.square", "s3cret-token") == (
            200, {"cancelled": 2})
        assert post(url + "api/nothing", "s3cret-token")[0] == 404
        gate.release()
        assert client.result(answer["id"], R) == 2 and running.result(R) == "go"
        assert all(f.cancelled() for f in queued)
        status, body, _ = get(url + f"api/tasks/{ids[0]}", "s3cret-token")
        assert json.loads(body)["state"] == "cancelled"


def test_on_loopback_without_a_token_gets_are_open_and_posts_need_the_default_token(
        start_server: Callable[..., Server], short_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_dir / "conf"))
    server = start_server("--http", "127.0.0.1:0", "--workers", "1", tcp=True)
    token_file = short_dir / "conf" / "taskorch" / "http-token"
    assert f"actions (POST /api/...) need the bearer token in {token_file}" in server.stderr()
    assert token_file.stat().st_mode & 0o777 == 0o600
    url = http_url(server)
    with server.connect() as client:
        done = client.run(T.square, 5)
        assert done.result(R) == 25
        status, body, _ = get(url + f"api/tasks/{done.task_id}")  # GET: today's rules
        assert status == 200 and json.loads(body)["result_repr"] == "25"
        retry = url + f"api/tasks/{done.task_id}/retry"
        assert post(retry)[0] == 401
        token = token_file.read_text().strip()
        assert post(retry, token)[0] == 400  # authorized; a succeeded task is not retried


def test_the_hour_of_history_is_kept_in_fixed_buckets(make_orchestrator: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hours of samples, one a second, on a fake clock: the hour view keeps one sample per
    HOUR_BUCKET seconds and at most HOUR_BUCKETS of them (memory does not grow), the fine
    view its last HISTORY."""
    from taskorch._service.server import http as http_module

    o = make_orchestrator(worker_count=1)
    service = http_module.HttpService(o, "127.0.0.1", 0)
    try:
        now = [1_000_000.0]
        monkeypatch.setattr(http_module.time, "time", lambda: now[0])
        for _ in range(7200):
            service._sample()
            now[0] += 1.0
        hour = service.api("history")["hour"]
        assert len(hour) == http_module.HOUR_BUCKETS
        gaps = {round(b[0] - a[0]) for a, b in zip(hour, hour[1:])}
        assert gaps == {http_module.HOUR_BUCKET}
        assert hour[-1][0] >= now[0] - 1 - http_module.HOUR_BUCKET
        assert len(service.api("history")["samples"]) == http_module.HISTORY
    finally:
        service.close()
