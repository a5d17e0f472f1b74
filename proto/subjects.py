"""Every NATS subject name Autellix uses is built here, and nowhere else.

All subjects live under one root (default ``autellix``) so that several deployments, or the tests,
can share a broker without seeing each other's traffic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .limits import MAX_TOKEN_CHARS, is_token

DEFAULT_ROOT = "autellix"

#: Program ids hash into this many slots (CRC-32 of the UTF-8 id, modulo): the events of a program go
#: to ``<event subject>.<slot>``, and each tracker shard owns the slots ``slot % shards == index``. The
#: publishers need no shard count, so trackers can be resharded without touching engines or schedulers.
PROGRAM_SLOTS = 256


def program_slot(program_id: str) -> int:
    """The slot of a program id (stable across processes and languages: CRC-32, IEEE)."""
    return zlib.crc32(program_id.encode("utf-8", "surrogatepass")) % PROGRAM_SLOTS


@dataclass(frozen=True, slots=True)
class TrackerShard:
    """Which programs one tracker owns: shard ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= PROGRAM_SLOTS:
            raise ValueError(f"the tracker shard count must be within 1 .. {PROGRAM_SLOTS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"the tracker shard index must be within 0 .. {self.count - 1}, got {self.index}")

    def slots(self) -> list[int]:
        return [slot for slot in range(PROGRAM_SLOTS) if slot % self.count == self.index]

    def owns(self, program_id: str) -> bool:
        return program_slot(program_id) % self.count == self.index

    @property
    def queue(self) -> str:
        """The queue group of this shard's trackers (replicas of one shard share its work)."""
        return TRACKER_QUEUE if self.count == 1 else f"{TRACKER_QUEUE}-{self.index}-of-{self.count}"

#: Queue group the schedulers join on the submission subject (one scheduler takes each call).
SCHEDULER_QUEUE = "schedulers"
#: Queue group the trackers join on the completion subject.
TRACKER_QUEUE = "trackers"


def _check_token(name: str, what: str) -> str:
    if not is_token(name):
        raise ValueError(
            f"{what} {name!r} is not a valid NATS subject token (visible ASCII, no dots, * or >,"
            f" at most {MAX_TOKEN_CHARS} characters)"
        )
    return name


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject names for one deployment root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        for part in self.root.split("."):
            _check_token(part, "subject root part")

    # -- clients -> schedulers ------------------------------------------------------------------
    @property
    def call_submit(self) -> str:
        """JSON call requests; the reply subject (or ``reply_to``) receives the stream."""
        return f"{self.root}.call.submit"

    @property
    def call_handback(self) -> str:
        """Engines hand back calls they cannot finish (a drain ran out of time): stamped calls
        carrying the tokens already streamed, for a scheduler to route to another engine."""
        return f"{self.root}.call.handback"

    @property
    def call_abort(self) -> str:
        """JSON ``{"call_id": ...}``: every engine drops the call if it holds it."""
        return f"{self.root}.call.abort"

    # -- an authenticated identity's own subjects ------------------------------------------------
    # With auth on, nats-server lets each identity publish submissions, aborts and program ends only
    # under its own user name (autellix.services.auth), so the subject's last token says, unforgeably,
    # who sent them: a call's owner, who alone may abort it, and a program's owner, who alone may end it.
    def call_submit_as(self, user: str) -> str:
        return f"{self.call_submit}.{_check_token(user, 'user name')}"

    def call_abort_as(self, user: str) -> str:
        return f"{self.call_abort}.{_check_token(user, 'user name')}"

    def program_end_as(self, user: str) -> str:
        return f"{self.program_end}.{_check_token(user, 'user name')}"

    @staticmethod
    def sender(subject: str, base: str) -> str:
        """The user token of ``base.<user>`` (``""`` for ``base`` itself: an unauthenticated sender)."""
        return subject[len(base) + 1 :] if subject.startswith(base + ".") else ""

    # -- clients -> tracker ---------------------------------------------------------------------
    @property
    def program_end(self) -> str:
        """JSON ``{"program_id": ...}`` request; the tracker replies with the program's final figures."""
        return f"{self.root}.program.end"

    @property
    def tracker_table(self) -> str:
        """Request/reply: the tracker's process table as JSON."""
        return f"{self.root}.tracker.table"

    # -- tracker -> schedulers ------------------------------------------------------------------
    @property
    def program_service(self) -> str:
        """The tracker publishes each program's updated service figures here."""
        return f"{self.root}.tracker.service"

    @property
    def program_ended(self) -> str:
        """The final figures of each program that ended or was forgotten, also published here: engines
        need only these (to free ended programs' contexts first), not one update per call."""
        return f"{self.root}.tracker.ended"

    # -- schedulers -> engines ------------------------------------------------------------------
    def engine_calls(self, engine_id: str) -> str:
        """Priority-stamped calls for one engine."""
        return f"{self.root}.engine.{_check_token(engine_id, 'engine id')}.calls"

    # -- engines -> everyone --------------------------------------------------------------------
    @property
    def engine_heartbeat(self) -> str:
        return f"{self.root}.engine.heartbeat"

    # -- events ---------------------------------------------------------------------------------
    @property
    def call_dispatched(self) -> str:
        """Schedulers announce each stamped call they routed (the tracker counts active calls)."""
        return f"{self.root}.events.call.dispatched"

    @property
    def call_completed(self) -> str:
        """One event per finished call (service time, token counts, engine id). Engines publish it
        under the program's slot (:meth:`call_completed_for`); this subject itself is still read
        (from publishers older than the slots)."""
        return f"{self.root}.events.call.completed"

    def call_completed_for(self, program_id: str) -> str:
        return f"{self.call_completed}.{program_slot(program_id)}"

    def call_dispatched_for(self, program_id: str) -> str:
        return f"{self.call_dispatched}.{program_slot(program_id)}"

    @staticmethod
    def any_slot(subject: str) -> str:
        """Every slot of an event subject (``<subject>.*``)."""
        return f"{subject}.*"
