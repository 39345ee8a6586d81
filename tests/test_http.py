"""The HTTP side: ``HttpService`` in process (readiness with the breaker open, the token, the
JSON API) and ``taskorch serve --http`` as a real server process on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import _tasks as T
import pytest
from _tasks import scaled
from prometheus_client.parser import text_string_to_metric_families
from test_service import Server, _env, _taskorch, short_dir, start_server  # noqa: F401 (fixtures)

from taskorch import CircuitBreaker, Policy, TaskOrchestrator
from taskorch._service.server.http import HttpService, load_or_create_token

R = scaled(30)  # deadline for any one result: only catches deadlocks


def get(url: str, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=R) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def counters(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


@pytest.fixture
def http() -> Iterator[Callable[..., HttpService]]:
    made: list[HttpService] = []

    def make(orchestrator: TaskOrchestrator, **kwargs: Any) -> HttpService:
        service = HttpService(orchestrator, "127.0.0.1", 0, **kwargs)
        made.append(service)
        service.start()
        return service

    yield make
    for service in made:
        service.close()


def test_readyz_is_unready_while_the_breaker_is_open(
    make_orchestrator: Callable[..., TaskOrchestrator], http: Callable[..., HttpService],
) -> None:
    o = make_orchestrator(worker_count=1, circuit_breaker=CircuitBreaker(
        failure_threshold=1, break_duration=600))
    service = http(o)
    T.wait_until(lambda: o.stats().workers == 1, what="the worker")
    status, body, _ = get(service.url + "readyz")
    assert status == 200 and json.loads(body)["ready"] is True, body
    failed = o.run(T.raise_value_error, "opens the breaker")
    assert failed and isinstance(failed.exception(timeout=R), ValueError)
    assert o.stats().breaker_state == "open"  # published before the future resolved
    status, body, _ = get(service.url + "readyz")
    answer = json.loads(body)
    assert status == 503 and answer["ready"] is False, body
    assert answer["checks"]["breaker"] == "the circuit breaker is open"
    assert answer["checks"]["workers"] == "ok"
    assert get(service.url + "healthz")[0] == 200  # alive all the same


def test_readiness_checks_are_a_list_the_server_extends(
    make_orchestrator: Callable[..., TaskOrchestrator], http: Callable[..., HttpService],
) -> None:
    service = http(make_orchestrator(worker_count=1))
    verdict: list[str | None] = ["the journal's disk is full"]
    service.add_readiness_check("journal", lambda: verdict[0])
    status, body, _ = get(service.url + "readyz")
    assert status == 503 and json.loads(body)["checks"]["journal"] == verdict[0]
    verdict[0] = None
    T.wait_until(lambda: service.observer.orchestrator.stats().workers == 1, what="the worker")
    assert get(service.url + "readyz")[0] == 200


def test_a_token_guards_metrics_and_the_api(
    make_orchestrator: Callable[..., TaskOrchestrator], http: Callable[..., HttpService],
) -> None:
    o = make_orchestrator(worker_count=1)
    service = http(o, token="right-token")
    assert o.run(T.square, 3).result(timeout=R) == 9  # type: ignore[union-attr]
    for path in ("metrics", "api/stats"):
        status, _, headers = get(service.url + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert get(service.url + path, "wrong-token")[0] == 401, path
    status, text, _ = get(service.url + "metrics", "right-token")
    assert status == 200 and counters(text)["taskorch_tasks_succeeded_total"] == 1
    status, body, _ = get(service.url + "api/stats", "right-token")
    assert status == 200 and json.loads(body)["succeeded"] == 1
    # No data in these: open, for supervisors and load balancers.
    assert [get(service.url + p)[0] for p in ("", "healthz", "readyz")][:2] == [200, 200]


def test_a_non_loopback_address_needs_allow_remote_and_a_token(
    make_orchestrator: Callable[..., TaskOrchestrator],
) -> None:
    o = make_orchestrator(worker_count=1)
    with pytest.raises(ValueError, match="--allow-remote"):
        HttpService(o, "0.0.0.0", 0)
    with pytest.raises(ValueError, match="needs a token"):
        HttpService(o, "0.0.0.0", 0, allow_remote=True)


def test_the_api_views(make_orchestrator: Callable[..., TaskOrchestrator],
                       http: Callable[..., HttpService]) -> None:
    o = make_orchestrator(worker_count=1, policy=Policy())
    service = http(o)
    o.schedule(T.square, every=3600, args=(2,), name="hourly")
    assert o.run(T.square, 2).result(timeout=R) == 4  # type: ignore[union-attr]
    assert o.run(T.raise_value_error, "bad").exception(timeout=R)  # type: ignore[union-attr]
    overview = json.loads(get(service.url + "api/overview")[1])
    assert overview["stats"]["succeeded"] >= 1 and overview["stats"]["failed"] == 1
    (failure,) = overview["failures"]
    assert failure["type"] == "ValueError" and "raise ValueError" in failure["traceback"]
    assert [s["name"] for s in overview["schedules"]] == ["hourly"]
    assert {t["name"] for t in overview["names"]} >= {"_tasks.square",
                                                      "_tasks.raise_value_error"}
    assert [w["pid"] for w in overview["workers"]] == o.worker_pids()
    assert overview["history"]["samples"] and overview["readiness"]["breaker"] == "ok"
    for view in ("stats", "workers", "failures", "schedules", "names", "history"):
        assert get(service.url + "api/" + view)[0] == 200, view
    assert get(service.url + "api/nothing")[0] == 404


def test_token_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "http-token"
    token, created = load_or_create_token(path)
    assert created and len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(path) == (token, False)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create_token(path)


# -- taskorch serve --http (a real server process) --------------------------------------------


def http_url(server: Server) -> str:
    match = re.search(r"metrics and dashboard on (http://\S+)", server.stderr())
    assert match, server.stderr()
    return match.group(1)


def test_serve_http_end_to_end(start_server: Callable[..., Server]) -> None:  # noqa: F811
    server = start_server("--http", "127.0.0.1:0", "--workers", "1", tcp=True)
    url = http_url(server)
    with server.connect() as client:
        assert [client.run(T.square, i).result(R) for i in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError):
            client.run(T.raise_value_error, "remote").result(R)
        stats = client.stats()
    status, text, headers = get(url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    parsed = counters(text)
    assert parsed["taskorch_tasks_succeeded_total"] == stats.succeeded == 3
    assert parsed["taskorch_tasks_failed_total"] == stats.failed == 1
    # The server never unpickles a call, yet names module functions (read from the pickle).
    tasks = {t["name"]: t for t in json.loads(get(url + "api/names")[1])}
    assert tasks["_tasks.square"]["finished"] == 3
    assert tasks["_tasks.raise_value_error"]["failed"] == 1
    assert get(url + "healthz")[0] == 200
    status, body, _ = get(url + "readyz")
    assert status == 200 and "journal" in json.loads(body)["checks"], body  # serve adds it


def test_serve_refuses_a_non_loopback_http_address_without_allow_remote(
    short_dir: Path,  # noqa: F811
) -> None:
    refused = subprocess.run(
        _taskorch("serve", "--socket", str(short_dir / "s.sock"), "--authkey-file",
                  str(short_dir / "k"), "--http", "0.0.0.0:0"),
        capture_output=True, text=True, timeout=R, env=_env())
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr, refused.stderr
    assert not (short_dir / "s.sock").exists()  # nothing was left listening
