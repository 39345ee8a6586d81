"""Huey's app for the peers section: SQLite storage (``PEER_HUEY_SQLITE``) or Redis (a Unix
socket, ``PEER_REDIS_SOCK``).

Runs in the consumer (``huey_consumer bench.peers.app_huey.huey -w 2 -k process``) and in the
driver (peers venv). Huey's defaults otherwise (results kept, the consumer's polling delays).
"""

from __future__ import annotations

import os

from . import work

if os.environ.get("PEER_HUEY_SQLITE"):
    from huey import SqliteHuey

    huey = SqliteHuey("bench_peers", filename=os.environ["PEER_HUEY_SQLITE"])
else:
    from huey import RedisHuey

    huey = RedisHuey("bench_peers", url="unix://" + os.environ.get("PEER_REDIS_SOCK", "/x"))

noop = huey.task(name="noop")(work.noop)
mark = huey.task(name="mark")(work.mark)
cpu = huey.task(name="cpu")(work.cpu)
short = huey.task(name="short")(work.short)
