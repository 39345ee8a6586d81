"""Celery's app for the peers section: Redis broker and result backend over a Unix socket.

Runs in the Celery worker (``celery -A bench.peers.app_celery worker``) and in the driver
(peers venv). Celery's defaults otherwise: prefork pool, early acks, prefetch multiplier 4.
"""

from __future__ import annotations

import os

from celery import Celery

from . import work

_URL = "redis+socket://" + os.environ.get("PEER_REDIS_SOCK", "/nonexistent")
app = Celery("bench_peers", broker=_URL, backend=_URL)
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True

noop = app.task(name="noop")(work.noop)
mark = app.task(name="mark", ignore_result=True)(work.mark)
cpu = app.task(name="cpu", ignore_result=True)(work.cpu)
short = app.task(name="short", ignore_result=True)(work.short)
