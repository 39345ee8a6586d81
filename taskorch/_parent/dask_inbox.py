"""Parent process: what the Dask dispatcher's inbox carries, one named type per message.

The inbox is a ``queue.SimpleQueue`` (unbounded: its producers are the Dask Client's event
loop thread, ``ClusterLink``'s callbacks, and ``wake()`` from any thread; its one consumer is
the "taskorch-dask-dispatcher" thread, ``dask.DaskPool.wait``). Each message is built where it
is put (``dask_cluster``) and read by field name in ``dask.DaskPool``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

from taskorch._wire import Event, Failed, Retrying, Started, Succeeded


class Wake(NamedTuple):
    """New tasks, or stop()."""


class EventArrived(NamedTuple):
    """A ``_wire`` event from ``run_call``, sent through the scheduler, decoded."""

    event: Started | Retrying | Succeeded | Failed


class GatherEnded(NamedTuple):
    """A submission's gather ended: its decoded outcome event, or the exception."""

    sub_id: int
    outcome: Event | None  # (anything but an outcome is the dispatcher's to refuse)
    error: BaseException | None


class ClusterChanged(NamedTuple):
    """An "all" topic event about workers (``msg`` as the scheduler sent it)."""

    msg: dict[str, Any]


class RecallAnswer(NamedTuple):
    """A worker's answer to a recall: the submissions it took back (None: it could not)."""

    address: str
    taken: list[int] | None


class WorkersAnswer(NamedTuple):
    """A probe's answer: ``{address: nthreads}`` (None: the probe failed), and its number."""

    nthreads: dict[str, int] | None
    probe: int


class Restarted(NamedTuple):
    """A worker restart's answer: None, or the exception."""

    address: str
    error: BaseException | None


InboxEntry = Union[Wake, EventArrived, GatherEnded, ClusterChanged, RecallAnswer,
                   WorkersAnswer, Restarted]
