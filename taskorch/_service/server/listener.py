"""The server's listening socket: binding a Unix socket or a TCP port, and removing the socket
file afterwards (server process, main thread; ``close()`` also from the accept thread's owner).

A Unix socket's directory is created private (0700); a socket file left by a server that died
is removed, one a live server listens on is not. TCP is refused on a non-loopback address
unless the caller allows remote clients. Errors are ValueError with a message for the operator.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from typing import Any

from taskorch._service.addressing import describe_address

#: The kernel's queue of connections not yet accepted (listen()).
LISTEN_BACKLOG = 128


class Listener:
    """A bound, listening, non-blocking socket and the address it is bound to."""

    def __init__(
        self, sock: socket.socket, address: str | tuple[str, int], inode: int | None
    ) -> None:
        self.sock = sock
        self.address = address  # the socket path, or (host, port) with the port bound
        self.where = describe_address(address)
        self._inode = inode  # of our socket file (None for TCP): never remove another's

    @property
    def unix_path(self) -> str | None:
        return self.address if isinstance(self.address, str) else None

    def close(self) -> None:
        """Close the socket and remove our socket file. Idempotent."""
        self.sock.close()
        path = self.unix_path
        if path is None:
            return
        try:
            if os.lstat(path).st_ino == self._inode:  # not replaced by another server since
                os.unlink(path)
        except FileNotFoundError:
            pass


def resolve_tcp(host: str, port: int, *, allow_remote: bool, why: str,
                ) -> tuple[socket.AddressFamily, Any, bool]:
    """Where to listen: (family, socket address, loopback?). The one rule for every TCP
    listener of ``serve`` (the service, the HTTP side): a non-loopback address is refused
    unless ``allow_remote``, with ``why`` it is dangerous there. ValueError if it does not
    resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    ip = ipaddress.ip_address(sockaddr[0])
    if not ip.is_loopback and not allow_remote:
        raise ValueError(
            f"refusing to listen on {host}:{port} ({ip}), which other machines can reach: "
            f"{why}. Use 127.0.0.1, or pass --allow-remote")
    return family, sockaddr, ip.is_loopback


def bind_tcp(host: str, port: int, *, allow_remote: bool = False) -> Listener:
    """Listen on TCP. ValueError for an address that does not resolve, cannot be bound, or is
    not loopback (unless ``allow_remote``: anyone with the key could then run code here)."""
    shown = f"{host}:{port}"
    family, sockaddr, _ = resolve_tcp(
        host, port, allow_remote=allow_remote,
        why="any client holding the key could run code as this user, and the traffic is not "
            "encrypted (a Unix socket is the other choice)")
    try:
        sock = socket.create_server(sockaddr[:2], family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise ValueError(f"cannot listen on {shown}: {exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    sock.setblocking(False)
    return Listener(sock, (bound_host, bound_port), None)


def bind_unix(path: str) -> Listener:
    """Listen on a Unix socket at ``path`` (its directory created with mode 0700 if missing)."""
    path = os.path.abspath(path)
    if len(os.fsencode(path)) >= 108:
        raise ValueError(
            f"the socket path {path!r} is too long for a Unix socket (107 bytes at most)"
        )
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise ValueError(f"cannot create the socket's directory {directory!r}: {exc}") from exc
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {path!r}: {exc}") from exc
    sock.setblocking(False)
    return Listener(sock, path, os.lstat(path).st_ino)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a server that died is removed; a live server's is not touched."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a server that died
        return
    except OSError:
        return  # let bind() report it
    finally:
        probe.close()
    raise ValueError(f"another server is listening on {path!r}")
