"""Where a ``taskorch serve`` pool listens and which key opens it: shared by server and client.

No thread of its own: the server's main thread (at start) and the client's caller (in
``connect()``) call these. Errors are ValueError (a malformed address, an unusable key file)
or OSError (the file system said no); the CLI turns them into usage errors.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Union

#: An address: a Unix socket path, ``(host, port)``, or ``"host:port"``.
Address = Union[str, "os.PathLike[str]", tuple[str, int]]


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8765), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def normalize_address(address: Address) -> str | tuple[str, int]:
    """A socket path (str) or ``(host, port)``. A str is ``host:port`` when it has no ``/``
    and ends with ``:digits``; anything else is a path (``./pool.sock`` for a relative one)."""
    if isinstance(address, tuple):
        host, port = address
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"a TCP address is (host: str, port: int), got {address!r}")
        return host, port
    text = os.fspath(address)
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"an address is a socket path, (host, port) or 'host:port', got {address!r}"
        )
    if "/" not in text and ":" in text:
        try:
            return parse_tcp_address(text)
        except ValueError:
            pass
    return os.path.abspath(text)


def describe_address(address: str | tuple[str, int]) -> str:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[v6]:PORT``), as logs and messages show it."""
    if isinstance(address, tuple):
        host, port = address
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    return f"unix:{address}"


def default_authkey_path(address: str | tuple[str, int]) -> Path:
    """Where the key lives when none is named: next to a Unix socket (``PATH.authkey``, in the
    socket's private directory), or one per user for TCP (``~/.config/taskorch/authkey``)."""
    if isinstance(address, str):
        return Path(address + ".authkey")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config, "taskorch", "authkey")


def default_journal_path(address: str | tuple[str, int]) -> Path | None:
    """Where ``taskorch serve`` keeps its journal unless told: under the user's state
    directory (``$XDG_STATE_HOME/taskorch``, else ``~/.local/state/taskorch``), named after the
    address, so that a restarted server on the same address finds it. Not beside the socket:
    sockets usually live under /run, which a reboot empties. None for TCP port 0 (a new
    address each start: nothing could find the journal again)."""
    if isinstance(address, tuple):
        host, port = address
        if port == 0:
            return None
        name = f"tcp-{host}-{port}"
    else:
        name = "unix" + os.path.abspath(address).replace(os.sep, "-")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return Path(state, "taskorch", f"{name}.journal")


def read_authkey(path: Path) -> bytes:
    """The key file's bytes, as they are (no stripping: both sides read the same file)."""
    key = path.read_bytes()
    if not key:
        raise ValueError(f"the authkey file {str(path)!r} is empty")
    return key


def load_or_create_authkey(path: Path) -> tuple[bytes, bool]:
    """The server's key in ``path``, created (32 random bytes, mode 0600) if missing; returns
    (key, created). ValueError for a key readable or writable by others, or another user's:
    whoever holds it can run code as this user."""
    created = False
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                try:
                    os.link(tmp, path)  # atomic, and never replaces a key another process just made
                    created = True
                except FileExistsError:
                    pass
            finally:
                os.unlink(tmp)
        info = path.stat()
        key = read_authkey(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read or create the authkey file: {exc}") from exc
    mode = info.st_mode
    if info.st_uid != os.getuid():
        raise ValueError(
            f"the authkey file {str(path)!r} belongs to another user (uid {info.st_uid}), who "
            "could then run code as this user; use a key file of your own")
    if mode & 0o077:
        raise ValueError(
            f"the authkey file {str(path)!r} is accessible to other users (mode "
            f"{stat.S_IMODE(mode):04o}); anyone who can read it can run code as this user. "
            f"Run: chmod 600 {path}")
    return key, created
