"""Benchmark taskorch against the process pools it means to beat (DESIGN.md, "Figures to beat").

Run it as ``python scripts/bench.py [flags]`` (the thin launcher next to this folder) or
``python -m bench`` from ``scripts/``; ``--help`` lists the flags.

Two roles, each in its own interpreter:

  parent (default)    calibrates the CPU task and times the serial baseline, then runs one
                      fresh interpreter per pool (``bench.py --child POOL ...``), one after the
                      other, each under a deadline; gathers their JSON into a markdown table,
                      ratio lines, and optionally ``--json FILE`` and ``--chart FILE.png``.
  child (--child)     builds the pool (a fresh one for every repetition of every section), runs
                      the sections and rewrites its JSON file after each one, so that a child
                      killed at its deadline still hands back what it measured.

Pools, 2 workers each (``--workers``): taskorch, cf (concurrent.futures.ProcessPoolExecutor),
loky (loky.ProcessPoolExecutor, not the reusable one), mp (multiprocessing.Pool.apply_async),
pebble (pebble.ProcessPool). Each uses its library's default start method (shown in the table).
The Dask pair (taskorch-dask, dask) runs A and B; the remote pair (taskorch-remote, -nj) runs A.

Sections:
  A  no-op throughput: N tasks submitted one by one, all results collected; tasks/s
  B  CPU-bound speedup: N tasks of ~50 ms pure Python vs the same run serially in the parent
  C  producer latency: each submit call timed while the workers are busy; p50 / p99 in us
  D  cold start: constructor to the first result of a no-op, in a fresh interpreter whose
     library is already imported (the import is timed apart and shown with it); ms
  E  memory: RSS of the process that owns the pool, USS of each worker; MiB
  F  crash: 200 tasks, one calls os._exit(1); how many of the 199 others succeed; still usable?
  G  hard timeout: a hung task with a 0.5 s per-task timeout; how late its failure is seen; ms
  H  drain: from the last of 50 short tasks completing to stop()/shutdown() returning; ms
  I  bulk map: N tiny items through the bulk API (taskorch map(), automatic chunk size;
     multiprocessing.Pool.imap and the executors' map with Pool.map's default chunk size)
  M  metrics overhead (taskorch only): A's no-op throughput with the per-task figures off
     and on (``taskorch.metrics``) on one pool, alternating blocks; the median on/off ratio
  P  delayed backlog (taskorch only): A's no-op throughput without, then with 100,000
     tasks delayed by an hour waiting in the backlog (``options(delay=)``); with / without
  R  task records (taskorch only): ``taskorch serve``'s journal with 10,000 retained tasks,
     ms per page of 100 as ``Client.tasks()`` reads it (newest, middle, failed, by name)
  noise: CPU that processes outside the pool's tree used during each section, % of one core

Never asserts speed: every number is a measurement, not a verdict, and the exit status does
not depend on them. Noise on these machines is ~25% on throughput: compare the ratios of one
run, not absolute numbers across runs.

Modules, by role (the parent never imports the child's modules, and the reverse):

  config.py          pools, sections, sizes and tuning constants (both roles)
  harness.py         statistics, bounded calls, process helpers, the noise meter (both roles)
  tasks.py           the task functions the pools run (workers; the parent for the baseline)
  pools.py           child: one adapter per library, the same verbs for each
  child.py           child: the run's state, pool lifecycle, warm-up, the JSON it rewrites
  throughput.py      child: sections A, B, C, I, M
  lifecycle.py       child: sections D, E, H
  failure.py         child: sections F, G
  delayed.py         child: section P
  records.py         child: section R
  child_main.py      child: runs the sections in order, medians over repetitions
  parent.py          parent: calibration, the children under deadlines, cold starts (D)
  report.py          parent: the markdown table, ratio lines, notes, chart
  cli.py             both: the command line, and which role to play
  cost.py            ``--cost``: CPU of the dispatching process (local parent, remote client,
                     serve) per no-op task, and how many 1 ms workers that keeps busy
  floor.py           ``--cost``'s floor: the bare mechanism of taskorch's shape, nothing else
  defaults.py        ``--defaults``: remote run() at taskorch serve's defaults against a local
                     pool, each with a producer that waits for room (issue 23)
  peers/             ``--peers``: taskorch serve against Celery, RQ, Huey and Dramatiq, W1-W4,
                     each peer in a venv of its own (its ``__init__`` says more)

Hazard: imports. Workers import this package to unpickle the task functions (``bench.tasks``),
and loky-style workers (loky, taskorch) also re-import the main module (the launcher
``scripts/bench.py``) as ``__mp_main__``. Whatever those import is charged to their cold start
(D) and memory (E): so this ``__init__``, ``tasks.py`` and the launcher import nothing, and
every module here keeps its top-level imports to cheap stdlib ones. Everything heavier
(psutil, argparse, subprocess, the pool libraries) is imported where it is used.
"""
