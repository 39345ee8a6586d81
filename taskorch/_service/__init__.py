"""``taskorch serve`` and its clients, one job per module:

    protocol.py     the frames after the handshake (both sides)
    addressing.py   addresses and key files (both sides)
    handshake.py    socket options, the HMAC handshake on each side, refusals
    listener.py     the server's listening sockets (server, main thread)
    server.py       admission: accepting and refusing connections (accept thread)
    serving.py      the server process's life: recovery, signals, the drain (main thread)
    connection.py   one client connection in the server (its reader and writer threads)
    journal.py      the SQLite journal: group commits (its writer thread)
    journal_file.py the journal's file: lock, schema, checks (main thread, at start)
    schedules.py    the schedules' state in the journal
    registry.py     submission -> commit -> enqueue; tasks by id; recovery (server threads)
    credits.py      backlog slots reserved per connection (server threads)
    http.py         metrics, health, the API and the dashboard (its HTTP threads)
    session.py      the client's connection: its requests (callers' threads)
    inbox.py        the client's reader thread: what the server sends, the session's end
    link.py         the client's link: losing it, reconnecting (its reader thread)
    requests.py     the client's request records and how answers resolve them
    client.py       ``connect()``, ``Client``, ``fetch_status()`` (the caller's threads)

Nothing here imports ``taskorch.cli``; the ``serve`` and ``status`` commands live there.
"""
