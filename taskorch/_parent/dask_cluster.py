"""Parent process: the Dask backend's helpers that are not the dispatcher: the error of an
attempt lost with its Dask worker, and the listener for worker joins and departures that the
dispatchers sharing one ``distributed.Client`` share. Runs on the dispatcher thread, except the
listener's handler, which runs on the Client's event-loop thread (Dask's, not ours).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from taskorch._errors import WorkerCrashedError


def worker_lost_error(
    pid: int | None, address: str, attempts: int, why: str, worker_lost: bool,
) -> WorkerCrashedError:
    """The error of an attempt lost with its Dask worker (or cancelled on the cluster)."""
    error = WorkerCrashedError(pid, None, attempts, why)
    where = f"{address}, pid {pid}" if pid is not None else address
    if worker_lost:
        text = (
            f"the Dask worker running this task ({where}) was lost: {why}; "
            f"{attempts} attempt(s) spent. A segfault or os._exit in the task, an out-of-memory "
            "kill, a signal from outside or a lost connection are the usual causes; other tasks "
            "were not affected"
        )
    else:
        text = f"{why}; {attempts} attempt(s) spent"
    # WorkerCrashedError's own text speaks of an exit code, unknown for a remote process.
    error.args = (text,)
    return error


class ClusterEventsListener:
    """Worker joins and departures from the scheduler's "all" topic, for one dispatcher.

    A Client keeps one handler per topic, so the dispatchers that share a Client share one
    handler (``_fan_out``), which also calls a handler someone had installed before us; the
    last listener to leave restores it. ``_lock`` guards ``_by_client``; handlers run on the
    Client's loop thread and copy the listener list under the lock.
    """

    _lock = threading.Lock()
    # client id -> (the Client, the handler we replaced or None, listeners)
    _by_client: dict[str, tuple[Any, Any, list[Callable[[Any], None]]]] = {}

    def __init__(self, client: Any, listener: Callable[[Any], None]) -> None:
        self._client = client
        self._listener = listener
        with self._lock:
            entry = self._by_client.get(client.id)
            if entry is None:
                previous = getattr(client, "_event_handlers", {}).get("all")
                entry = (client, previous, [])
                self._by_client[client.id] = entry
                client.subscribe_topic("all", self._fan_out_for(client.id))
            entry[2].append(listener)

    @classmethod
    def _fan_out_for(cls, client_id: str) -> Callable[[tuple[float, Any]], Any]:
        def fan_out(event: tuple[float, Any]) -> Any:
            with cls._lock:
                entry = cls._by_client.get(client_id)
                listeners = list(entry[2]) if entry is not None else []
                previous = entry[1] if entry is not None else None
            msg = event[1]
            if isinstance(msg, dict) and msg.get("action") in ("add-worker", "remove-worker"):
                for listener in listeners:
                    listener(msg)
            if previous is not None:
                return previous(event)
            return None

        return fan_out

    def close(self) -> None:
        client = self._client
        with self._lock:
            entry = self._by_client.get(client.id)
            if entry is None or self._listener not in entry[2]:
                return
            entry[2].remove(self._listener)
            if entry[2]:
                return
            del self._by_client[client.id]
            previous = entry[1]
        if client.status != "running":
            return
        if previous is not None:
            client.subscribe_topic("all", previous)
        else:
            client.unsubscribe_topic("all")
