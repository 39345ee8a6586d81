"""The peers section: taskorch serve against the job queues users weigh it against.

Run it as ``python scripts/bench.py --peers [--quick] [--systems ...] [--reps N]``.
Systems, 2 worker processes each: taskorch serve (its journal; its journal with
``--journal-sync normal``; ``--no-journal``), Huey
(SQLite storage, and Redis), RQ, Dramatiq and Celery (Redis). Redis is Debian's
``redis-server`` (installed with apt-get by the orchestrator if missing, as root and without
``--no-install``), started and stopped by each driver on a Unix socket. The peers live in a venv
of their own (``.bench-peers-venv`` at the repository's top, created by the orchestrator; never
taskorch's ``.venv``). A system that cannot be installed or started is reported as such.

Modules:

  run.py           orchestrator (taskorch's venv): the peers' venv, rounds, the table
  driver.py        one system, one round, W1-W4 (in the system's venv; its docstring says what
                   each workload measures)
  systems.py       one adapter per system, the same verbs for each
  procs.py         the processes a driver starts; redis-server
  work.py          the task bodies, the same for every system; the mark file
  app_*.py         each peer's app module (its task decorator around work.py's functions)
  report.py        the markdown table and the ratios to taskorch within each round
"""
