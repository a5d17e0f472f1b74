"""The door: admit a new program only while the engines' working set fits. Pure, synchronous.

Why: an engine's capacity on agent workloads is set by a *retention cliff*. Programs in think or tool
time keep a context in KV; once the contexts of the active programs no longer fit beside the running
calls, the cache evicts them and every next call re-prefills its whole history, which makes the engine
slower, which keeps more programs active: throughput collapses within a few percent of load. Holding
new programs at the door while the working set is full keeps the engine on the good side of the cliff;
the programs inside finish at full speed and the door's queue drains. Below the knee the working set
fits, the door admits every program on arrival and costs nothing.

**Working set** (from what the engines report): per engine, the KV of its running and queued calls
plus, for each program still active, the context its next call will extend: its latest finished
call's prompt + output, wherever it is now (cached, in a CPU tier, or evicted and owed a re-prefill).
(The simulator counts it for programs with a call in flight too, because its engine model keeps that
cached copy beside the running call's KV; an engine that shares blocks can leave those out.) Not
the cache's whole contents: a cache fills free KV with anything (ended programs' contexts, stale
branches of a tree search) and would look full at any load.
Summed over engines and compared with the engines' summed KV capacity.

**Rule** (an analytic estimate; nothing is tuned per workload): with ``W`` the working set, ``C``
the capacity, ``pending`` the programs let in whose first call the reports do not show yet and ``n``
the active programs the reports do show, a new program is expected to need about what an active
program holds on average, ``W / n``. The program at the head of the door is admitted when

    W + (pending + 1) * W / n  <=  high_water * C

(``pending`` keeps a burst of arrivals between two reports from all going in on the same stale
figure; while the reports show no program, one program at a time goes in). Programs wait in arrival
order (a program is never overtaken). **No deadlock**: when no admitted program is active, the
head is admitted whatever its size, so a program larger than the budget still runs, alone.

**Spill gate** (``spill_gate``, default 10%): with a CPU tier on every engine, a context that does
not fit the GPU KV is swapped back in, not re-prefilled, and that costs little until the working set
far outgrows the GPU KV. Holding programs whenever the working set exceeds the GPU KV then costs
more than it saves (sharegpt: 12-14% of the tier's capacity lost, +9% mean latency at 0.9 of
FCFS + LRU's capacity). So with tiers the rule above applies only while the engines spend at least
``spill_gate`` of their busy time swapping contexts back in (:class:`SpillMeter`, reported in
heartbeats); below it the door stays open. Counting the tier in the capacity instead
(``count_tier``) was measured too: the door then never binds (no harm, and no gain over the tier).

Use (a simulator or a scheduler drives it; the clock is passed in):

- :meth:`Door.report` per engine whenever its heartbeat (or the simulator's state) changes;
- :meth:`Door.arrive` when a program's first call shows up; :meth:`Door.admit` returns the programs
  to let in now, in arrival order; :meth:`Door.started` once a let-in program's first call is queued
  at an engine (its KV now appears in the reports); :meth:`Door.ended` when a program ends (its last
  call finished, an explicit end, or the tracker's idle TTL).
- :meth:`Door.forget_engine` when an engine is gone (its report no longer counts).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

#: the spill gate's default: the door's rule applies once the engines spend 10% of their busy time
#: swapping contexts back in from their CPU tiers (measured in bench/SIM_RESULTS.md, gates 2%, 5% and
#: 10%: all keep sharegpt at the tier's capacity, where the ungated door cost up to 14% of it; 2% keeps
#: the most of the door's gain on one engine's bfcl (1.70x against 1.62x at 10%, the tier alone 1.46x),
#: but on four engines short of KV (mixed, KV 0.1x) it held programs the tiers would have served: 1.50x
#: against the tier's 1.58x, which 10% keeps)
DEFAULT_SPILL_GATE = 0.1


@dataclass(frozen=True, slots=True)
class DoorConfig:
    #: admit while the projected working set stays under this fraction of the KV capacity; the gap
    #: absorbs the growth of the admitted programs' contexts between two decisions
    high_water: float = 0.9
    #: count the engines' CPU tiers in the capacity: a context that spills there is swapped back in,
    #: not re-prefilled, so the cliff is where GPU KV and tier together no longer hold the working set
    count_tier: bool = False
    #: with a CPU tier on every engine reported: the door applies its rule only while the engines
    #: spend at least this share of their busy time swapping contexts back in from the tier (their
    #: working set has outgrown the GPU KV and the spill costs); below it the tier absorbs the
    #: overflow at little cost and the door stays open. None: the rule always applies.
    spill_gate: float | None = DEFAULT_SPILL_GATE

    def __post_init__(self) -> None:
        if not 0.0 < self.high_water <= 1.0:
            raise ValueError(f"high_water must be in (0, 1], got {self.high_water}")
        if self.spill_gate is not None and not 0.0 <= self.spill_gate < 1.0:
            raise ValueError(f"spill_gate must be in [0, 1), got {self.spill_gate}")


@dataclass(frozen=True, slots=True)
class EngineReport:
    """One engine's memory as the door sees it (tokens of KV)."""

    capacity_tokens: int
    #: KV held by running calls plus KV the queued calls will need
    active_tokens: int
    #: latest contexts of the active programs between calls (see the module docstring)
    retained_tokens: int
    #: the engine's CPU tier for evicted contexts (0: none)
    tier_tokens: int = 0
    #: share of its recent busy time spent swapping contexts back in from the tier
    spill_share: float = 0.0


class SpillMeter:
    """An engine's *spill share*: the share of its busy time spent swapping contexts back in from its
    CPU tier, over the last complete window of ``window_s`` busy seconds (what the door's spill gate
    reads). Pure: fed the engine's cumulative busy and swap-in seconds; the simulator's engines and
    the engine service both use it."""

    def __init__(self, window_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._busy0 = 0.0
        self._tier0 = 0.0
        self.share = 0.0

    def observe(self, busy_s: float, tier_in_s: float) -> float:
        span = busy_s - self._busy0
        if span >= self.window_s:
            self.share = min(1.0, max(0.0, (tier_in_s - self._tier0) / span))
            self._busy0, self._tier0 = busy_s, tier_in_s
        return self.share


class Door:
    def __init__(self, config: DoorConfig | None = None) -> None:
        self.config = config or DoorConfig()
        self._reports: dict[str, EngineReport] = {}
        #: program id -> arrival time, in arrival order
        self._waiting: OrderedDict[str, float] = OrderedDict()
        #: admitted programs that have not ended; value: True once its first call shows in reports
        self._active: dict[str, bool] = {}
        self._pending = 0
        self.admitted_total = 0
        self.held_total = 0  # programs that had to wait at least one decision
        self.wait_s_total = 0.0

    # --- inputs -------------------------------------------------------------------------------
    def report(
        self,
        engine_id: str,
        capacity_tokens: int,
        active_tokens: int,
        retained_tokens: int,
        tier_tokens: int = 0,
        spill_share: float = 0.0,
    ) -> None:
        self._reports[engine_id] = EngineReport(
            capacity_tokens, active_tokens, retained_tokens, tier_tokens, spill_share
        )

    def forget_engine(self, engine_id: str) -> None:
        self._reports.pop(engine_id, None)

    def arrive(self, program_id: str, now: float) -> None:
        if program_id in self._waiting or program_id in self._active:
            raise ValueError(f"program {program_id!r} is already at the door or inside")
        self._waiting[program_id] = now

    def started(self, program_id: str) -> None:
        if self._active.get(program_id) is False:
            self._active[program_id] = True
            self._pending -= 1

    def ended(self, program_id: str) -> None:
        if self._waiting.pop(program_id, None) is not None:
            return  # ended (cancelled) while waiting
        started = self._active.pop(program_id, None)
        if started is False:
            self._pending -= 1

    # --- decision -----------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def working_set(self) -> tuple[int, int]:
        """(working set, capacity) in tokens, summed over the engines reported."""
        w = sum(r.active_tokens + r.retained_tokens for r in self._reports.values())
        tier = self.config.count_tier
        c = sum(r.capacity_tokens + (r.tier_tokens if tier else 0) for r in self._reports.values())
        return w, c

    def spill_open(self) -> bool:
        """The spill gate holds the door open: every engine reported has a CPU tier and the
        capacity-weighted share of busy time they spend swapping contexts back in is below
        ``spill_gate``."""
        gate = self.config.spill_gate
        reports = self._reports.values()
        if gate is None or not reports or any(r.tier_tokens <= 0 for r in reports):
            return False
        c = sum(r.capacity_tokens for r in reports)
        share = sum(r.spill_share * r.capacity_tokens for r in reports) / c if c > 0 else 0.0
        return share < gate

    def admit(self, now: float) -> list[str]:
        """The programs to let in now, in arrival order (possibly none)."""
        if not self._waiting:
            return []
        if self.spill_open():
            return self._let_in(now, len(self._waiting))
        w, c = self.working_set()
        limit = self.config.high_water * c
        out: list[str] = []
        while self._waiting:
            n = len(self._active)
            if n:
                shown = n - self._pending  # active programs the reports already include
                if shown <= 0 or c <= 0:
                    break  # nothing to estimate from yet: one program at a time
                per = w / shown
                if w + (self._pending + 1) * per > limit:
                    break
            out += self._let_in(now, 1)
        return out

    def _let_in(self, now: float, n: int) -> list[str]:
        out: list[str] = []
        for _ in range(n):
            program_id, arrived = self._waiting.popitem(last=False)
            self._active[program_id] = False
            self._pending += 1
            self.admitted_total += 1
            if now > arrived:
                self.held_total += 1
                self.wait_s_total += now - arrived
            out.append(program_id)
        return out
