"""``taskorch serve`` and its clients: two sides around one protocol.

Shared (imported by both sides; no thread of their own):

    protocol.py         the frames after the handshake: one named type each, and their codec
    values.py           what frames carry: the per-task policy, errors, statistics
    transport.py        frames on the socket: reading them in bulk, framing a batch
    addressing.py       addresses and key files
    handshake.py        socket options, the HMAC handshake on each side, refusals

``server/``: the server process (``taskorch serve``):

    server/listener.py      the listening sockets (main thread)
    server/server.py        admission: accepting and refusing connections (accept thread)
    server/serving.py       the process's life: recovery, signals, the drain (main thread)
    server/connection.py    one client connection (its reader and writer threads)
    server/journal.py       the SQLite journal: group commits (its writer thread)
    server/journal_file.py  the journal's file: lock, schema, checks (main thread, at start)
    server/journal_rows.py  a batch's rows, many per statement (the journal's writer)
    server/schedules.py     the schedules' state in the journal
    server/registry.py      submission -> commit -> enqueue; tasks by id; recovery (server threads)
    server/credits.py       backlog slots reserved per connection (server threads)
    server/http.py          metrics, health, the API and ``dashboard.html`` (its HTTP threads)

``client/``: the application's process (``taskorch.connect()``):

    client/api.py       ``connect()``, ``Client``, ``fetch_status()`` (the caller's threads)
    client/session.py   the client's connection: its requests (callers' threads)
    client/inbox.py     the session's reader thread: what the server sends, the session's end
    client/link.py      the session's socket: sending, losing it, reconnecting
    client/requests.py  the client's request records and how answers resolve them

The client imports nothing of the server and the server nothing of the client
(``tests/test_layering.py``). Nothing here imports ``taskorch.cli``; the ``serve`` and
``status`` commands live there.
"""
