"""What a served connection needs of the server that accepted it (server process; see
``connection``). The connection's own type is a parameter (``Connection``), so that this
module imports nothing of that one."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._service.server.operator import Operator
    from taskorch._service.server.registry import TaskRegistry


#: The connection's type (``connection.ServedConnection``).
Connection = TypeVar("Connection", contravariant=True)


class Host(Protocol[Connection]):
    """What a connection needs of the server that accepted it (``server.Server``, which
    imports the connection's module; that one imports nothing of it). ``promote``, ``forget`` and
    ``recall_credits`` are called from the connection's reader thread."""

    @property
    def orchestrator(self) -> TaskOrchestrator: ...
    @property
    def registry(self) -> TaskRegistry: ...
    @property
    def operator(self) -> Operator: ...  # one per server: its retries' (client, sub) numbering
    @property
    def authkey(self) -> bytes: ...
    @property
    def info(self) -> dict[str, Any]: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...  # the server's asyncio thread's
    @property
    def stopping(self) -> bool: ...

    def promote(self, connection: Connection) -> bool:
        """The peer authenticated: True if it may be served (else it was refused)."""

    def forget(self, connection: Connection) -> None:
        """The connection has ended."""

    def recall_credits(self) -> None:
        """The backlog was found full: ask every client for the credits it holds."""
