"""``taskorch serve --http``: Prometheus metrics, health checks, a JSON API and a live dashboard
(server process, threads of its own).

The HTTP parsing is the standard library's (``http.server.ThreadingHTTPServer``): a maintained
server that fits this process, whose other parts are threads too, and keeps every request off
the dispatcher thread. A request reads the orchestrator the way ``stats()`` does (a copy under
the backlog lock; see ``_parent.observe``), so a slow or stalled HTTP client holds one of these
threads, never the dispatcher.

    "taskorch-http"            ``serve_forever``: accepts, one thread per request (below).
                               Daemon; ``close()`` shuts it down and joins it.
    "taskorch-http-request"    one request: route, read the orchestrator, write the answer;
                               the socket times out after ``REQUEST_TIMEOUT`` (a client that
                               stalls loses its connection). Daemon; ``close()`` joins them.
    "taskorch-http-sampler"    every ``SAMPLE_INTERVAL`` s, appends the counts to the history
                               the dashboard's charts draw (``HISTORY`` samples, and the hour
                               in ``HOUR_BUCKETS`` fixed buckets); waits on an Event that
                               ``close()`` sets. Daemon; joined by ``close()``.

Endpoints: ``/metrics`` (the exposition, ``prometheus_client``), ``/healthz`` (the process
answers), ``/readyz`` (every readiness check passes: 200, else 503 with the reasons), ``/api/...``
(JSON: ``stats``, ``workers``, ``failures``, ``schedules``, ``names`` (the per-name figures),
``history``, and ``overview``, all of them at once, which the dashboard polls), the task
records and actions of ``http_tasks`` (``/api/tasks``..., POST ``/api/tasks/{id}/cancel``...;
only with ``taskorch serve``'s ``operator``), and ``/`` (the dashboard, ``dashboard.html``).

Security: loopback only unless the operator allows remote clients, and then a token is
required. With a token, ``/metrics`` and ``/api/...`` need ``Authorization: Bearer TOKEN``
(Prometheus' ``authorization`` setting); ``/``, ``/healthz`` and ``/readyz`` show no data and stay
open, for supervisors and load balancers. The dashboard page reads the token from its URL's
fragment (``/#token=...``), which browsers never send to a server or write to its logs.

Actions (every POST) need a bearer token always, on loopback too, since any web page a browser
shows can send requests to 127.0.0.1: the token, or on a loopback server without one the
``action_token`` (``serve_http``: the default token file); no token at all, no action (401).
A POST whose ``Origin`` header is present and not this server's own (``http://`` + its
``Host``) is refused with 403 before its token is read; one with no ``Origin`` (curl, scripts)
is judged by its token alone. GETs keep the rules above.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import stat
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from taskorch._parent.observe import Observer, Snapshot
from taskorch._service.server.http_tasks import get, is_task_path, post
from taskorch._service.server.listener import resolve_tcp
from taskorch.metrics import TaskorchCollector

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._service.server.operator import Operator

log = logging.getLogger("taskorch")

#: Seconds between two samples of the dashboard's history. One second shows a burst; the
#: cost is a stats() call (one lock acquisition) per second.
SAMPLE_INTERVAL = 1.0
#: Samples kept: the fine charts' window (5 minutes at SAMPLE_INTERVAL).
HISTORY = 300
#: The hour chart: one sample per HOUR_BUCKET seconds (the first of each bucket), at most
#: HOUR_BUCKETS of them: an hour in a fixed-size deque, so memory never grows with uptime,
#: and the page fetches 120 points, not 3,600.
HOUR_BUCKET = 30.0
HOUR_BUCKETS = 120
#: A request's socket timeout: a client that stalls longer loses its connection (and frees
#: its thread).
REQUEST_TIMEOUT = 10.0

#: A readiness check: returns None when ready, else why not (a short sentence).
ReadinessCheck = Callable[[], "str | None"]


class HttpService:
    """The HTTP side of one orchestrator: bind in the constructor (ValueError for an address
    that cannot be used), ``start()``, ``close()`` (idempotent). ``add_readiness_check`` adds a
    check to ``/readyz`` (e.g. the journal's), at any time."""

    def __init__(self, orchestrator: TaskOrchestrator, host: str, port: int, *,
                 token: str | None = None, allow_remote: bool = False,
                 sample_interval: float = SAMPLE_INTERVAL,
                 action_token: str | None = None) -> None:
        shown = f"{host}:{port}"
        family, sockaddr, loopback = resolve_tcp(
            host, port, allow_remote=allow_remote,
            why="the metrics and the dashboard show task names and tracebacks (with "
                "--allow-remote, a token is then required)")
        if not loopback and not token:
            raise ValueError(f"serving HTTP on the non-loopback {shown} needs a token")
        self.observer = Observer(orchestrator)
        self.token = token
        self.action_token = token or action_token  # what a POST must carry (None: no POST)
        # The task records and actions (``http_tasks``): set by taskorch serve before start().
        self.operator: Operator | None = None
        self.readiness_checks: list[tuple[str, ReadinessCheck]] = [
            ("intake", self._intake_open), ("workers", self._workers_up),
            ("breaker", self._breaker_not_open),
        ]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TaskorchCollector(orchestrator))
        # (time.time(), submitted, succeeded, failed, queued, running, workers), oldest first;
        # appended by the sampler, copied by requests (a deque's append and list() are atomic
        # under the GIL).
        self.history: deque[tuple[float, ...]] = deque(maxlen=HISTORY)
        self.hour: deque[tuple[float, ...]] = deque(maxlen=HOUR_BUCKETS)  # (same fields)
        self.sample_interval = sample_interval
        try:
            server_class = _Server6 if family == socket.AF_INET6 else _Server
            self._server = server_class((str(sockaddr[0]), int(sockaddr[1])), _Handler)
        except OSError as exc:
            raise ValueError(f"cannot serve HTTP on {shown}: {exc}") from exc
        self._server.service = self
        self.host, self.port = str(self._server.server_address[0]), int(
            self._server.server_address[1])
        self._stop = threading.Event()
        self._serve_thread = threading.Thread(target=self._serve_guarded, name="taskorch-http",
                                              daemon=True)
        self._sampler = threading.Thread(target=self._sample_until_closed,
                                         name="taskorch-http-sampler", daemon=True)
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/"

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self.readiness_checks.append((name, check))

    def start(self) -> None:
        self._sample()
        self._sampler.start()
        self._serve_thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._serve_thread.is_alive():
            self._server.shutdown()
            self._serve_thread.join()
        if self._sampler.is_alive():
            self._sampler.join()
        self._server.server_close()  # joins the request threads

    # -- threads ------------------------------------------------------------------------------

    def _serve_guarded(self) -> None:
        try:
            self._server.serve_forever()
        except BaseException:
            log.exception("taskorch serve: the HTTP thread failed; metrics are unavailable")

    def _sample_until_closed(self) -> None:
        while not self._stop.wait(self.sample_interval):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - the charts miss a point; the server goes on
                log.exception("taskorch serve: sampling the counts failed")

    def _sample(self) -> None:
        s = self.observer.orchestrator.stats()
        sample = (time.time(), s.submitted, s.succeeded, s.failed, s.queued, s.running,
                  s.workers)
        self.history.append(sample)
        hour = self.hour
        if not hour or sample[0] // HOUR_BUCKET != hour[-1][0] // HOUR_BUCKET:
            hour.append(sample)  # (the sampler's thread alone appends)

    # -- readiness -----------------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        """Each check's verdict: "ok" or why not."""
        out = {}
        for name, check in list(self.readiness_checks):
            try:
                out[name] = check() or "ok"
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                out[name] = f"the check failed: {type(exc).__name__}: {exc}"
        return out

    def _intake_open(self) -> str | None:
        backlog = self.observer.orchestrator.backlog
        if backlog.broken is not None:
            return f"the orchestrator is broken: {backlog.broken}"
        return "the server is stopping" if backlog.closed else None

    def _workers_up(self) -> str | None:
        return None if self.observer.orchestrator.stats().workers > 0 else "no worker is up"

    def _breaker_not_open(self) -> str | None:
        state = self.observer.orchestrator.stats().breaker_state
        return "the circuit breaker is open" if state == "open" else None

    # -- the JSON API ---------------------------------------------------------------------------

    def api(self, what: str) -> Any:
        """The answer to ``/api/<what>``; KeyError for an unknown one."""
        if what == "history":
            return {"interval": self.sample_interval, "fields": [
                "time", "submitted", "succeeded", "failed", "queued", "running", "workers"],
                "samples": list(self.history), "bucket": HOUR_BUCKET, "hour": list(self.hour)}
        if what == "workers":
            return self.observer.workers()
        if what == "readiness":
            return self.readiness()
        snap = self.observer.snapshot()
        views: dict[str, Callable[[Snapshot], Any]] = {
            "stats": _stats_json, "failures": _failures_json, "schedules": _schedules_json,
            "names": _names_json,
        }
        if what == "overview":
            out = {name: view(snap) for name, view in views.items()}
            out.update(workers=self.observer.workers(), history=self.api("history"),
                       readiness=self.readiness(), records=self.operator is not None)
            return out
        return views[what](snap)


def _stats_json(snap: Snapshot) -> dict[str, Any]:
    return dict(dataclasses.asdict(snap.stats), time=snap.at, worker_count=snap.worker_count,
                max_backlog=snap.max_backlog, intake=snap.intake,
                restarts_by_cause=snap.restarts_by_cause)


def _failures_json(snap: Snapshot) -> list[dict[str, Any]]:
    return [dataclasses.asdict(f) for f in snap.failures]


def _schedules_json(snap: Snapshot) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in snap.schedules]


def _names_json(snap: Snapshot) -> list[dict[str, Any]]:
    out = []
    for t in snap.tasks:
        finished, started = sum(t.run_counts), sum(t.wait_counts)
        out.append({"name": t.name, "finished": finished, "failed": t.failed,
                    "mean_run_seconds": t.run_sum / finished if finished else None,
                    "mean_wait_seconds": t.wait_sum / started if started else None})
    return out


# -- the server and its handler ----------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: HttpService
    # Request threads not known to have ended (pruned at each request; joined by
    # server_close()). Only the serve thread appends; server_close() runs after it ended.
    request_threads: list[threading.Thread] = []

    def server_bind(self) -> None:
        # HTTPServer's, without its socket.getfqdn() (a reverse DNS lookup that can take
        # seconds on a machine without a resolver); the name only goes into CGI variables.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's, with a name for the thread (a stack dump then reads like a diagram).
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address),
                                  name="taskorch-http-request", daemon=True)
        self.request_threads = [t for t in self.request_threads if t.is_alive()] + [thread]
        thread.start()

    def server_close(self) -> None:
        super().server_close()
        for thread in self.request_threads:  # each ends within REQUEST_TIMEOUT
            thread.join()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "taskorch"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        service = self.server.service
        path = urlsplit(self.path).path
        try:
            if path == "/healthz":
                self._send(200, "application/json", {"alive": True})
            elif path == "/readyz":
                checks = service.readiness()
                ready = all(v == "ok" for v in checks.values())
                self._send(200 if ready else 503, "application/json",
                           {"ready": ready, "checks": checks})
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", _dashboard_html())
            elif not self._authorized():
                self._send(401, "application/json", {"error": "a valid token is required "
                           "(Authorization: Bearer TOKEN)"},
                           extra={"WWW-Authenticate": 'Bearer realm="taskorch"'})
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(service.registry))
            elif is_task_path(path) and service.operator is not None:
                self._send_answer(get(service.operator, path,
                                      parse_qs(urlsplit(self.path).query)))
            elif path.startswith("/api/"):
                try:
                    body = service.api(path[len("/api/"):])
                except KeyError:
                    self._send(404, "application/json", {"error": f"no such view: {path}"})
                else:
                    self._send(200, "application/json", body)
            else:
                self._send(404, "application/json", {"error": f"not found: {path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("taskorch serve: HTTP %s failed", path)
            try:
                self._send(500, "application/json", {"error": f"{type(exc).__name__}: {exc}"})
            except OSError:
                pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        """An action (``http_tasks``): same-origin or no Origin (403), the token (401)."""
        service = self.server.service
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= 65536:
            self.rfile.read(length)  # (no body is used; read so that the answer is seen)
        origin = self.headers.get("Origin")
        try:
            if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
                self._send(403, "application/json", {"error": f"a request from {origin} may "
                           "not act on this server (only its own dashboard's pages may)"})
            elif not service.action_token or not self._authorized(service.action_token):
                self._send(401, "application/json", {"error": "an action needs the token "
                           "(Authorization: Bearer TOKEN)"},
                           extra={"WWW-Authenticate": 'Bearer realm="taskorch"'})
            elif service.operator is None or not is_task_path(split.path):
                self._send(404, "application/json", {"error": f"not found: {split.path}"})
            else:
                self._send_answer(post(service.operator, split.path, parse_qs(split.query)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away

    def _authorized(self, required: str | None = None) -> bool:
        token = required or self.server.service.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode())

    def _send_answer(self, answer: tuple[int, Any]) -> None:
        self._send(answer[0], "application/json", answer[1])

    def _send(self, status: int, content_type: str, body: Any,
              extra: dict[str, str] | None = None) -> None:
        if isinstance(body, str):
            data = body.encode()
        elif isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in _SECURITY_HEADERS:
            self.send_header(name, value)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("taskorch serve: HTTP %s: " + format, self.client_address[0], *args)


#: On every answer: no content sniffing, no framing (clickjacking), and a page that loads
#: nothing from elsewhere (the dashboard is one file: its inline script and style, fetches to
#: this server only).
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
     "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; "
     "form-action 'none'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)

_html: list[str] = []


def _dashboard_html() -> str:
    if not _html:
        _html.append(resources.files("taskorch._service.server").joinpath("dashboard.html").read_text(
            encoding="utf-8"))
    return _html[0]


def load_or_create_token(path: Path) -> tuple[str, bool]:
    """The HTTP token in ``path`` (text, stripped), created (``secrets.token_urlsafe``, mode
    0600) if missing; returns (token, created). ValueError for an empty file or one that
    other users can read."""
    created = False
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            created = True
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read or create the HTTP token file: {exc}") from exc
    if mode & 0o077:
        raise ValueError(f"the HTTP token file {str(path)!r} is accessible to other users "
                         f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    if not token:
        raise ValueError(f"the HTTP token file {str(path)!r} is empty")
    return token, created
