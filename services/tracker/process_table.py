"""The program-tracker's process table. Pure and synchronous: ``now`` is always passed in.

One entry per program: attained service (PLAS), critical path (ATLAS), waiting time, engines used,
active calls, first and last activity. Updated from call-dispatched and call-completed events.

Active calls are reconciled by age: a call whose completed event never comes (its engine died, or
the event was lost while the tracker was down) is dropped after ``active_call_max_s`` (longer than
any call may run: the schedulers' call deadline), so a phantom call never keeps its program from
being forgotten when idle.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

import msgspec

from autellix.policy.program_account import ProgramAccount
from autellix.proto import REJECTED, CallCompleted, CallDispatched, FinishReason, ProgramService, ProgramSummary
from autellix.proto.limits import MAX_PERSISTED_CALL_PATHS
from autellix.proto.messages import same_figure

V = TypeVar("V")


@dataclass(slots=True)
class ProgramEntry:
    account: ProgramAccount
    first_seen_at: float
    last_activity_at: float
    #: the time its calls waited, in engine queues and at the schedulers' door
    program_wait_s: float = 0.0
    #: of program_wait_s, the time its calls waited at the schedulers' door
    door_wait_s: float = 0.0
    engines: set[str] = field(default_factory=set)
    #: call id -> when it was dispatched (or restored)
    active_calls: dict[str, float] = field(default_factory=dict)
    #: call id -> the engine its latest dispatch named (not persisted: restored calls expire by age)
    active_engine: dict[str, str] = field(default_factory=dict)
    #: service of calls handed back by a draining engine, added when the call completes elsewhere
    partial_service_s: dict[str, float] = field(default_factory=dict)
    #: call id -> bit mask of the attempts whose events were counted, kept only where it is not just
    #: attempt 0 (absent: attempt 0 if the call completed, none otherwise); see :func:`attempt_mask`
    attempt_masks: dict[str, int] = field(default_factory=dict)
    #: the authenticated user whose call started the program ("" without auth): only it may end it
    owner: str = ""
    #: the tenant its first call was accounted to (a gateway's API-key tenant, or the owner)
    tenant: str = ""

    def summary(self, ended: bool = False) -> ProgramSummary:
        a = self.account
        return ProgramSummary(
            program_id=a.program_id,
            program_service_s=a.service_s,
            critical_path_s=a.critical_path_s,
            program_wait_s=self.program_wait_s,
            calls_completed=a.calls_completed,
            active_calls=len(self.active_calls),
            engines=sorted(self.engines),
            first_seen_at=self.first_seen_at,
            last_activity_at=self.last_activity_at,
            ended=ended,
            door_wait_s=self.door_wait_s,
        )


class ProgramRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One program's entry as the tracker persists it (JetStream key-value), JSON."""

    program_id: str
    service_s: float
    critical_path_s: float
    calls_completed: int
    call_path_s: dict[str, float]
    #: the older name of program_wait_s (records written before it have only this one)
    waiting_s: float = 0.0
    engines: list[str]
    active_calls: list[str]
    partial_service_s: dict[str, float]
    first_seen_at: float
    last_activity_at: float
    #: when each active call was dispatched (records written before this field: restore time)
    active_since: dict[str, float] = {}
    owner: str = ""
    door_wait_s: float = 0.0
    tenant: str = ""
    program_wait_s: float = 0.0
    #: call id -> bit mask of its attempts counted (only calls with more than attempt 0)
    attempt_masks: dict[str, int] = {}

    def __post_init__(self) -> None:
        same_figure(self, "program_wait_s", "waiting_s")


def _newest(d: dict[str, V], n: int) -> dict[str, V]:
    """The ``n`` newest items of ``d`` in order, in O(n) (a long program's dict can be large)."""
    if len(d) <= n:
        return dict(d)
    return dict(reversed(list(islice(reversed(d.items()), n))))


def to_record(entry: ProgramEntry) -> ProgramRecord:
    a = entry.account
    return ProgramRecord(
        program_id=a.program_id,
        service_s=a.service_s,
        critical_path_s=a.critical_path_s,
        calls_completed=a.calls_completed,
        # the newest paths only: a record must stay far below the broker's payload limit
        call_path_s=_newest(a.call_path_s, MAX_PERSISTED_CALL_PATHS),
        program_wait_s=entry.program_wait_s,
        engines=sorted(entry.engines),
        active_calls=list(_newest(entry.active_calls, MAX_PERSISTED_CALL_PATHS)),
        partial_service_s=_newest(entry.partial_service_s, MAX_PERSISTED_CALL_PATHS),
        first_seen_at=entry.first_seen_at,
        last_activity_at=entry.last_activity_at,
        active_since=_newest(entry.active_calls, MAX_PERSISTED_CALL_PATHS),
        owner=entry.owner,
        door_wait_s=entry.door_wait_s,
        tenant=entry.tenant,
        attempt_masks=_newest(entry.attempt_masks, MAX_PERSISTED_CALL_PATHS),
    )


def from_record(r: ProgramRecord, now: float) -> ProgramEntry:
    account = ProgramAccount(
        r.program_id,
        service_s=r.service_s,
        critical_path_s=r.critical_path_s,
        calls_completed=r.calls_completed,
        call_path_s=dict(r.call_path_s),
    )
    return ProgramEntry(
        account=account,
        first_seen_at=r.first_seen_at,
        last_activity_at=r.last_activity_at,
        program_wait_s=r.program_wait_s,
        door_wait_s=r.door_wait_s,
        engines=set(r.engines),
        active_calls={c: r.active_since.get(c, now) for c in r.active_calls},
        partial_service_s=dict(r.partial_service_s),
        owner=r.owner,
        tenant=r.tenant,
        attempt_masks=dict(r.attempt_masks),
    )


def attempt_bit(attempt: int | None) -> int:
    """The bit of an attempt in a call's mask (attempts past 62 share the last bit)."""
    return 1 << min(max(attempt or 0, 0), 62)


#: ended program ids remembered against trailing completions
MAX_RECENTLY_ENDED = 100_000


class ProcessTable:
    def __init__(self, idle_ttl_s: float = 600.0, active_call_max_s: float = 900.0) -> None:
        if idle_ttl_s <= 0:
            raise ValueError(f"idle TTL must be > 0 seconds, got {idle_ttl_s}")
        if active_call_max_s <= 0:
            raise ValueError(f"active call max age must be > 0 seconds, got {active_call_max_s}")
        self.idle_ttl_s = idle_ttl_s
        self.active_call_max_s = active_call_max_s
        self._programs: dict[str, ProgramEntry] = {}
        #: programs ended recently, oldest first: a completion that arrives after the end (the engine's
        #: event can trail the caller's program.end) must not bring the program back as a ghost
        self._ended: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._programs)

    def get(self, program_id: str) -> ProgramEntry | None:
        return self._programs.get(program_id)

    def restore(self, entry: ProgramEntry) -> None:
        """Put back a program read from the persisted table (a restarted tracker)."""
        self._programs[entry.account.program_id] = entry

    def program_ids(self) -> list[str]:
        return list(self._programs)

    def _entry(self, program_id: str, now: float) -> ProgramEntry:
        entry = self._programs.get(program_id)
        if entry is None:
            entry = ProgramEntry(ProgramAccount(program_id), first_seen_at=now, last_activity_at=now)
            self._programs[program_id] = entry
        return entry

    def on_dispatched(self, event: CallDispatched, now: float) -> None:
        self._ended.pop(event.program_id, None)  # a new call: the program id starts a new session
        entry = self._entry(event.program_id, now)
        if not entry.owner:
            entry.owner = event.owner
        if not entry.tenant:
            entry.tenant = event.tenant
        if event.call_id not in entry.account.call_path_s:  # a dispatch can trail its own completion
            entry.active_calls[event.call_id] = now  # (core NATS and the stream are different paths)
            entry.active_engine[event.call_id] = event.engine_id
        entry.engines.add(event.engine_id)
        entry.last_activity_at = now
        if event.door_wait_s > 0:  # waiting for engine memory is waiting: the program's latency has it
            entry.program_wait_s += event.door_wait_s
            entry.door_wait_s += event.door_wait_s

    def on_completed(self, event: CallCompleted, now: float) -> ProgramService | None:
        """Account a finished call; returns the program's update to publish (None for a call handed
        back mid-way, whose service counts when it completes on its next engine)."""
        if event.program_id in self._ended and event.program_id not in self._programs:
            return None  # it trails the program's end: its final figures went out already
        if event.finish_reason == REJECTED:
            # refused before it ran: it only leaves the active calls (never creates a program)
            rejected = self._programs.get(event.program_id)
            if rejected is not None:
                rejected.active_calls.pop(event.call_id, None)
                rejected.active_engine.pop(event.call_id, None)
                rejected.last_activity_at = now
            return None
        entry = self._entry(event.program_id, now)
        completed = bool(event.call_id) and event.call_id in entry.account.call_path_s
        if event.call_id:
            # Every attempt's service counts once. A call's attempts can each end on an engine: a
            # handback and its resumption, or an attempt replaced by the caller's resubmission (after
            # lost replies) that ends as an abort, in either order with the newer one's completion.
            mask = entry.attempt_masks.get(event.call_id, 1 if completed else 0)
            bit = attempt_bit(event.attempt)
            if mask & bit:
                return None  # counted already (an event redelivered after a restart): count it once
            if mask | bit != 1:
                entry.attempt_masks[event.call_id] = mask | bit
        entry.engines.add(event.engine_id)
        entry.program_wait_s += event.queue_wait_s
        entry.last_activity_at = now
        if completed:  # another attempt of a call counted already: its service adds, the call stays one
            path = entry.account.add_service(event.call_id, event.service_s)
            return self._service(entry, now, call_id=event.call_id, call_path_s=path)
        if event.finish_reason == FinishReason.HANDBACK:
            entry.partial_service_s[event.call_id] = entry.partial_service_s.get(event.call_id, 0.0) + event.service_s
            return None
        entry.active_calls.pop(event.call_id, None)
        entry.active_engine.pop(event.call_id, None)
        service = event.service_s + entry.partial_service_s.pop(event.call_id, 0.0)
        path = entry.account.complete(event.call_id, event.parents, service)
        return self._service(entry, now, call_id=event.call_id, call_path_s=path)

    def _service(
        self, entry: ProgramEntry, now: float, call_id: str = "", call_path_s: float = 0.0, ended: bool = False
    ) -> ProgramService:
        a = entry.account
        return ProgramService(
            program_id=a.program_id,
            program_service_s=a.service_s,
            critical_path_s=a.critical_path_s,
            program_wait_s=entry.program_wait_s,
            calls_completed=a.calls_completed,
            call_id=call_id,
            call_path_s=call_path_s,
            ended=ended,
            updated_at=now,
            owner=entry.owner,
            tenant=entry.tenant,
        )

    def owner(self, program_id: str) -> str:
        """The user that owns a program ("" when unknown or not authenticated)."""
        entry = self._programs.get(program_id)
        return entry.owner if entry is not None else ""

    def end(self, program_id: str, now: float) -> tuple[ProgramSummary, ProgramService] | None:
        """Remove a program; returns its final row and the ``ended`` update to publish."""
        entry = self._programs.pop(program_id, None)
        if entry is None:
            return None
        self._ended[program_id] = None
        while len(self._ended) > MAX_RECENTLY_ENDED:
            self._ended.popitem(last=False)
        return entry.summary(ended=True), self._service(entry, now, ended=True)

    def engine_gone(self, engine_id: str) -> list[str]:
        """Drop the active calls whose latest dispatch named this engine (it died or stopped: their
        completions are not coming from it); returns the programs changed."""
        changed = []
        for pid, e in self._programs.items():
            lost = [c for c, eid in e.active_engine.items() if eid == engine_id]
            for call_id in lost:
                del e.active_engine[call_id]
                e.active_calls.pop(call_id, None)
            if lost:
                changed.append(pid)
        return changed

    def expire(self, now: float) -> list[ProgramService]:
        """Forget programs idle for longer than the TTL with no active call (after dropping active
        calls older than ``active_call_max_s``: their completion is never coming)."""
        for e in self._programs.values():
            stale = [c for c, since in e.active_calls.items() if now - since > self.active_call_max_s]
            for call_id in stale:
                del e.active_calls[call_id]
                e.active_engine.pop(call_id, None)
        expired = [
            pid
            for pid, e in self._programs.items()
            if not e.active_calls and now - e.last_activity_at > self.idle_ttl_s
        ]
        out = []
        for pid in expired:
            ended = self.end(pid, now)
            if ended is not None:
                out.append(ended[1])
        return out

    def summaries(self) -> list[ProgramSummary]:
        return [e.summary() for e in self._programs.values()]
