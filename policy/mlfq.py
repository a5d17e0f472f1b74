"""Discretised multi-level queues (Autellix's MLFQ). Pure, synchronous, no clocks inside.

The structure holds every call an engine has accepted and not yet finished, running or waiting,
keyed by call id. Time and service are passed in by the caller, so the same class serves the
simulator (virtual time) and the engine service (wall time).

Levels ``0..K-1``; level 0 is the top (served first). Boundaries ``b_0 < b_1 < ... < b_{K-2}``
(seconds of attained service) split the priority axis: a priority ``p`` maps to the first level
``i`` with ``p < b_i``, else to the bottom level ``K-1``.

- **add**: a new call enters the level matching its *stamped* priority (its program's attained
  service under PLAS, its critical path under ATLAS, 0 for request-level MLFQ and FCFS): not always
  the top level. It joins the back of that level (FCFS within a level).
- **charge**: service is charged to a call as it runs. A call at level ``i`` has a quantum equal to
  the width of its level (``b_i - b_{i-1}``, ``b_{-1} = 0``); when the service charged at that level
  reaches the quantum the call is demoted to the back of level ``i+1``. Excess service carries over,
  so charging ``a`` then ``b`` ends where charging ``a + b`` at once does. The bottom level has no
  quantum.
- **order**: call ids top-down, FCFS within each level; an engine fills its batch from the front.
- **displacement** (:meth:`MultiLevelQueues.displaces`, the one rule the engine core and the simulator
  both apply at scheduling points): a waiting call displaces a running call only from at least
  ``preempt_gap`` levels above it. A call demoted by one level, or a fresh call stamped one level
  higher than a running call, does not swap it out; the gap is hysteresis against preemption churn
  (see :class:`MLFQConfig`). ``preempt_gap = 0`` displaces on any lead in the queue order (the same
  level's earlier arrival included).
- **anti-starvation**: a waiting call below the top level whose
  ``(program wait + call wait) / (program service + call service) >= beta`` is moved to the back of
  the top level; only the call's own counters (its wait, its service and its level service) reset.
  The program's figures are those stamped when the call was added. Because waiting only adds to the
  numerator, each waiting call has a deadline ``waiting_since + beta * (Ps + cs) - Pw - cw``; a heap
  of deadlines makes :meth:`MultiLevelQueues.promote_starved` cost O(promoted * log n).

Boundaries are usually calibrated (see :mod:`autellix.policy.calibration`): the first boundary at a
low percentile of observed call service, doubling thereafter, so that the queues are not inert.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

#: the default displacement gap in levels (MLFQConfig.preempt_gap); measured in bench/SIM_RESULTS.md
PREEMPT_GAP = 2


@dataclass(frozen=True, slots=True)
class MLFQConfig:
    """Multi-level queue parameters. The paper gives no numbers; these are our documented defaults.

    - ``num_levels`` (K = 12): with doubling boundaries the bottom boundary is ``2**10`` times the
      first, so a program that has received a thousand times a short call's service still
      separates from one that has received a hundred times.
    - ``first_boundary_s`` (0.5 s): used until a calibrator replaces it; about the service a call
      gets from a hundred-odd decode steps in a loaded batch.
    - ``growth`` (2.0): each boundary doubles the previous one.
    - ``beta`` (16.0): a call is promoted to the top once its program's waiting plus its own has
      reached sixteen times their service. Low enough that no program starves for ever, high
      enough that promotion does not undo least-attained-service ordering at ordinary loads
      (a program whose slowdown is below 17 is never promoted).
    - ``calibration_percentile`` (25.0): percentile of observed call service used as the first
      boundary by :class:`autellix.policy.calibration.ServiceCalibrator`.
    - ``preempt_gap`` (PREEMPT_GAP): a waiting call displaces a running one only from at least this
      many levels above it (hysteresis). Without it, wide fan-outs (tens of parallel calls of one
      program, each demoted as it is charged) were swapped out by every newer program's calls one
      level above them, and the program, which waits for its slowest call, paid for each swap.
    """

    num_levels: int = 12
    first_boundary_s: float = 0.5
    growth: float = 2.0
    beta: float = 16.0
    calibration_percentile: float = 25.0
    preempt_gap: int = PREEMPT_GAP

    def __post_init__(self) -> None:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.first_boundary_s <= 0:
            raise ValueError(f"first_boundary_s must be > 0, got {self.first_boundary_s}")
        if self.growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.preempt_gap < 0:
            raise ValueError(f"preempt_gap must be >= 0, got {self.preempt_gap}")


def doubling_boundaries(first_s: float, num_levels: int, growth: float = 2.0) -> tuple[float, ...]:
    """The ``num_levels - 1`` boundaries ``first_s * growth**i``."""
    return tuple(first_s * growth**i for i in range(num_levels - 1))


@dataclass(slots=True)
class _Entry:
    call_id: str
    level: int
    seq: int
    program_wait_s: float
    program_service_s: float
    waiting_since: float | None
    wait_s: float = 0.0
    service_s: float = 0.0
    level_service_s: float = 0.0
    version: int = 0


class MultiLevelQueues:
    """K FCFS queues with demotion by quantum and promotion by the beta rule (module docstring).

    ``demote=False`` turns quanta off (a call stays at the level it entered: FCFS when K = 1);
    ``starvation=False`` turns the beta rule off.
    """

    def __init__(
        self,
        config: MLFQConfig | None = None,
        boundaries: Sequence[float] | None = None,
        *,
        demote: bool = True,
        starvation: bool = True,
    ) -> None:
        self.config = config or MLFQConfig()
        self.demote = demote
        self.starvation = starvation
        self._levels: list[dict[str, _Entry]] = [{} for _ in range(self.config.num_levels)]
        #: per level, the waiting entries' (seq, call_id), sorted: the same order as _levels
        self._waiting: list[list[tuple[int, str]]] = [[] for _ in range(self.config.num_levels)]
        self._entries: dict[str, _Entry] = {}
        self._seq = 0
        self._version = 0
        self._deadlines: list[tuple[float, int, str, int]] = []
        self._boundaries: tuple[float, ...] = ()
        self._quanta: tuple[float, ...] = ()
        self.set_boundaries(
            boundaries
            if boundaries is not None
            else doubling_boundaries(self.config.first_boundary_s, self.config.num_levels, self.config.growth)
        )

    # --- boundaries -------------------------------------------------------------------------
    @property
    def boundaries(self) -> tuple[float, ...]:
        return self._boundaries

    def set_boundaries(self, boundaries: Sequence[float]) -> None:
        """Replace the boundaries (e.g. after calibration). Calls already queued keep their level."""
        b = tuple(float(x) for x in boundaries)
        if len(b) != self.config.num_levels - 1:
            raise ValueError(f"expected {self.config.num_levels - 1} boundaries, got {len(b)}")
        if any(x <= 0 for x in b) or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError(f"boundaries must be positive and strictly increasing, got {b}")
        self._boundaries = b
        lows = (0.0, *b)
        self._quanta = (*(hi - lo for lo, hi in zip(lows, b, strict=False)), math.inf)

    def quantum(self, level: int) -> float:
        return self._quanta[level]

    def level_for(self, priority: float) -> int:
        """The level whose range holds ``priority`` (seconds of attained service)."""
        for i, b in enumerate(self._boundaries):
            if priority < b:
                return i
        return self.config.num_levels - 1

    # --- membership -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._entries

    def level_of(self, call_id: str) -> int:
        return self._entries[call_id].level

    def sort_key(self, call_id: str) -> tuple[int, int]:
        """A key that sorts calls in :meth:`order` order (smaller = served first)."""
        e = self._entries[call_id]
        return (e.level, e.seq)

    def displaces(self, waiting_id: str, running_id: str) -> bool:
        """Whether the waiting call may displace the running one at a scheduling point: it is
        ahead in the queue order, and at least ``preempt_gap`` levels above (module docstring)."""
        w, r = self._entries[waiting_id], self._entries[running_id]
        gap = self.config.preempt_gap
        if gap == 0:
            return (w.level, w.seq) < (r.level, r.seq)
        return w.level + gap <= r.level

    def level_sizes(self) -> list[int]:
        return [len(q) for q in self._levels]

    def add(
        self,
        call_id: str,
        priority: float,
        now: float,
        *,
        program_wait_s: float = 0.0,
        program_service_s: float = 0.0,
    ) -> int:
        """Queue a new, waiting call at the level matching ``priority``; returns that level."""
        if call_id in self._entries:
            raise KeyError(f"call {call_id!r} is already queued")
        level = self.level_for(priority)
        e = _Entry(call_id, level, 0, program_wait_s, program_service_s, now)
        self._entries[call_id] = e
        self._append(e, level)
        self._push_deadline(e)
        return level

    def is_waiting(self, call_id: str) -> bool:
        return self._entries[call_id].waiting_since is not None

    def waiting_count(self) -> int:
        return sum(len(w) for w in self._waiting)

    def remove(self, call_id: str) -> None:
        """Forget a call (finished or aborted). Unknown ids raise ``KeyError``."""
        e = self._entries.pop(call_id)
        self._detach(e)
        self._invalidate(e)

    # --- running state and service ------------------------------------------------------------
    def started(self, call_id: str, now: float) -> None:
        """The call entered the running batch at ``now``: its wait stops accruing."""
        e = self._entries[call_id]
        if e.waiting_since is not None:
            self._unindex_waiting(e)
            e.wait_s += max(0.0, now - e.waiting_since)
            e.waiting_since = None
            self._invalidate(e)

    def stopped(self, call_id: str, now: float) -> None:
        """The call left the running batch (preempted) at ``now``: its wait accrues again."""
        e = self._entries[call_id]
        if e.waiting_since is None:
            e.waiting_since = now
            bisect.insort(self._waiting[e.level], (e.seq, call_id))
            self._push_deadline(e)

    def charge(self, call_id: str, service_s: float) -> int:
        """Charge ``service_s`` of service; demote past used-up quanta. Returns the new level."""
        if service_s < 0:
            raise ValueError(f"service must be >= 0, got {service_s}")
        e = self._entries[call_id]
        e.service_s += service_s
        if self.demote:
            e.level_service_s += service_s
            level = e.level
            bottom = self.config.num_levels - 1
            while level < bottom and e.level_service_s >= self._quanta[level]:
                e.level_service_s -= self._quanta[level]
                level += 1
            if level != e.level:
                self._detach(e)
                self._append(e, level)
        if e.waiting_since is not None:
            self._push_deadline(e)  # service charged while waiting moves its deadline
        return e.level

    # --- anti-starvation ----------------------------------------------------------------------
    def starvation_ratio(self, call_id: str, now: float) -> float:
        """``(program wait + call wait) / (program service + call service)`` at ``now``."""
        e = self._entries[call_id]
        wait = e.program_wait_s + e.wait_s
        if e.waiting_since is not None:
            wait += max(0.0, now - e.waiting_since)
        service = e.program_service_s + e.service_s
        if service <= 0.0:
            return math.inf if wait > 0 else 0.0
        return wait / service

    def promote_starved(self, now: float) -> list[str]:
        """Move every waiting call that meets the beta rule to the top; returns their ids."""
        promoted: list[str] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, call_id, version = heapq.heappop(heap)
            e = self._entries.get(call_id)
            if e is None or e.version != version or e.waiting_since is None or e.level == 0:
                continue
            self._detach(e)
            e.wait_s = 0.0
            e.service_s = 0.0
            e.level_service_s = 0.0
            e.waiting_since = now
            self._invalidate(e)
            self._append(e, 0)
            promoted.append(call_id)
        return promoted

    # --- ordering -----------------------------------------------------------------------------
    def order(self) -> Iterator[str]:
        """Call ids top-down, FCFS within a level. Do not mutate the queues while iterating."""
        for q in self._levels:
            yield from q

    def order_waiting(self) -> Iterator[str]:
        """The waiting calls only, in :meth:`order` order. Do not mutate while iterating."""
        for w in self._waiting:
            for _, call_id in w:
                yield call_id

    # --- internals ----------------------------------------------------------------------------
    def _append(self, e: _Entry, level: int) -> None:
        self._seq += 1
        e.level = level
        e.seq = self._seq
        self._levels[level][e.call_id] = e
        if e.waiting_since is not None:
            self._waiting[level].append((e.seq, e.call_id))  # the largest seq: stays sorted

    def _detach(self, e: _Entry) -> None:
        del self._levels[e.level][e.call_id]
        if e.waiting_since is not None:
            self._unindex_waiting(e)

    def _unindex_waiting(self, e: _Entry) -> None:
        w = self._waiting[e.level]
        i = bisect.bisect_left(w, (e.seq, e.call_id))
        del w[i]

    def _invalidate(self, e: _Entry) -> None:
        self._version += 1
        e.version = self._version

    def _push_deadline(self, e: _Entry) -> None:
        if not self.starvation or e.waiting_since is None or e.level == 0:
            return
        self._invalidate(e)
        deadline = (
            e.waiting_since
            + self.config.beta * (e.program_service_s + e.service_s)
            - e.program_wait_s
            - e.wait_s
        )
        heapq.heappush(self._deadlines, (deadline, e.seq, e.call_id, e.version))
