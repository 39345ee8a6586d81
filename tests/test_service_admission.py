"""Who gets to talk to ``taskorch serve``: the handshake deadline, the connection caps, refusals
a client can read, and the socket options of a connection.

A real ``Server`` on a real socket, in this process, so that its limits can be made small
(a short handshake deadline, a cap of a few connections) through its parameters. Ordering
comes from the handshake itself: a peer that has read the server's challenge has been admitted.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from _tasks import scaled, wait_until

from taskorch import TaskOrchestrator, connect
from taskorch._service.handshake import REFUSED
from taskorch._service.server.listener import bind_tcp, bind_unix
from taskorch._service.server.server import Server

R = scaled(30)  # deadlock guard only
KEY = b"k" * 32


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="to-"))  # Unix socket paths are limited to 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_server(
    make_orchestrator: Callable[..., TaskOrchestrator], short_dir: Path
) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(tcp: bool = False, **limits: Any) -> Server:
        listener = bind_tcp("127.0.0.1", 0) if tcp else bind_unix(str(short_dir / "s.sock"))
        server = Server(make_orchestrator(worker_count=1), listener, KEY, **limits)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()


def _peer(server: Server) -> socket.socket:
    """A raw connection that has been admitted: it has read the server's challenge."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(R)
    sock.connect(server.listener.address)
    (length,) = struct.unpack("!i", _recv_exactly(sock, 4))
    assert _recv_exactly(sock, length).startswith(b"#CHALLENGE#")
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _refusal(sock: socket.socket) -> str:
    """The server's refusal frame on ``sock``, then EOF: the reason it gave."""
    (length,) = struct.unpack("!i", _recv_exactly(sock, 4))
    body = _recv_exactly(sock, length)
    assert body.startswith(REFUSED), body
    assert sock.recv(1) == b""  # and it closed the connection
    return body[len(REFUSED):].decode()


def test_a_slow_drip_peer_is_cut_off_at_the_total_handshake_deadline(make_server) -> None:
    server = make_server(handshake_timeout=0.5)
    sock = _peer(server)
    # Announce the largest answer the server reads (256 bytes), then send it a byte at a
    # time, each well within any per-read timeout: only a deadline on the whole handshake
    # ends this. The pace is the attacker's; the test waits on the server closing.
    sock.sendall(struct.pack("!i", 256))
    guard = time.monotonic() + R
    for _ in range(255):
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            break
        assert time.monotonic() < guard, "the server never cut the dripping peer off"
        sock.sendall(b"x")
    else:
        raise AssertionError("the peer sent its whole answer without being cut off")
    assert "did not authenticate within 0.5 s" in _refusal(sock)
    sock.close()
    wait_until(lambda: server.connections() == ([], []), what="the connection to be forgotten")
    with connect(server.listener.address, authkey=KEY) as client:  # the server still serves
        assert client.stats().workers == 1


def test_unauthenticated_connections_beyond_the_cap_are_refused_and_a_good_client_still_connects(
    make_server
) -> None:
    server = make_server(max_unauthenticated=3, handshake_timeout=R)
    silent = [_peer(server) for _ in range(3)]  # peers without the key, saying nothing
    assert len(server.connections()[0]) == 3
    extra = _peer(server)  # admitted: the oldest silent one made room
    assert "3 connections were waiting to authenticate" in _refusal(silent[0])
    assert len(server.connections()[0]) == 3  # never more than the cap
    with connect(server.listener.address, authkey=KEY) as client:
        assert client.stats().workers == 1
        waiting, authenticated = server.connections()
        assert len(authenticated) == 1 and len(waiting) <= 3
    assert "waiting to authenticate" in _refusal(silent[1])  # it made room for the client
    for sock in silent + [extra]:
        sock.close()


def test_a_client_over_the_authenticated_cap_is_told_why(make_server) -> None:
    server = make_server(max_connections=1)
    with connect(server.listener.address, authkey=KEY) as first:
        with pytest.raises(ConnectionRefusedError,
                           match="1 clients are connected, the server's limit"):
            connect(server.listener.address, authkey=KEY)
        assert first.stats().workers == 1
    wait_until(lambda: server.connections() == ([], []), what="the first client to be forgotten")
    with connect(server.listener.address, authkey=KEY) as second:
        assert second.stats().workers == 1


def test_tcp_connections_set_tcp_nodelay_on_both_ends(make_server) -> None:
    server = make_server(tcp=True)
    with connect(server.listener.address, authkey=KEY) as client:
        client_sock = client._session._link._sock
        assert client_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        (served,) = wait_until(lambda: server.connections()[1], what="the client to authenticate")
        assert served.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert client.stats().workers == 1


def test_connect_has_a_total_deadline_against_a_silent_server(short_dir: Path) -> None:
    # Something listens and never answers: connect() gives up at its deadline, with a message.
    path = str(short_dir / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen()
    try:
        with pytest.raises(TimeoutError, match="did not complete the handshake within 0.2 s"):
            connect(path, authkey=KEY, timeout=0.2)
    finally:
        mute.close()
        os.unlink(path)
