"""``taskorch serve --http``: its options and the ``HttpService`` they make (CLI, server
process, main thread). See ``taskorch._service.server.http``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskorch._service.addressing import parse_tcp_address
from taskorch.cli.options import UsageError

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._service.server.http import HttpService


def add_http_arguments(p: Any) -> None:
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve Prometheus metrics (/metrics), health checks (/healthz, "
                        "/readyz), a JSON API (/api/...) and a live dashboard (/) over HTTP, "
                        "e.g. 127.0.0.1:9180; a non-loopback address needs --allow-remote and "
                        "a token (needs the metrics extra: pip install 'taskorch[metrics]')")
    p.add_argument("--http-token-file", metavar="PATH",
                   help="a bearer token that /metrics and /api/... then require (created, "
                        "mode 0600, if missing); default for a non-loopback --http: "
                        "~/.config/taskorch/http-token, and none on loopback")


def http_service_from_args(args: argparse.Namespace,
                           orchestrator: TaskOrchestrator) -> tuple[HttpService | None, str]:
    """The HTTP service (bound, not started) and a line about its token for the operator."""
    if args.http is None:
        return None, ""
    try:
        from taskorch._service.server.http import HttpService, load_or_create_token
    except ImportError as exc:
        raise UsageError(f"--http needs prometheus_client ({exc}): "
                         "pip install 'taskorch[metrics]'") from exc
    try:
        host, port = parse_tcp_address(args.http)
        token, note = None, ""
        path = args.http_token_file or (None if _loopback(host) else _default_token_path())
        action_token = None
        if path is not None:
            token, created = load_or_create_token(Path(path))
            note = (f"/metrics and /api/... need the bearer token in {path}"
                    + (" (generated, mode 0600)" if created else ""))
        else:  # loopback, open to GETs: actions (POST) still need a token (see ``http``)
            path = _default_token_path()
            action_token, created = load_or_create_token(Path(path))
            note = (f"actions (POST /api/...) need the bearer token in {path}"
                    + (" (generated, mode 0600)" if created else ""))
        service = HttpService(orchestrator, host, port, token=token,
                              allow_remote=args.allow_remote, action_token=action_token)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return service, note


def _loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
        return ipaddress.ip_address(address).is_loopback
    except (OSError, ValueError):
        return True  # HttpService reports the address itself


def _default_token_path() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "taskorch", "http-token")
