"""``taskorch demo``: the main job, shown end to end (parent process, main thread).

It builds a realistic cleanup workload twice in a temporary directory (a SQLite database with
expired sessions, application logs, file trees with duplicates, a priority-queue store with
nodes marked deleted: ``workers/demo_workload.py``), runs the jobs once serially in this
process, then hands the same jobs on the twin copy to a ``TaskOrchestrator`` the way an
application would (``run()`` and go on), while the main thread keeps "serving" and measures how
long it was ever held up. It prints what each job did and the two timings.

The jobs are the plain modules of the ``workers/`` folder at the top of a source checkout
(``--jobs`` names another), loaded by path as ``taskorch run`` loads a path target: their
functions travel to the workers by value, so nothing of ``workers/`` is installed anywhere.
A wheel holds only the ``taskorch`` package, hence the clear error when the folder is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any, Callable

from taskorch.cli.options import EXIT_FAILED, EXIT_OK, UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="offload a realistic cleanup workload and compare with running it serially",
        description="Build a cleanup workload (SQLite purge, log compression, duplicate files, "
                    "priority-queue purge) in a temporary directory and run it serially, then "
                    "through a worker pool.",
    )
    p.add_argument("--scale", type=float, default=1.0, help="workload size factor (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--keep", metavar="DIR",
                   help="build in DIR and keep it (default: a temporary directory)")
    p.add_argument("--no-serial", action="store_true", help="skip the serial comparison run")
    p.add_argument("--jobs", metavar="DIR", default=None,
                   help="the folder of job modules, holding demo_workload.py (default: the "
                        f"workers/ folder of the source checkout, {str(default_jobs_dir())!r})")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(handler=main)


def default_jobs_dir() -> Path:
    """``workers/`` beside the ``taskorch`` package: the top of a source checkout (an editable
    install, or ``python -m taskorch`` run from the checkout)."""
    return Path(__file__).resolve().parents[2] / "workers"


def _demo_workload(jobs_dir: str | None) -> Path:
    """The path of ``demo_workload.py`` in the job folder, or a UsageError saying what to do."""
    folder = Path(jobs_dir) if jobs_dir is not None else default_jobs_dir()
    module = folder / "demo_workload.py"
    if not module.is_file():
        where = "--jobs" if jobs_dir is not None else "the default job folder"
        raise UsageError(
            f"{where} {str(folder)!r} holds no demo_workload.py: the demo's jobs live in the "
            "workers/ folder of a taskorch source checkout, which an installed wheel does not "
            "include; run it from a clone (./scripts/demo) or pass --jobs path/to/workers"
        )
    return module


def main(args: argparse.Namespace) -> int:
    workload = _demo_workload(args.jobs)  # first: a missing folder is reported before any work
    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        if os.listdir(args.keep):
            raise UsageError(f"--keep {args.keep!r} must be an empty directory")
        return _demo(args, args.keep, workload)
    root = tempfile.mkdtemp(prefix="taskorch-demo-")
    try:
        return _demo(args, root, workload)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _describe_workload(info: dict[str, Any]) -> str:
    """What ``demo_workload.build`` made, one line per job kind."""
    return (
        f"  {info['sqlite']['rows']:,} sessions in app.db ({info['sqlite']['expired']:,} expired)\n"
        f"  {len(info['logs']['files'])} logs, {info['logs']['bytes'] / 1e6:.0f} MB to compress\n"
        f"  {info['files']['files']:,} files in {len(info['files']['projects'])} trees, "
        f"{info['files']['duplicates']:,} of them duplicates\n"
        f"  a priority queue of {info['pq']['nodes']:,} nodes, "
        f"{info['pq']['deleted']:,} marked deleted\n"
    )


def _demo(args: argparse.Namespace, root: str, workload: Path) -> int:
    from taskorch import Policy, TaskOrchestrator
    from taskorch.cli.run import resolve_target

    # Each target is loaded once: resolve_target executes a path target's file on every call.
    resolved: dict[str, Callable[..., Any]] = {}

    def resolve(target: str) -> Callable[..., Any]:
        if target not in resolved:
            resolved[target] = resolve_target(target)
        return resolved[target]

    build, list_jobs = resolve(f"{workload}:build"), resolve(f"{workload}:jobs")
    out = sys.stdout
    pool_root = os.path.join(root, "pool")
    serial_root = os.path.join(root, "serial")
    started = time.perf_counter()
    info = build(pool_root, scale=args.scale)
    if not args.no_serial:
        build(serial_root, scale=args.scale)
    out.write(f"Built a cleanup workload in {root} in {time.perf_counter() - started:.1f} s:\n"
              f"{_describe_workload(info)}\n")
    # The longest job (the SQLite purge) first, as a scheduler that knows its jobs would.
    jobs = sorted(list_jobs(pool_root), key=lambda job: "purge_expired" not in job[0])

    serial_seconds = None
    if not args.no_serial:
        out.write(f"Serial, in this process: {len(jobs)} jobs ... ")
        out.flush()
        t0 = time.perf_counter()
        for target, job_args, job_kwargs in list_jobs(serial_root):  # any order: serial
            resolve(target)(*job_args, **job_kwargs)
        serial_seconds = time.perf_counter() - t0
        out.write(f"{serial_seconds:.2f} s\n")

    out.write(f"Offloaded to {args.workers} worker processes: ")
    out.flush()
    policy = Policy(retries=2, timeout=120.0, backoff_initial=0.1)
    # An application starts its orchestrator once, at start-up; the jobs come later.
    pool_started = time.perf_counter()
    with TaskOrchestrator(worker_count=args.workers, max_backlog=len(jobs), policy=policy) as o:
        warm_up = o.run(int)  # wait until the workers are up (they start in parallel)
        assert warm_up is not None
        warm_up.result()
        start_seconds = time.perf_counter() - pool_started
        futures: dict[Future[Any], str] = {}
        t0 = time.perf_counter()
        for target, job_args, job_kwargs in jobs:
            future = o.run(resolve(target), *job_args, **job_kwargs)
            assert future is not None
            futures[future] = target
        submitted = time.perf_counter() - t0
        longest_pause = _keep_serving_until_done(list(futures))
        pool_seconds = time.perf_counter() - t0
        results = _collect(futures, args)
        stats = o.stats()
    out.write(f"{pool_seconds:.2f} s (pool start-up {start_seconds * 1000:.0f} ms before that; all "
              f"{len(jobs)} run() calls returned in {submitted * 1000:.1f} ms; the application "
              f"thread was never held up more than {longest_pause * 1000:.0f} ms)\n\n")

    failed = 0
    for target, job_args, result, future in results:
        name = target.rsplit(":", 1)[1]
        if isinstance(result, BaseException):
            failed += 1
            out.write(f"  FAILED {name}: {type(result).__name__}: {result}\n")
            continue
        out.write(f"  {name:<18} {_describe(result):<64} {future.seconds or 0:6.2f} s\n")
    out.write(f"\n{len(jobs) - failed} jobs succeeded, {failed} failed, {stats.retried} retried.\n")
    if serial_seconds is not None:
        out.write(f"Serial {serial_seconds:.2f} s, offloaded to {args.workers} workers "
                  f"{pool_seconds:.2f} s: a {serial_seconds / pool_seconds:.2f}x speed-up "
                  f"({os.cpu_count()} CPUs here), and the caller was free the whole time.\n")
    return EXIT_FAILED if failed else EXIT_OK


def _keep_serving_until_done(futures: list[Future[Any]]) -> float:
    """The 'application': keeps handling its own requests (1 ms each) while the jobs run;
    returns the longest it was ever kept from doing so."""
    longest = 0.0
    last = time.perf_counter()
    while not all(f.done() for f in futures):
        time.sleep(0.001)  # one request's worth of work
        now = time.perf_counter()
        longest = max(longest, now - last - 0.001)
        last = now
    return max(0.0, longest)


def _collect(
    futures: dict[Future[Any], str], args: argparse.Namespace,
) -> list[tuple[str, Any, Any, Any]]:
    bar = None
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(futures), unit="job", file=sys.stderr, leave=False)
    rows = []
    for future in as_completed(futures):
        try:
            result: Any = future.result()
        except Exception as exc:
            result = exc
        rows.append((futures[future], (), result, future))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    order = {target: i for i, target in enumerate(futures.values())}
    rows.sort(key=lambda row: (order[row[0]], str(row[2])))
    return rows


def _describe(result: dict[str, Any]) -> str:
    """One line about what a job did, from the keys its result has."""
    if "gz_path" in result:
        return (f"{os.path.basename(result['path'])}: {result.get('bytes_in', 0) / 1e6:.1f} MB -> "
                f"{result.get('bytes_out', 0) / 1e6:.1f} MB gzip ({result.get('status')})")
    if "expires_column" in result:
        return (f"deleted {result['deleted']:,} expired rows in {result['chunks']} chunks, "
                f"{result['bytes_before'] / 1e6:.1f} -> {result['bytes_after'] / 1e6:.1f} MB")
    if "removed_files" in result:
        return (f"{os.path.basename(result['directory'])}: removed {result['removed_files']} "
                f"duplicates, freed {result.get('bytes_freed', 0) / 1e6:.1f} MB")
    if "rows_deleted" in result:
        return (f"purged {result['rows_deleted']:,} deleted nodes and {result['blobs_deleted']:,} "
                f"blobs, freed {result.get('bytes_freed', 0) / 1e6:.1f} MB")
    return ", ".join(f"{k}={v}" for k, v in result.items() if isinstance(v, (int, float)))[:64]
