"""Parent process: the Dask dispatcher's line to the cluster (``ClusterLink``), the listener
for worker joins and departures, and the errors of an attempt lost with its Dask worker or
past its hard timeout.

````ClusterLink``'s methods run on the dispatcher thread and only *start* requests on the
``distributed.Client``'s event-loop thread (Dask's, not ours): submitting, gathering,
cancelling, recalling, asking for the workers. A worker restart is the exception: it goes
through ``Client.restart_workers``, a public blocking call that waits for the worker to come
back (seconds), so it runs on a short-lived thread of its own, "taskorch-dask-restart" (a
daemon: a restart still in progress must not keep the interpreter alive), which only calls the
Client and puts the answer into the inbox. What comes back, and the scheduler's events,
are put into the dispatcher's inbox by code on that loop thread, which never takes the backlog
lock, so a slow dispatcher can never stall the Client's communications.

The inbox (``queue.SimpleQueue``): producers are the Client's loop thread and ``wake()``; the
consumer is the dispatcher thread. It is unbounded but stays small: at most a few events and
one outcome per call handed over (their number is bounded by the dispatcher), plus wakeups.
Its entries, by their first element:
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable, Coroutine

from taskorch._errors import TaskTimeoutError, WorkerCrashedError
from taskorch._parent.dask_inbox import (
    ClusterChanged,
    EventArrived,
    GatherEnded,
    InboxEntry,
    RecallAnswer,
    Restarted,
    WorkersAnswer,
)
from taskorch._wire import (
    Event,
    Failed,
    Ready,
    Recalled,
    Reported,
    Retiring,
    Succeeded,
    decode_event,
)

log = logging.getLogger("taskorch")

#: How long closing our own Client may take at the end.
CLIENT_CLOSE_TIMEOUT = 5.0
#: How long a worker restart may take, from the request until the cluster has its number of
#: workers back. The nanny first asks the worker to close and waits 4 s for it (a task stuck
#: in C keeps it from closing), then kills it and starts a new one (a second or two): longer
#: only delays giving up on a nanny that cannot start its worker again.
RESTART_TIMEOUT = 60.0

Inbox = queue.SimpleQueue[InboxEntry]


class ClusterLink:
    """A ``distributed.Client`` (opened here for an address, or the user's, never closed
    here), the dispatcher's own events topic, and the requests the dispatcher makes."""

    def __init__(
        self, target: Any, connect_timeout: float | None, topic: str, inbox: Inbox,
        future_of: Callable[[int], Any],
    ) -> None:
        self._target = target  # a scheduler address, or a distributed.Client
        self._connect_timeout = connect_timeout
        self.topic = topic
        self._inbox = inbox
        self._future_of = future_of  # sub_id -> its distributed.Future or None (any thread)
        self.client: Any = None  # set by open(), before anything is submitted
        self._own_client = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cluster_events: ClusterEventsListener | None = None

    @property
    def status(self) -> str:
        return str(self.client.status) if self.client is not None else "closed"

    def open(self) -> dict[str, int]:
        """Connect (or adopt the given Client); the workers' threads, by address."""
        import distributed

        if isinstance(self._target, str):
            kwargs: dict[str, Any] = {"set_as_default": False}
            if self._connect_timeout is not None:
                kwargs["timeout"] = self._connect_timeout
            client_class: Any = distributed.Client  # untyped constructor
            self.client = client_class(self._target, **kwargs)
            self._own_client = True
        else:
            self.client = self._target
            if self.client.status != "running":
                raise RuntimeError(f"the Client is {self.client.status}")
        self._loop = self.client.loop.asyncio_loop
        # Subscribed before anything is submitted: both go through the client's one stream to
        # the scheduler, in order, so no event of ours can precede the subscription.
        self.client.subscribe_topic(self.topic, self._on_task_event)
        inbox = self._inbox
        self._cluster_events = ClusterEventsListener(
            self.client, lambda msg: inbox.put(ClusterChanged(msg)))
        return dict(self.client.nthreads())

    def describe_failure(self, exc: BaseException) -> str:
        where = self._target if isinstance(self._target, str) else repr(self._target)
        return f"could not use the Dask cluster at {where}: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Undo open (at the dispatcher's end, or after a failed start); idempotent."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if self._cluster_events is not None:
                self._cluster_events.close()
            if client.status == "running":
                client.unsubscribe_topic(self.topic)
        except Exception:
            log.debug("could not unsubscribe from the Dask scheduler's events", exc_info=True)
        if self._own_client:
            try:
                client.close(timeout=CLIENT_CLOSE_TIMEOUT)
            except Exception:
                log.warning("closing the Dask client failed", exc_info=True)

    # -- requests (dispatcher thread) ------------------------------------------------------

    def submit(
        self, address: str, sub_ids: list[int], keys: list[str], payloads: list[bytes],
        policies: list[bytes | None], attempts: list[int], default_policy: bytes,
    ) -> list[Any]:
        """Pin calls to one worker; their outcomes come to the inbox. Raises if the Client
        cannot take them."""
        from taskorch._worker.dask import run_call

        futures: list[Any] = self.client.map(
            run_call, sub_ids, payloads, policies, attempts,
            key=keys,
            workers=[address],
            allow_other_workers=False,
            # A new scheduler "generation" per submission, so that a worker runs our calls in
            # the order handed over: within Dask's default 100 ms, two submissions' tasks tie
            # on priority and may run in either order.
            fifo_timeout="0ms",
            retries=0,
            pure=False,
            topic=self.topic,
            default_policy=default_policy,
        )
        # Each gather ends with an outcome, or cancelled: by an inline outcome's release, by
        # our cancel, or when the Client closes (it cancels every future it holds).
        pairs = list(zip(sub_ids, futures))
        self._call_soon(lambda: self._collect(pairs))
        return futures

    def cancel(self, futures: list[Any]) -> None:
        """Cancel Dask tasks (asynchronously): one not started is dropped; one running runs
        on, its result discarded (Dask cannot stop it)."""
        futures = [f for f in futures if f is not None]
        client = self.client
        if futures and client is not None and client.status == "running":
            self._call_soon(lambda: client.cancel(futures, asynchronous=True, reason="taskorch"))

    def release(self, futures: list[Any]) -> None:
        for future in futures:
            if future is not None:
                future.release()  # thread-safe: hops to the Client's loop

    def ask_workers(self, probe: int) -> None:
        """Ask the scheduler for its workers; the answer comes to the inbox as ``WorkersAnswer``."""
        inbox = self._inbox

        def on_done(result: Any, exc: BaseException | None) -> None:
            # A failed request answers "nothing known": the next probe will tell.
            inbox.put(WorkersAnswer(None if exc is not None else dict(result), probe))

        client = self.client
        self._call_soon(lambda: client.nthreads(asynchronous=True), on_done)

    def recall(self, address: str, calls: list[tuple[int, str]]) -> None:
        """Take back calls (sub_id, key) that ``address`` has not started; the answer comes
        to the inbox as ``RecallAnswer``."""
        from taskorch._worker.dask import recall_unstarted

        inbox = self._inbox

        def on_done(result: Any, exc: BaseException | None) -> None:
            taken = None if exc is not None else result.get(address)
            inbox.put(RecallAnswer(address, taken if isinstance(taken, list) else None))

        client, topic = self.client, self.topic
        self._call_soon(lambda: client.run(
            recall_unstarted, topic, calls, workers=[address], on_error="return",
            asynchronous=True,
        ), on_done)

    def restart_worker(self, address: str) -> None:
        """Have the worker's nanny restart the worker process at ``address``; the answer comes
        to the inbox as ``Restarted``, once the cluster has its number of workers back. A worker
        without a nanny is left alone (``Client.restart_workers`` refuses it: ValueError)."""
        inbox, client = self._inbox, self.client

        def restart() -> None:
            error: BaseException | None = None
            try:
                status = client.restart_workers(
                    [address], timeout=RESTART_TIMEOUT, raise_for_error=False)
                if status.get(address) != "OK":
                    error = RuntimeError(f"the scheduler answered {status.get(address)!r}")
            except BaseException as exc:  # noqa: BLE001 - every failure is an answer
                error = exc
            inbox.put(Restarted(address, error))

        threading.Thread(target=restart, name="taskorch-dask-restart", daemon=True).start()

    # -- on the Client's event loop thread: put into the inbox, nothing else -----------------

    def _on_task_event(self, event: tuple[float, Any]) -> None:
        raw = event[1].get("ev")
        if not raw:
            return
        ours: Event | None
        try:
            ours = decode_event(raw)
        except ValueError:
            ours = None
        if ours is None or isinstance(ours, (Ready, Retiring, Recalled, Reported)):
            log.error("ignored an event that taskorch's Dask worker function does not send (is "
                      "the same taskorch installed on every Dask worker?): %r", raw)
            return
        self._inbox.put(EventArrived(ours))
        if isinstance(ours, (Succeeded, Failed)):
            # An outcome sent inline: release the call's Dask future, so that the gather
            # waiting on it ends (cancelled) instead of fetching the task's None; that runs
            # before the scheduler's "key-in-memory" message, which follows the event on the
            # same stream. release() is idempotent and thread-safe.
            future = self._future_of(ours.task_id)
            if future is not None:
                future.release()

    async def _collect(self, pairs: list[tuple[int, Any]]) -> None:
        """Wait for each submitted call's outcome and post it (concurrent gathers of one
        Client are merged into few requests by distributed)."""
        client = self.client
        inbox = self._inbox

        async def one(sub_id: int, future: Any) -> None:
            try:
                value = await client.gather(future, asynchronous=True)
            except BaseException as exc:  # cancelled (by us, or not), KilledWorker, a lost client
                inbox.put(GatherEnded(sub_id, None, exc))
            else:
                if value is None:  # the outcome came inline, in an event
                    return
                try:
                    outcome = decode_event(value)
                except ValueError as exc:  # failed "outside taskorch's worker function"
                    inbox.put(GatherEnded(sub_id, None, exc))
                else:
                    inbox.put(GatherEnded(sub_id, outcome, None))

        await asyncio.gather(*(one(s, f) for s, f in pairs), return_exceptions=True)

    def _call_soon(
        self, make: Callable[[], Coroutine[Any, Any, Any]],
        on_done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        """Run the coroutine ``make()`` returns on the Client's loop; ``on_done(result, exc)``
        runs there too (or here, at once, if it cannot even start: the Client may be
        reconnecting, or closed)."""
        assert self._loop is not None
        coro = None
        try:
            coro = make()
            cf = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except Exception as exc:
            if coro is not None:
                coro.close()
            if on_done is not None:
                on_done(None, exc)
            else:
                log.debug("could not send a request to the Dask scheduler: %r", exc)
            return

        def done(cf: concurrent.futures.Future[Any]) -> None:
            exc: BaseException | None
            exc = asyncio.CancelledError() if cf.cancelled() else cf.exception()
            if on_done is not None:
                on_done(None if exc is not None else cf.result(), exc)
            elif exc is not None:
                log.debug("a Dask request failed: %r", exc)

        cf.add_done_callback(done)


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


def hard_timeout_error(item_attempts: int, timeout: float, kill_grace: float, address: str,
                       pid: int | None) -> TaskTimeoutError:
    """The error of an attempt that ran ``kill_grace`` past its timeout on a Dask worker."""
    where = f"{address}, pid {pid}" if pid is not None else address
    return TaskTimeoutError(
        f"attempt {item_attempts} ran past its {timeout:g} s timeout and did not respond to the "
        f"in-process interrupt {kill_grace:g} s later (stuck in C code or a blocking call); "
        f"the Dask worker running it ({where}) is restarted"
    )


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
