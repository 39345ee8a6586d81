"""The service protocol: ``taskorch serve`` <-> ``taskorch.connect()``. Imported by both sides.

No thread of its own: its functions run in the server's connection threads and in the
client's callers and reader thread.

A second boundary, between processes that share nothing but a socket (a Unix socket, or TCP
on loopback unless the operator allowed remote clients). Server side: ``_service.server``
(per connection, a reader thread and a writer thread). Client side: ``_service.client`` (the
caller's threads send and wait for their answer; one reader thread receives).

Transport: ``multiprocessing.connection`` framing (a 4-byte big-endian signed length, or -1
and an 8-byte length, then the body). First, multiprocessing's HMAC challenge, both ways
(the server runs ``deliver_challenge`` then ``answer_challenge``, the client the reverse),
whose frames are read with a 256-byte limit: nothing an unauthenticated peer sends reaches
pickle. After that every frame is one pickled tuple whose first element is its tag (read in
bulk by ``transport.FrameReader``). A frame longer than SERVICE_MAX_FRAME is refused from
its length alone (the body is never read) and the connection closed; senders check first and
turn an oversized frame into an error for the one call concerned (``SerializationError``),
nothing sent.

Client frames hold builtins only (tuple, bytes, str, int, float, bool, None): the server
decodes them with ``decode_client_frame``, an unpickler that refuses every global, so nothing
a client sends imports a module or runs code in the server. The call travels as
``encode_call()`` bytes that the server hands to a worker unopened; the per-task policy as
``encode_policy()`` bytes for the worker plus the plain fields the parent needs
(``values.WirePolicy``; ``values`` also encodes errors and statistics).

In code, each frame below is a named type whose fields are the tuple's, the tag first
(``Submit`` for C_SUBMIT; ``Withdraw``, ``StatsRequest``, ``ResultRequest``, ``CreditReturn``,
``TriggerRequest``; ``Hello``, ``Accepted``, ``Dropped``, ``Rejected``, ``Done``,
``StatsReply``, ``CreditGrant``, ``CreditRecall``), built by one constructor each
(``submit_frame()``...) and read by field name. ``codec`` turns them into plain tuples and
back (the server's unpickler accepts builtins only); S_BATCH exists on the wire only
(``transport.frame_batch``; ``codec.decode_server_frames`` returns its messages).

server -> client, once, right after authentication:

    (S_HELLO, version, info)              ``version``: SERVICE_VERSION (the client refuses
                                          another); ``info``: a dict of plain data: pid,
                                          taskorch (version), python ("3.11"), workers,
                                          max_backlog, drop

client -> server (``req``: an int the client picks, unique among its requests for the life of
the client, across reconnections):

    (C_SUBMIT, req, payload, policy, wait, client, retry, credit, timing, key, after)
                                          ``payload``: ``encode_call()`` bytes; ``policy``:
                                          None (the server's policy) or a WirePolicy;
                                          ``wait`` False: run() semantics, answered as soon as
                                          the task is journaled (ACCEPTED) or at once
                                          (DROPPED or REJECTED); True: run_async() semantics,
                                          answered when there is room and it is journaled.
                                          ``client``: the client's token (16 random bytes,
                                          the same over every connection of one Client);
                                          ``(client, req)`` names the submission: the server
                                          journals it once. ``retry`` True: this submission
                                          may have been sent on an earlier connection; if
                                          the journal has it, the answer is its ACCEPTED (and
                                          later DONE) again, nothing new is enqueued.
                                          ``credit`` True: run() spent one of its credits
                                          (below) and did not wait: the server journals the
                                          task in that slot (never QueueFullError); its
                                          answer still comes (ACCEPTED, or REJECTED with a
                                          JournalError or a closed error), the caller's
                                          future already returned. ``timing``, ``key``,
                                          ``after``: ``options()`` (``SubmitOptions``; the
                                          journal keeps them). A ``key`` of an unfinished
                                          task: ACCEPTED with that task's id, nothing new is
                                          enqueued. ``after``: ids of tasks journaled before
                                          it; another id is REJECTED with a ValueError
    (C_RETURN, n)                         the answer to S_RECALL: ``n`` credits not spent,
                                          given back (the client now holds none)
    (C_RESULT, req, task_id, wait)        wait for task ``task_id``'s outcome (any client's):
                                          answered by S_DONE when it ends (at once if it
                                          has), or S_REJECTED with TaskNotFoundError; with
                                          ``wait`` False, a task that has not ended is
                                          answered at once: S_REJECTED with TimeoutError
    (C_WITHDRAW, req)                     the client stopped waiting (run_async() cancelled):
                                          a request still waiting for room is dropped
                                          (nothing enqueued); one already accepted is
                                          cancelled if it has not left the backlog; a C_RESULT
                                          wait is dropped. No answer.
    (C_STATS, req)                        answered by S_STATS
    (C_TRIGGER, req, name)                run the schedule ``name`` now (``taskorch trigger``):
                                          answered by S_STATS with ``{"triggered": name,
                                          "submitted": bool}`` (False: the backlog was full),
                                          or S_REJECTED (no such schedule)
    (C_ADMIN, req, op, args)              an operator's request: see ``operations``

server -> client:

    (S_CREDIT, n)                         ``n`` more credits (after S_HELLO)
    (S_RECALL,)                           give back the credits not spent (C_RETURN)
    (S_ACCEPTED, req, task_id, grant)     committed to the journal and in the backlog as task
                                          ``task_id`` (the journal's id: stable across server
                                          restarts); its S_DONE always comes later on the same
                                          connection, unless the connection ends first.
                                          ``grant``: more credits (0 or more)
    (S_DROPPED, req)                      backlog full and the server runs with --drop:
                                          run() returns None
    (S_REJECTED, req, error)              ``error``: ``encode_service_error()`` bytes of the
                                          exception the caller raises (QueueFullError,
                                          OrchestratorClosedError, OrchestratorBrokenError,
                                          SerializationError, JournalError: the journal
                                          could not commit it, TaskNotFoundError)
    (S_DONE, req, outcome, attempts, seconds, data)
                                          the server's TaskFuture resolved; ``attempts`` and
                                          ``seconds`` as on it; by ``outcome``, ``data`` is:
                                            O_RESULT     the pickled return value
                                            O_RAISED     ``encode_exception()``'s tuple
                                            O_ERROR      ``encode_service_error()`` bytes of
                                                         a taskorch error (WorkerCrashedError,
                                                         TaskTimeoutError, TaskAbandonedError,
                                                         CircuitOpenError, ...)
                                            O_CANCELLED  None
                                            O_DEPENDENCY (error, outcome, data): ``error``
                                                         is O_ERROR's (a
                                                         DependencyFailedError), the other
                                                         two its cause: the dependency's
                                                         own outcome and data
    (S_STATS, req, fields)                ``encode_status()``: the Stats fields as a dict,
                                          plus worker_details, oldest_queued_seconds,
                                          schedules
    (S_BATCH, messages)                   a tuple of the frames above (never S_BATCH), in
                                          order: what the server's writer found queued, in
                                          one frame and one pickle
                                          (``transport.frame_batch``); a batch over
                                          SERVICE_MAX_FRAME goes as separate frames

Credits (``_service.server.credits`` has the rules): a credit is a backlog slot the server holds for
one connection, so that run() needs no round trip and the bound stays exact across clients:
queued tasks plus every connection's credits never exceed ``max_backlog``. The server grants
a few on connecting and with each ACCEPTED, recalls them when a round-trip submission finds
the backlog full, and frees what a connection holds when it ends; the client spends one per
run() while it has any, else submits with a round trip (QueueFullError decided there). After
a reconnection the client holds none until granted; a credit submission sent on a link that
was lost is sent again with ``wait`` True (it must not be refused for room: run() returned).

Either side closes the connection to end it; there is no goodbye frame. The server ends a
connection (and logs why on the "taskorch" logger) on a failed challenge, a frame over the
limit, a frame that does not decode or has the wrong layout; tasks that connection submitted
run to the end all the same, and count in the stats.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from taskorch._service.operations import AdminRequest
from taskorch._service.values import WirePolicy, encode_service_error

#: 2: calls may come in encode_call's by-reference form, which version 1 workers cannot read.
#: 3: the journal: client tokens and retried submissions in C_SUBMIT, C_RESULT; credits.
#: 4: S_BATCH. 5: options(timing, key, after) in C_SUBMIT; O_DEPENDENCY.
SERVICE_VERSION = 5

#: Largest frame either side sends or accepts: 64 MiB. A call, its arguments or a result
#: beyond it fails alone with SerializationError; a peer that announces a longer frame is
#: disconnected before its body is read, so one connection can make the server allocate at
#: most this much. Large data belongs in files, passed by path.
SERVICE_MAX_FRAME = 64 * 1024 * 1024

# Client frame tags.
C_SUBMIT = 1
C_WITHDRAW = 2
C_STATS = 3
C_RESULT = 4
C_RETURN = 5
C_TRIGGER = 6
# Server frame tags.
S_HELLO = 11
S_ACCEPTED = 12
S_DROPPED = 13
S_REJECTED = 14
S_DONE = 15
S_STATS = 16
S_CREDIT = 17
S_RECALL = 18
S_BATCH = 19
# S_DONE outcomes.
O_RESULT = 1
O_RAISED = 2
O_ERROR = 3
O_CANCELLED = 4
O_DEPENDENCY = 5


class ServiceProtocolError(ValueError):
    """A peer sent a frame that is not part of the service protocol."""


class BadRequest(ServiceProtocolError):
    """A client frame of a known layout with a valid request number whose other fields are
    not valid (a type, a range, a size): that request is refused, the connection goes on."""

    def __init__(self, req: int, reason: str) -> None:
        super().__init__(reason)
        self.req = req


# -- the frames: one named type each, built by its constructor below ---------------------------
# On the wire a frame is the plain tuple of its fields (the tag first): the server's unpickler
# accepts builtins only, and the layout stays the one this docstring describes. ``codec``
# (encode_service_frame, decode_client_frame, decode_server_frames) converts; nothing else reads
# a frame by index.


#: A submission's ``options()`` timing: (priority, not-before, expiry; epoch seconds or None).
WireTiming = tuple[int, Optional[float], Optional[float]]


class SubmitOptions(NamedTuple):
    """A submission's ``options()`` beyond the policy, as ``Submit`` carries them."""

    timing: WireTiming | None = None
    key: str | None = None
    after: tuple[int, ...] | None = None


_PLAIN = SubmitOptions()


class Submit(NamedTuple):
    """C_SUBMIT: a task to run (``submit_frame``)."""

    tag: int
    req: int
    payload: bytes
    policy: WirePolicy | None
    wait: bool
    client: bytes
    retry: bool
    credit: bool
    # (priority, not-before, expiry epoch seconds) of ``options()`` (``_options.Resolved``),
    # None: plain (priority 0, at once, never expires).
    timing: WireTiming | None
    key: str | None  # ``options(key=)``: one unfinished task per key, in the whole journal
    after: tuple[int, ...] | None  # ``options(after=)``: ids of the tasks it runs after


class Withdraw(NamedTuple):
    """C_WITHDRAW: the caller stopped waiting for ``req``."""

    tag: int
    req: int


class StatsRequest(NamedTuple):  # C_STATS
    tag: int
    req: int


class ResultRequest(NamedTuple):
    """C_RESULT: wait for task ``task_id``'s outcome."""

    tag: int
    req: int
    task_id: int
    wait: bool


class CreditReturn(NamedTuple):
    """C_RETURN: ``n`` credits given back."""

    tag: int
    n: int


class TriggerRequest(NamedTuple):
    """C_TRIGGER: run the schedule ``name`` now."""

    tag: int
    req: int
    name: str


class Hello(NamedTuple):
    """S_HELLO: the server's version and ``info``."""

    tag: int
    version: int
    info: dict[str, Any]


class Accepted(NamedTuple):
    """S_ACCEPTED: journaled and enqueued as ``task_id``; ``grant`` more credits."""

    tag: int
    req: int
    task_id: int
    grant: int


class Dropped(NamedTuple):  # S_DROPPED
    tag: int
    req: int


class Rejected(NamedTuple):
    """S_REJECTED: ``error`` is ``encode_service_error()`` bytes."""

    tag: int
    req: int
    error: bytes


class Done(NamedTuple):
    """S_DONE: the task's outcome (``data`` by ``outcome``: see above)."""

    tag: int
    req: int
    outcome: int
    attempts: int
    seconds: float | None
    data: Any


class StatsReply(NamedTuple):
    """S_STATS: ``encode_status()``'s fields (or a trigger's answer)."""

    tag: int
    req: int
    fields: dict[str, Any]


class CreditGrant(NamedTuple):
    """S_CREDIT: ``n`` more credits."""

    tag: int
    n: int


class CreditRecall(NamedTuple):  # S_RECALL: give back the credits not spent
    tag: int


ClientFrame = (Submit | Withdraw | StatsRequest | ResultRequest | CreditReturn | TriggerRequest
               | AdminRequest)
ServerFrame = (Hello | Accepted | Dropped | Rejected | Done | StatsReply | CreditGrant
               | CreditRecall)
#: The server frames that answer a request for good (its entry leaves the client's table).
FINAL_ANSWERS = (Done, Dropped, Rejected, StatsReply)


#: A frame from its fields, tag first: ``tuple.__new__`` in C, without the Python-level
#: ``__new__`` a NamedTuple's class call runs (a frame or two per task on each side).
_new = tuple.__new__


def submit_frame(req: int, payload: bytes, policy: WirePolicy | None, *, wait: bool,
                 client: bytes, retry: bool, credit: bool,
                 options: SubmitOptions | None = None) -> Submit:
    timing, key, after = options or _PLAIN
    return _new(Submit, (C_SUBMIT, req, payload, policy, wait, client, retry, credit, timing,
                         key, after))


def resubmit_frame(frame: Submit, credit: bool) -> Submit:
    """``frame`` again on a new connection: the server finds it if the first got through
    (``retry``). A credit run() has returned already: it must not be refused for room now,
    so it waits for room (run_async's semantics)."""
    return submit_frame(frame.req, frame.payload, frame.policy, wait=frame.wait or credit,
                        client=frame.client, retry=True, credit=False,
                        options=SubmitOptions(frame.timing, frame.key, frame.after))


def withdraw_frame(req: int) -> Withdraw:
    return _new(Withdraw, (C_WITHDRAW, req))


def stats_request_frame(req: int) -> StatsRequest:
    return _new(StatsRequest, (C_STATS, req))


def result_request_frame(req: int, task_id: int, wait: bool) -> ResultRequest:
    return _new(ResultRequest, (C_RESULT, req, task_id, wait))


def credit_return_frame(n: int) -> CreditReturn:
    return _new(CreditReturn, (C_RETURN, n))


def trigger_request_frame(req: int, name: str) -> TriggerRequest:
    return _new(TriggerRequest, (C_TRIGGER, req, name))


def hello_frame(info: dict[str, Any]) -> Hello:
    return _new(Hello, (S_HELLO, SERVICE_VERSION, info))


def accepted_frame(req: int, task_id: int, grant: int) -> Accepted:
    return _new(Accepted, (S_ACCEPTED, req, task_id, grant))


def dropped_frame(req: int) -> Dropped:
    return _new(Dropped, (S_DROPPED, req))


def rejected_frame(req: int, error: BaseException) -> Rejected:
    return _new(Rejected, (S_REJECTED, req, encode_service_error(error)))


def done_frame(req: int, outcome: int, attempts: int, seconds: float | None,
               data: Any) -> Done:
    return _new(Done, (S_DONE, req, outcome, attempts, seconds, data))


def stats_reply_frame(req: int, fields: dict[str, Any]) -> StatsReply:
    return _new(StatsReply, (S_STATS, req, fields))


def credit_grant_frame(n: int) -> CreditGrant:
    return _new(CreditGrant, (S_CREDIT, n))


def credit_recall_frame() -> CreditRecall:
    return _new(CreditRecall, (S_RECALL,))
