"""A realistic cleanup workload for the demo and the benchmark, and the jobs to run on it.

Runs in: the parent (``build`` and ``jobs``, before the pool starts); nothing here runs in a
worker except through the job targets it names.  Stdlib only, nothing at import.

Like every module in ``workers/``, this is a plain file loaded by path, not part of a package:
it has no relative imports.  It needs its sibling ``pq_compact`` (to write a queue store the
way the application would) and loads it by path too, when ``build`` runs, under a private
name that is deliberately *not* put in ``sys.modules``: should anything of it ever be pickled
(``build`` itself run as a task, ``taskorch run workers/demo_workload.py:build``), cloudpickle
finds no importable module behind it and sends it by value, so a worker that cannot import
anything of ours still runs it.  (``sys.modules`` under a private name would be worse than
nothing: cloudpickle would pickle by reference to a name no worker can import.)

``build(root)`` writes, at ``scale=1``:

- ``app.db``: a ``sessions`` table of 60,000 rows, 60% expired, interleaved as real sessions
  are, with an index on ``expires_at`` (which the purge must not let slow it down);
- ``logs/*.log``: six application logs of about 8 MB each;
- ``files/project-N/``: four trees of about 150 files each, a third of them copies (backups,
  "copy" files, vendored assets), plus same-size files that differ so that hashing has work;
- ``pq/queue.db`` with ``pq/blobs/``: an ``ExternalPriorityQueue`` of 2,000 nodes, 40%
  marked deleted.

``jobs(root)`` splits the work into independent calls (one per log file, one per project
tree) so a pool has parallel work; no two jobs touch the same file.  Content is generated
from a seeded ``random.Random``: two builds with the same seed and scale are identical
(timestamps aside), so counts can be asserted.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sqlite3
import time
from types import ModuleType
from typing import Any

Job = tuple[str, tuple[Any, ...], dict[str, Any]]

# Sizes at scale 1.  Chosen so that, on a slow 2-core machine, build() takes well under 3 s
# and the serial run of jobs() about 2-6 s of CPU, dominated by gzip (the log sizes) and
# SQLite deletes plus VACUUM (the row count): big enough that parallel speedup shows over
# pool overhead, small enough for a demo that runs on every CI push.
_SESSION_ROWS = 60_000
_EXPIRED_FRACTION = 0.6
_LOG_NAMES = ("api", "auth", "billing", "db", "search", "worker")
_LOG_BYTES = 8_000_000
_PROJECTS = 4
_FILES_PER_PROJECT = 150
_PQ_NODES = 2_000
_PQ_DELETED_FRACTION = 0.4

_DAY = 86_400.0


def build(root: str, *, scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Write the workload into ``root`` (created if missing; must be empty); describe it.

    Every size is multiplied by ``scale`` (each part keeps at least a few items, so a tiny
    scale still exercises every job).  Returns the paths and the expected counts:
    ``sqlite.expired`` rows to purge, ``files.duplicates`` copies to remove, ``pq.deleted``
    nodes to purge.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {scale!r}")
    if not math.isfinite(scale) or not 0 < scale <= 100:
        raise ValueError(f"scale must be in (0, 100], got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        raise FileExistsError(
            f"demo root {root!r} is not empty; build() only writes into a new or empty "
            "directory, so it never overwrites anything"
        )
    rng = random.Random(seed)
    now = time.time()
    return {
        "root": root,
        "scale": scale,
        "sqlite": _build_sessions(os.path.join(root, "app.db"), rng, now, scale),
        "logs": _build_logs(os.path.join(root, "logs"), rng, now, scale),
        "files": _build_trees(os.path.join(root, "files"), rng, scale),
        "pq": _build_queue(os.path.join(root, "pq"), rng, scale),
    }


def jobs(root: str) -> list[Job]:
    """The job calls for a workload built in ``root``: ``("path/to/job.py:function", args,
    kwargs)``, naming the job modules beside this file by absolute path (the form
    ``taskorch run`` takes, and ``taskorch.cli.run.resolve_target`` resolves).

    Heaviest first (the gzip jobs), so that a pool that starts them in order finishes
    sooner.  Arguments are plain str/int/bool values, ready to pickle or to print as JSON.
    """
    root = os.path.abspath(os.fspath(root))
    db_path = os.path.join(root, "app.db")
    logs_dir = os.path.join(root, "logs")
    files_dir = os.path.join(root, "files")
    pq_db = os.path.join(root, "pq", "queue.db")
    for required in (db_path, logs_dir, files_dir, pq_db):
        if not os.path.exists(required):
            raise FileNotFoundError(f"{required!r} is missing: run build({root!r}) first")
    log_rotate, sqlite_purge, dedupe, pq_compact = (
        _sibling_path(name) for name in ("log_rotate", "sqlite_purge", "dedupe", "pq_compact")
    )

    result: list[Job] = []
    for name in sorted(os.listdir(logs_dir)):
        if name.endswith(".log"):
            path = os.path.join(logs_dir, name)
            # Level 9: an archive is written once and kept for weeks, so the best ratio is
            # worth the CPU, and it makes these the heavy, parallel part of the workload.
            result.append(
                (f"{log_rotate}:compress_file", (path,), {"compresslevel": 9})
            )
    result.append(
        (
            f"{sqlite_purge}:purge_expired",
            (db_path, "sessions", "expires_at"),
            {"chunk_size": 1000},
        )
    )
    for name in sorted(os.listdir(files_dir)):
        result.append(
            (
                f"{dedupe}:remove_duplicates",
                (os.path.join(files_dir, name),),
                {"dry_run": False},
            )
        )
    result.append((f"{pq_compact}:purge_deleted", (pq_db,), {"chunk_size": 500}))
    return result


def _sibling_path(name: str) -> str:
    """The absolute path of the job module ``name`` beside this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")


def _load_sibling(name: str) -> ModuleType:
    """Execute the job module ``name`` beside this file, by path, as a fresh module object.

    Not registered in ``sys.modules`` (see the module docstring: that keeps it by value for
    cloudpickle); nothing else looks it up there, and the job modules use no ``dataclasses``
    or ``typing.get_type_hints`` that would.
    """
    path = _sibling_path(name)
    spec = importlib.util.spec_from_file_location(f"_taskorch_workers_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the job module {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scaled(count: int, scale: float, minimum: int) -> int:
    return max(minimum, round(count * scale))


def _build_sessions(path: str, rng: random.Random, now: float, scale: float) -> dict[str, Any]:
    rows = _scaled(_SESSION_ROWS, scale, 20)
    agents = ["Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4)",
              "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)", "curl/8.5.0",
              "python-httpx/0.27.0", "okhttp/4.12.0"]
    locales = ["en-US", "de-DE", "fr-FR", "ja-JP", "pt-BR", "es-ES"]
    # Payloads sampled from a pool: generating each row's JSON from scratch would double the
    # build time for no difference to the purge.
    payloads = [
        f'{{"ua": "{rng.choice(agents)}", "locale": "{rng.choice(locales)}", '
        f'"cart": [{", ".join(str(rng.randrange(10_000)) for _ in range(rng.randrange(6)))}], '
        f'"csrf": "{rng.getrandbits(96):024x}"}}'
        for _ in range(2_000)
    ]
    expired = 0
    data = []
    random_ = rng.random
    month = 30 * _DAY
    for i, payload in enumerate(rng.choices(payloads, k=rows), start=1):
        is_expired = random_() < _EXPIRED_FRACTION
        expired += is_expired
        # Expired: up to 30 days ago.  Live: at least a day ahead, so a purge run any time
        # soon after the build deletes exactly the expired rows.
        if is_expired:
            expires = now - 1 - random_() * month
        else:
            expires = now + _DAY + random_() * month
        token = f"{rng.getrandbits(128):032x}"
        created = now - random_() * month
        data.append((i, 1 + int(random_() * 5_000), token, payload, created, expires))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(
            """
            CREATE TABLE sessions (
                id         INTEGER PRIMARY KEY,
                user_id    INTEGER NOT NULL,
                token      TEXT    NOT NULL UNIQUE,
                payload    TEXT    NOT NULL,
                created_at REAL    NOT NULL,
                expires_at REAL    NOT NULL
            );
            CREATE INDEX sessions_expires_at ON sessions (expires_at);
            CREATE INDEX sessions_user_id ON sessions (user_id);
            """
        )
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", data)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {"path": path, "table": "sessions", "rows": rows, "expired": expired}


def _build_logs(directory: str, rng: random.Random, now: float, scale: float) -> dict[str, Any]:
    os.makedirs(directory)
    target_bytes = _scaled(_LOG_BYTES, scale, 4_096)
    # A pool of message bodies, sampled per line: varied enough that gzip works for its
    # ratio (about 5x, like real logs), and fast to generate.
    pool = [_log_body(rng) for _ in range(4_000)]
    files = []
    total = 0
    for name in _LOG_NAMES:
        path = os.path.join(directory, f"{name}.log")
        size = 0
        second = int(now - 3 * _DAY)
        lines: list[str] = []
        while size < target_bytes:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            per_second = rng.randrange(5, 40)
            for j, body in enumerate(rng.choices(pool, k=per_second)):
                line = f"{stamp}.{j * 1000 // per_second:03d}Z {name:<6} {body}\n"
                lines.append(line)
                size += len(line)
            second += rng.randrange(1, 4)
        with open(path, "w", encoding="ascii", newline="\n") as f:
            f.writelines(lines)
        files.append(path)
        total += size
    return {"directory": directory, "files": files, "bytes": total}


def _log_body(rng: random.Random) -> str:
    level = rng.choices(["INFO ", "DEBUG", "WARN ", "ERROR"], weights=[70, 20, 8, 2])[0]
    request_id = f"{rng.getrandbits(64):016x}"
    kind = rng.randrange(4)
    if kind == 0:
        method = rng.choice(["GET", "GET", "GET", "POST", "PUT", "DELETE"])
        resource = rng.choice(["orders", "users", "items", "carts", "invoices", "search"])
        status = rng.choices(
            [200, 201, 204, 301, 400, 404, 409, 500, 503], weights=[60, 8, 5, 2, 6, 8, 2, 2, 1]
        )[0]
        return (
            f"{level} http.access request_id={request_id} method={method} "
            f"path=/api/v1/{resource}/{rng.randrange(100_000)} status={status} "
            f"duration_ms={rng.lognormvariate(2.5, 0.8):.2f} bytes={rng.randrange(80, 60_000)} "
            f"client=10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        )
    if kind == 1:
        table = rng.choice(["orders", "users", "sessions", "inventory", "payments"])
        return (
            f"{level} db.query request_id={request_id} table={table} rows={rng.randrange(500)} "
            f"elapsed_ms={rng.lognormvariate(1.2, 1.0):.3f} pool_in_use={rng.randrange(1, 32)}/32"
        )
    if kind == 2:
        task = rng.choice(["send_email", "resize_image", "sync_inventory", "charge_card"])
        outcome = rng.choices(["succeeded", "retrying", "failed"], weights=[90, 7, 3])[0]
        return (
            f"{level} worker.task request_id={request_id} task={task} "
            f"attempt={rng.randrange(1, 4)} outcome={outcome} queue_depth={rng.randrange(0, 400)}"
        )
    user = rng.randrange(1, 5_000)
    event = rng.choice(["login", "logout", "token_refresh", "password_reset", "mfa_challenge"])
    return (
        f"{level} auth.event request_id={request_id} user_id={user} event={event} "
        f'session="{rng.getrandbits(128):032x}" geo={rng.choice(["DE", "US", "FR", "JP", "BR"])}'
    )


def _build_trees(directory: str, rng: random.Random, scale: float) -> dict[str, Any]:
    per_project = _scaled(_FILES_PER_PROJECT, scale, 9)
    total_files = 0
    duplicates = 0
    total_bytes = 0
    projects = []
    for p in range(_PROJECTS):
        project = os.path.join(directory, f"project-{p}")
        originals: list[tuple[str, bytes]] = []
        for i in range(per_project):
            if originals and i % 3 == 2:
                # A copy: a backup, a "copy" file or a vendored asset elsewhere in the tree.
                source_rel, content = rng.choice(originals)
                stem = os.path.basename(source_rel)
                # Every name carries i, so no copy ever overwrites another file.
                rel = rng.choice([
                    f"backup/{i:04d}-{stem}",
                    f"{os.path.dirname(source_rel)}/copy-{i:04d}-{stem}",
                    f"vendor/pkg{i % 5}/r{i:04d}/{stem}",
                ])
                duplicates += 1
            else:
                sub = rng.choice(["src", "src/core", "src/util", "assets/img", "docs", "data"])
                if i % 7 == 0:
                    # Same size as many others, different bytes: hashing must tell them apart.
                    content = rng.randbytes(4_096)
                    ext = "bin"
                else:
                    content = rng.randbytes(rng.randrange(2_000, 48_000))
                    ext = rng.choice(["py", "png", "json", "md", "csv"])
                rel = f"{sub}/file-{i:04d}.{ext}"
                originals.append((rel, content))
            path = os.path.join(project, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
            total_files += 1
            total_bytes += len(content)
        projects.append(project)
    return {
        "directory": directory,
        "projects": projects,
        "files": total_files,
        "duplicates": duplicates,
        "bytes": total_bytes,
    }


def _build_queue(directory: str, rng: random.Random, scale: float) -> dict[str, Any]:
    nodes = _scaled(_PQ_NODES, scale, 10)
    db_path = os.path.join(directory, "queue.db")
    os.makedirs(directory)
    pq_compact = _load_sibling("pq_compact")
    blob_dir = os.path.join(directory, "blobs")
    with pq_compact.ExternalPriorityQueue.create(db_path, blob_dir) as queue:
        ids = queue.push_many(
            (rng.uniform(0, 1_000), rng.randbytes(rng.randrange(512, 4_096))) for _ in range(nodes)
        )
        doomed = rng.sample(ids, round(nodes * _PQ_DELETED_FRACTION))
        for node_id in doomed:
            queue.mark_deleted(node_id)
    return {"db_path": db_path, "nodes": nodes, "deleted": len(doomed)}
