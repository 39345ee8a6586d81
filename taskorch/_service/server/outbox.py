"""A connection's outbox: the frames its writer thread sends, with a byte bound on the outcomes
it holds (server process; see ``connection``).

Producers (the journal's writer, the asyncio thread) must never wait on a client, so the
outbox cannot block them. What bounds its memory instead: once the outcomes queued and not yet
sent hold ``limit`` bytes, a further outcome of an accepted task is not queued but *deferred*:
only its request number and task id are kept (its data is committed in the journal already:
outcomes are published only once committed). As the writer drains the queue below half the
limit, it fetches deferred outcomes back from the journal by id (``fetch``), a few at a time.
So a client that stops reading costs the server at most ``limit`` bytes of outcomes (plus the
one batch being written, at most BATCH_BYTES), and a few bytes per deferred task; the rest
stays on disk.

Threads: ``put`` and ``defer_or_put`` from any producer; ``take`` and ``sent`` from the writer
only; ``_lock`` guards the counters and the deferred queue, never held across a call out.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable

from taskorch._service.protocol import Done, ServerFrame, done_frame, rejected_frame
from taskorch._service.server.callbacks import OneByOne

#: Default bound on the outcome bytes queued for one connection and not yet sent.
OUTBOX_LIMIT = 64 * 1024 * 1024
#: Most bytes of outcomes the writer takes into one write (and so holds twice: as frames
#: and as the bytes being sent).
BATCH_BYTES = 4 * 1024 * 1024
#: Most frames in one list put at once (``put_plain_all``, ``defer_or_put_all``): a batch the
#: writer takes holds at most two such lists' worth of small outcomes beyond its ``most``.
PUT_MOST = 256
#: Most deferred outcomes being fetched from the journal at once.
FETCHING = 8


#: Outcomes smaller than this count as 0 bytes (they cost no lock; what bounds them is the
#: number of tasks in flight).
SMALL = 4096


def outcome_bytes(message: Any) -> int:
    """What an S_DONE holds in memory, roughly: its data's bytes (0 below SMALL)."""
    if isinstance(message, Done):
        size = data_bytes(message.data)
        return size if size >= SMALL else 0
    return 0


def data_bytes(data: Any) -> int:
    """An outcome's data (S_DONE's), roughly: its bytes and strings."""
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(data, tuple):
        return sum(len(x) for x in data if isinstance(x, (bytes, str)))
    return 0


class Outbox:
    def __init__(self, fetch: Callable[[int, int], None], limit: int = OUTBOX_LIMIT) -> None:
        # ``fetch(req, task_id)``: have the outcome of ``task_id`` read from the journal and
        # handed back with ``put_fetched`` (the connection, through the registry).
        self._fetch = fetch
        self.limit = limit
        # Each frame with its outcome_bytes, counted once (writer: what it took last, ``_taken``),
        # or a list of frames put at once (``*_all``: a journal batch's) with their sum.
        self._queue: queue.SimpleQueue[tuple[ServerFrame | list[ServerFrame] | None, int]] = (
            queue.SimpleQueue())
        self._taken = 0
        self._lock = threading.Lock()
        self._bytes = 0  # outcome bytes queued and not yet sent
        self._deferred: collections.deque[tuple[int, int]] = collections.deque()
        self._fetching = 0  # fetches asked for and not yet put back

    def put(self, message: ServerFrame | None) -> None:
        """Queue a frame (or the writer's stop sentinel, None); never blocks."""
        size = outcome_bytes(message)
        if size:
            with self._lock:
                self._bytes += size
        self._queue.put((message, size))

    def put_plain(self, message: ServerFrame) -> None:
        """``put`` for a frame that holds no outcome (S_ACCEPTED: one per task, no size read)."""
        self._queue.put((message, 0))

    def put_plain_all(self, messages: list[ServerFrame]) -> None:
        """``put_plain`` for many frames, in puts of at most PUT_MOST."""
        for start in range(0, len(messages), PUT_MOST):
            self._queue.put((messages[start:start + PUT_MOST], 0))

    def defer_or_put_all(self, outcomes: list[tuple[Done, int]]) -> None:
        """``defer_or_put`` for many outcomes (each with its task id): the small ones, while
        none is deferred (the common case), put as ``put_plain_all`` puts them."""
        small: list[ServerFrame] = []
        for message, task_id in outcomes:
            data = message.data
            if not self._deferred and (len(data) if type(data) is bytes
                                       else data_bytes(data)) < SMALL:
                small.append(message)
            else:
                self.defer_or_put(message, task_id)
        self.put_plain_all(small)

    def defer_or_put(self, message: Done, task_id: int) -> None:
        """Queue the outcome of task ``task_id``, or keep only its id if the outbox is over its
        bound (or outcomes are deferred already: they go first)."""
        data = message.data  # (outcome_bytes, read inline: once per task)
        size = len(data) if type(data) is bytes else data_bytes(data)
        if size < SMALL:
            size = 0
        if not size and not self._deferred:  # (small: no lock, see SMALL)
            self._queue.put((message, 0))
            return
        with self._lock:
            if self._deferred or (self._bytes and self._bytes + size > self.limit):
                self._deferred.append((message.req, task_id))
                return
            self._bytes += size
        self._queue.put((message, size))

    def put_fetched(self, message: ServerFrame) -> None:
        """A deferred outcome, read back from the journal."""
        with self._lock:
            self._fetching -= 1
        self.put(message)

    def take(self, most: int) -> list[ServerFrame | None]:
        """The writer: wait for a frame, then take what else is queued, up to ``most`` frames
        (more if a list put at once holds more) or BATCH_BYTES of outcomes (the sentinel ends
        a batch)."""
        message, size = self._queue.get()
        batch: list[ServerFrame | None] = []
        while True:
            if type(message) is list:
                batch += message
            else:
                batch.append(message)  # type: ignore[arg-type]
            if message is None or len(batch) >= most or size >= BATCH_BYTES:
                break
            try:
                message, n = self._queue.get_nowait()
            except queue.Empty:
                break
            size += n
        self._taken = size
        return batch

    def sent(self) -> None:
        """The writer sent what it took last: count it out, and fetch deferred outcomes while
        the queue is below half its bound."""
        size, self._taken = self._taken, 0
        if not size and not self._deferred:
            return
        fetch: list[tuple[int, int]] = []
        with self._lock:
            self._bytes -= size
            while (self._deferred and self._fetching < FETCHING
                   and self._bytes < self.limit // 2):
                fetch.append(self._deferred.popleft())
                self._fetching += 1
        for req, task_id in fetch:
            self._fetch(req, task_id)


class Fetched(OneByOne):
    """The registry's ``Sink`` for deferred outcomes read back from the journal: each goes
    into the outbox (an outcome pruned meanwhile: its rejection)."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def outcome(self, req: int, outcome: Any) -> None:
        self._outbox.put_fetched(done_frame(req, outcome.outcome, outcome.attempts,
                                            outcome.seconds, outcome.data))

    def rejected(self, req: int, error: BaseException) -> None:
        self._outbox.put_fetched(rejected_frame(req, error))


class ByteBound:
    """Bytes of large outcomes queued for a consumer thread (the journal's writer): past
    ``limit``, a producer waits until the consumer releases some, while ``may_wait()`` (the
    consumer is alive, and is not the producer itself): back-pressure on whoever ends tasks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0
        self._room = threading.Condition()

    def add(self, size: int, may_wait: Callable[[], bool]) -> None:
        with self._room:
            self.queued += size
            while self.queued > self.limit and may_wait():
                self._room.wait(1.0)  # (re-checks may_wait: the consumer may have ended)

    def release(self, size: int) -> None:
        with self._room:
            self.queued -= size
            self._room.notify_all()
