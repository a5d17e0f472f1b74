"""The scheduler's door: a new program's calls wait while the engines' working set does not fit.

Pure and synchronous (``now`` is passed in): the admission rule is :class:`autellix.policy.door.Door`
(the one the simulator measures); this gate feeds it what a scheduler sees and holds the calls of
programs at the door.

- **working set**, from heartbeats: per engine its running and queued KV (``kv_tokens_used +
  kv_tokens_queued``) plus the latest context of each active program between calls
  (``kv_tokens_idle_contexts``), against its ``kv_tokens_capacity``. Engines that report no
  capacity (a backend without a prefix cache) are not counted; while none reports one, the door
  stays open.
- **programs**: a program is *inside* once the door let it in here, or once the tracker has figures
  for it (another scheduler of the queue group let it in, or it ran before this scheduler started);
  its calls pass. Only the programs the door let in by a decision are the door's own (``Door`` has no
  way to enter a program that did not queue at it): the others' KV counts in the working set but not
  in the door's program count, so its per-program estimate (working set / programs) is high and it
  admits more cautiously while such programs are active; the programs it let in in order still
  progress, and the no-deadlock rule below still holds. A program the door has not let in waits with
  all its calls, in arrival order; the programs ahead of it are never overtaken. A program leaves when
  the tracker says it ended (explicitly or by idle TTL).
- **no deadlock**: the door lets the head in whenever no admitted program is active, so a program
  larger than every engine's budget still runs, alone.
- **bounded**: at most ``max_waiting`` programs wait; one more is refused with
  :class:`DoorFull` (the service answers ``rate_limited``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from autellix.policy.door import Door, DoorConfig
from autellix.proto import CallRequest, EngineHeartbeat, ProgramService


class DoorFull(Exception):
    """The door's queue is full: the submission is refused."""


@dataclass(slots=True)
class HeldCall:
    request: CallRequest
    reply_to: str
    #: when the scheduler received it (its wait at the door runs from here)
    received_at: float
    #: the authenticated user that submitted it ("" without auth)
    owner: str = ""


@dataclass(slots=True)
class _Waiting:
    arrived_at: float
    calls: list[HeldCall] = field(default_factory=list)


class DoorGate:
    def __init__(self, config: DoorConfig | None = None, max_waiting: int = 1000) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.door = Door(config)
        self.max_waiting = max_waiting
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        #: programs let in (here, or known from the tracker) that have not ended
        self._inside: set[str] = set()
        #: let in here, first call not routed yet (the door counts them as pending)
        self._unstarted: set[str] = set()
        self._reporting: set[str] = set()
        self.refused_total = 0

    # -- inputs --------------------------------------------------------------------------------
    def on_heartbeat(self, hb: EngineHeartbeat) -> None:
        if hb.state != "up" or hb.kv_tokens_capacity <= 0:
            self.door.forget_engine(hb.engine_id)
            self._reporting.discard(hb.engine_id)
            return
        self._reporting.add(hb.engine_id)
        self.door.report(
            hb.engine_id,
            hb.kv_tokens_capacity,
            hb.kv_tokens_used + hb.kv_tokens_queued,
            hb.kv_tokens_idle_contexts,
            hb.kv_tokens_tier_capacity,
            hb.tier_spill_share,
        )

    def forget_engine(self, engine_id: str) -> None:
        """An engine stopped heartbeating."""
        self.door.forget_engine(engine_id)
        self._reporting.discard(engine_id)

    def on_program_service(self, update: ProgramService) -> None:
        pid = update.program_id
        if update.ended:
            # a program waiting here keeps its place: its calls came after that end (a new session)
            if pid in self._inside:
                self.door.ended(pid)
            self._inside.discard(pid)
            self._unstarted.discard(pid)
            return
        if pid not in self._inside and pid not in self._waiting:
            self._inside.add(pid)  # let in elsewhere: its calls pass (not one of the door's own)

    # -- submissions ---------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        """True while no engine reports a KV capacity: nothing to compare a working set with."""
        return not self._reporting

    def waiting_programs(self) -> int:
        return len(self._waiting)

    def holds(self, program_id: str) -> bool:
        """Whether the program waits at the door."""
        return program_id in self._waiting

    def submit(self, request: CallRequest, reply_to: str, now: float, owner: str = "") -> bool:
        """True: route the call now. False: it waits at the door (:meth:`release` lets it out).
        Raises :class:`DoorFull` when a new program finds the door's queue full."""
        pid = request.program_id
        if pid in self._inside:
            return True
        held = HeldCall(request, reply_to, now, owner)
        waiting = self._waiting.get(pid)
        if waiting is not None:
            waiting.calls.append(held)
            return False
        if self.open and not self._waiting:
            self._let_in(pid)
            return True
        if len(self._waiting) >= self.max_waiting:
            self.refused_total += 1
            raise DoorFull(
                f"{len(self._waiting)} programs are waiting for engine memory, this scheduler's limit; try again later"
            )
        self._waiting[pid] = _Waiting(now, [held])
        self.door.arrive(pid, now)
        return False

    def release(self, now: float) -> list[tuple[HeldCall, float]]:
        """Calls of the programs the door lets in now, in arrival order, each with its wait (s)."""
        if not self._waiting:
            return []
        admitted = list(self._waiting) if self.open else self.door.admit(now)
        out: list[tuple[HeldCall, float]] = []
        for pid in admitted:
            waiting = self._waiting.pop(pid)
            if self.open:
                self.door.ended(pid)  # leave the door's queue: it is let in without a decision
                self._inside.add(pid)
            else:
                self._inside.add(pid)
                self._unstarted.add(pid)
            out += [(held, now - held.received_at) for held in waiting.calls]
        return out

    def started(self, program_id: str) -> None:
        """A let-in program's first call was routed to an engine."""
        if program_id in self._unstarted:
            self._unstarted.discard(program_id)
            self.door.started(program_id)

    def _let_in(self, program_id: str) -> None:
        """Let a program in without a decision (the door is open: no engine reports a capacity)."""
        self._inside.add(program_id)
