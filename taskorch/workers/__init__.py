"""Ready-made job modules that taskorch workers run.

Runs in: worker processes (each job function), and in the parent only to build the target
string.  Every module here is imported inside a freshly started child, so each one imports
only the standard library, has no import-time side effects and no shared helper module: a
child pays for exactly the job it runs.  This package imports nothing on purpose.

Each job takes plain JSON-friendly arguments (str paths, ints, floats, bools), returns a
JSON-serializable ``dict`` describing what it did, and is idempotent: a retry after a crash
or a per-attempt timeout at any point completes the work, and a second run reports zero work.
Bad input raises ``ValueError`` (or ``TypeError`` for a wrong type, ``FileNotFoundError`` for
a missing path), which a retry policy should treat as permanent.

The jobs, as ``"module:function"`` targets:

- ``taskorch.workers.sqlite_purge:purge_expired``: delete expired rows of a SQLite table in
  bounded chunks (one short write transaction each), then VACUUM.
- ``taskorch.workers.log_rotate:compress_file`` and ``...:compress_logs``: gzip log files
  atomically (temp file + ``os.replace``), remove the originals, keep the N newest archives.
- ``taskorch.workers.dedupe:find_duplicates`` and ``...:remove_duplicates``: find files with
  equal content (size groups, then BLAKE2b) and delete all but the lexicographically first.
- ``taskorch.workers.pq_compact:purge_deleted``: physically remove the nodes (rows and blob
  files) that an ``ExternalPriorityQueue`` store marked deleted on its hot path.
- ``taskorch.workers.demo_workload:build`` and ``...:jobs``: build a realistic workload in a
  directory and list the job calls to run on it (for the demo and the benchmark).
"""
