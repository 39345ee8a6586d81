"""``taskorch serve`` and its clients, one job per module:

    protocol.py     the frames after the handshake (both sides)
    addressing.py   addresses and key files (both sides)
    handshake.py    socket options, the HMAC handshake on each side, refusals
    listener.py     the server's listening socket (server, main thread)
    server.py       admission and the server process's life (accept thread, main thread)
    connection.py   one client connection in the server (its reader and writer threads)
    session.py      the client's connection (callers' threads and its reader thread)
    client.py       ``connect()``, ``Client``, ``fetch_status()`` (the caller's threads)

Nothing here imports ``taskorch.cli``; the ``serve`` and ``status`` commands live there.
"""
