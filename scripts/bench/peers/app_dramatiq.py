"""Dramatiq's app for the peers section: Redis broker and the Results middleware's Redis
backend, over a Unix socket (``PEER_REDIS_SOCK``).

Runs in the workers (``dramatiq bench.peers.app_dramatiq -p 2 -t 1``) and in the driver (peers
venv). Dramatiq's defaults otherwise (its default middleware, retries on failure).
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from . import work

_URL = "unix://" + os.environ.get("PEER_REDIS_SOCK", "/nonexistent")
broker = RedisBroker(url=_URL)
broker.add_middleware(Results(backend=RedisBackend(url=_URL)))
dramatiq.set_broker(broker)

noop = dramatiq.actor(work.noop, actor_name="noop", store_results=True)
mark = dramatiq.actor(work.mark, actor_name="mark")
cpu = dramatiq.actor(work.cpu, actor_name="cpu", time_limit=600_000)
short = dramatiq.actor(work.short, actor_name="short")
