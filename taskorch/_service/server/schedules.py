"""``taskorch serve``'s schedules: their state in the journal (server process; the
scheduler's thread and the callbacks thread call it, the journal's writer writes it)."""

from __future__ import annotations

from taskorch._service.server.journal import Journal


class JournalScheduleStore:
    """The schedules' ``StateStore`` (``_parent.scheduler``) in the journal: the last fires
    read at start, each fire and outcome written through the writer (never blocking), so a
    restarted server neither runs a tick twice nor forgets one that fell in its downtime."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._fires = journal.schedule_states()  # then the scheduler's thread's

    def last_fire(self, name: str) -> float | None:
        return self._fires.get(name)

    def record_fire(self, name: str, tick: float) -> None:
        self._fires[name] = tick
        self._journal.schedule_fired(name, tick)

    def record_outcome(self, name: str, outcome: str, seconds: float | None) -> None:
        self._journal.schedule_ended(name, outcome, seconds)
