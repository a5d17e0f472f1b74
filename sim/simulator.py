"""Discrete-event simulation of programs on engines, in virtual time. Deterministic.

Events, in time order (ties in the order they were scheduled):

- a program arrives: its root calls are submitted ``think_s`` later;
- a call is submitted: the policy stamps its priority from the program's account (PLAS attained
  service, ATLAS critical path, SRPT the oracle's remaining output tokens), the balancer picks an
  engine from the engines' KV loads, and the engine queues it;
- an engine segment ends (see :mod:`autellix.sim.engine_model`): finished calls are charged to
  their programs; a call whose parents have all finished is submitted ``think_s`` later.

Memory (``SimConfig.memory``, one of :data:`MEMORY_NAMES`):

- ``lru``: the engines' prefix cache evicts least recently used first (the default, as before);
- ``retain``: the shared retention order (contained entries, ended programs' contexts, then LRU); a
  program ends when its last call finishes and every engine is told;
- ``tier``: ``retain`` plus a CPU pool of ``tier_scale`` x the GPU KV budget per engine for evicted
  contexts of active programs, swapped back in instead of re-prefilled when cheaper;
- ``door``: ``retain`` plus admission by working set (:class:`autellix.policy.door.Door`): a new
  program's first calls are submitted only when the door lets it in; its wait there is part of its
  latency (it still counts from its arrival) and is recorded as ``door_wait_s``;
- ``all``: ``tier`` plus ``door``.

Queue boundaries of calibrated policies start at the config's ladder and are replaced by the
calibrator's (the first boundary at a low percentile of observed call service, doubling) once it
has seen enough calls, then every ``recalibrate_every`` completions.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from autellix.engine.cost_model import CostModel, llama31_8b_h100
from autellix.policy.balancer import make_balancer
from autellix.policy.calibration import ServiceCalibrator
from autellix.policy.door import Door, DoorConfig
from autellix.policy.mlfq import MLFQConfig, MultiLevelQueues
from autellix.policy.program_account import ProgramAccount
from autellix.policy.variants import make_queue, policy_spec, stamp
from autellix.sim.engine_model import SIM_SCHEDULE_EVERY, SimCall, SimEngine, SimEngineConfig
from autellix.sim.workload import ProgramSpec, prompt_lengths

MEMORY_NAMES: tuple[str, ...] = ("lru", "retain", "tier", "door", "all")


@dataclass(frozen=True, slots=True)
class MemorySpec:
    retain: bool
    tier: bool
    door: bool


def memory_spec(name: str) -> MemorySpec:
    if name not in MEMORY_NAMES:
        raise ValueError(f"unknown memory variant {name!r}; expected one of {', '.join(MEMORY_NAMES)}")
    return MemorySpec(
        retain=name != "lru", tier=name in ("tier", "all"), door=name in ("door", "all")
    )


@dataclass(frozen=True, slots=True)
class SimConfig:
    policy: str = "plas"
    engines: int = 1
    balancer: str = "locality"
    cost: CostModel = field(default_factory=llama31_8b_h100)
    #: multiplies the cost model's KV budget (the regime map sweeps 0.25, 0.5, 1)
    kv_scale: float = 1.0
    #: a call's prompt carries its context chain's history (else: new input only, no prefix reuse)
    carry_context: bool = True
    schedule_every: int = SIM_SCHEDULE_EVERY
    mlfq: MLFQConfig = field(default_factory=MLFQConfig)
    calibrate: bool = True
    recalibrate_every: int = 500
    locality_threshold: int = 2048
    #: program-level memory management, one of MEMORY_NAMES
    memory: str = "lru"
    #: CPU tier size per engine, in multiples of its GPU KV budget (memory "tier" and "all")
    tier_scale: float = 4.0
    door: DoorConfig = field(default_factory=DoorConfig)
    #: check the engines' invariants after every scheduling decision (slow; tests)
    audit: bool = False

    def __post_init__(self) -> None:
        policy_spec(self.policy)
        memory_spec(self.memory)
        if self.tier_scale < 0:
            raise ValueError(f"tier_scale must be >= 0, got {self.tier_scale}")
        if self.engines < 1:
            raise ValueError(f"need at least one engine, got {self.engines}")
        if self.kv_scale <= 0:
            raise ValueError(f"kv_scale must be > 0, got {self.kv_scale}")

    def engine_cost(self) -> CostModel:
        return replace(self.cost, kv_capacity_tokens=int(self.cost.kv_capacity_tokens * self.kv_scale))


@dataclass(slots=True)
class ProgramResult:
    program_id: str
    kind: str
    arrival_s: float
    finish_s: float
    output_tokens: int
    n_calls: int
    first_token_s: float
    #: the time its calls waited in engine queues, and the service they received (modelled seconds)
    program_wait_s: float
    program_service_s: float
    #: time spent at the door before the first call was submitted (memory "door" and "all")
    door_wait_s: float = 0.0


@dataclass(slots=True)
class CallRecord:
    program_index: int
    submit_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int
    queue_wait_s: float
    service_s: float
    preemptions: int
    cached_tokens: int
    prompt_tokens: int


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    programs: list[ProgramResult]
    calls: list[CallRecord]
    makespan_s: float
    wall_s: float
    engine_stats: list[dict[str, float]]
    boundaries: tuple[float, ...]


class _Program:
    __slots__ = (
        "account",
        "calls",
        "children",
        "done",
        "door_wait_s",
        "first_token_s",
        "index",
        "pending",
        "program_service_s",
        "program_wait_s",
        "remaining_output",
        "spec",
        "started",
    )

    def __init__(self, index: int, spec: ProgramSpec, prompts: dict[str, int], carry: bool) -> None:
        self.index = index
        self.spec = spec
        self.account = ProgramAccount(spec.program_id)
        self.calls: dict[str, SimCall] = {}
        self.children: dict[str, list[str]] = {c.call_id: [] for c in spec.calls}
        self.pending: dict[str, int] = {}
        for c in spec.calls:
            history = None
            if carry and c.context_parent is not None:
                parent = self.calls[c.context_parent]
                if parent.prompt_tokens + parent.output_tokens + c.new_prompt_tokens == prompts[c.call_id]:
                    history = parent  # not truncated: the parent's whole context is this prompt's prefix
            self.calls[c.call_id] = SimCall(
                key=f"{spec.program_id}/{c.call_id}",
                program=self,
                program_id=spec.program_id,
                spec=c,
                prompt_tokens=prompts[c.call_id],
                output_tokens=c.output_tokens,
                history=history,
            )
            self.pending[c.call_id] = len(c.parents)
            for p in c.parents:
                self.children[p].append(c.call_id)
        self.remaining_output = spec.output_tokens
        self.done = 0
        self.program_wait_s = 0.0
        self.program_service_s = 0.0
        self.first_token_s = -1.0
        self.door_wait_s = 0.0
        self.started = False


_ARRIVE, _SUBMIT, _STEP, _WAKE = 0, 1, 2, 3


class Simulation:
    def __init__(self, programs: Sequence[ProgramSpec], config: SimConfig) -> None:
        self.config = config
        self.programs = sorted(programs, key=lambda p: p.arrival_s)
        self.spec = policy_spec(config.policy)
        cost = config.engine_cost()
        self.max_context = max(2, min(cost.max_context, cost.kv_capacity_tokens // 2))
        self.memory = memory_spec(config.memory)
        engine_config = SimEngineConfig(
            cost=cost,
            schedule_every=config.schedule_every,
            prefix_cache=config.carry_context,
            retain=self.memory.retain,
            tier_tokens=int(cost.kv_capacity_tokens * config.tier_scale) if self.memory.tier else 0,
        )
        self.engines = [
            SimEngine(i, engine_config, make_queue(config.policy, config.mlfq), self.spec.preemptive)
            for i in range(config.engines)
        ]
        self.balancer = make_balancer(config.balancer, config.locality_threshold)
        self.calibrator = ServiceCalibrator(config.mlfq.calibration_percentile)
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = 0
        self._records: list[ProgramResult | None] = [None] * len(self.programs)
        #: run-time state of every program that has arrived (tests inspect it)
        self.states: list[_Program] = []
        self._call_records: list[CallRecord] = []
        self._completions = 0
        self._waking: set[int] = set()
        self.door = Door(config.door) if self.memory.door else None
        self._by_id: dict[str, _Program] = {}
        self.now = 0.0

    def _push(self, t: float, kind: int, obj: object, version: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj, version))

    def run(self) -> SimResult:
        started = time.perf_counter()
        for i, p in enumerate(self.programs):
            self._push(p.arrival_s, _ARRIVE, i)
        heap = self._heap
        audit = self.config.audit
        while heap:
            t, _, kind, obj, version = heapq.heappop(heap)
            self.now = t
            if kind == _STEP:
                engine = self.engines[obj]  # type: ignore[index]
                if engine.version != version or not engine.busy:
                    continue
                for c in engine.on_step_end(t):
                    self._complete(c, t)
                self._plan(engine, t)
                if self.door is not None and self.door.waiting:
                    self._door_poll(t)
                if audit:
                    engine.audit()
            elif kind == _WAKE:
                engine = self.engines[obj]  # type: ignore[index]
                self._waking.discard(engine.index)
                if not engine.busy:
                    self._plan(engine, t)
            elif kind == _SUBMIT:
                self._submit(obj, t)  # type: ignore[arg-type]
            else:
                self._arrive(obj, t)  # type: ignore[arg-type]
        records = [r for r in self._records if r is not None]
        if len(records) != len(self.programs):
            raise RuntimeError(f"{len(self.programs) - len(records)} programs never finished")
        stats = [
            {
                "steps": e.stat_steps,
                "busy_s": e.busy_s,
                "preemptions": e.stat_preemptions,
                "swap_s": e.stat_swap_s,
                "prefill_tokens": e.stat_prefill_tokens,
                "prompt_tokens": e.stat_prompt_tokens,
                "cache_hit_tokens": e.stat_cache_hit_tokens,
                "evicted_active_tokens": e.stat_evicted_active_tokens,
                "tier_out_tokens": e.stat_tier_out_tokens,
                "tier_in_tokens": e.stat_tier_in_tokens,
                "tier_s": e.stat_tier_s,
                "tier_out_s": e.stat_tier_out_s,
            }
            for e in self.engines
        ]
        q = self.engines[0].queue
        bounds = q.boundaries if isinstance(q, MultiLevelQueues) else ()
        return SimResult(
            config=self.config,
            programs=records,
            calls=self._call_records,
            makespan_s=self.now,
            wall_s=time.perf_counter() - started,
            engine_stats=stats,
            boundaries=bounds,
        )

    def _plan(self, engine: SimEngine, t: float) -> None:
        end = engine.plan(t)
        if end is not None:
            self._push(end, _STEP, engine.index, engine.version)

    def _arrive(self, index: int, t: float) -> None:
        spec = self.programs[index]
        prompts = prompt_lengths(spec, self.config.carry_context, self.max_context)
        prog = _Program(index, spec, prompts, self.config.carry_context)
        self.states.append(prog)
        if self.door is None:
            self._start(prog, t)
            return
        self._by_id[spec.program_id] = prog
        self.door.arrive(spec.program_id, t)
        self._door_poll(t)

    def _start(self, prog: _Program, t: float) -> None:
        for cs in prog.spec.calls:
            if not cs.parents:
                self._push(t + cs.think_s, _SUBMIT, prog.calls[cs.call_id])

    def _door_poll(self, t: float) -> None:
        door = self.door
        assert door is not None
        for e in self.engines:
            door.report(str(e.index), e.kv_capacity_tokens, e.kv_used + e.queued_tokens, e.retained_tokens())
        for program_id in door.admit(t):
            prog = self._by_id[program_id]
            prog.door_wait_s = t - prog.spec.arrival_s
            self._start(prog, t)

    def _submit(self, c: SimCall, t: float) -> None:
        prog: _Program = c.program
        c.submit_s = t
        parents = c.spec.parents
        priority = stamp(self.config.policy, prog.account, list(parents), prog.remaining_output)
        if len(self.engines) == 1:
            engine = self.engines[0]
        else:
            loads = [e.load() for e in self.engines]
            engine = self.engines[int(self.balancer.choose(prog.spec.program_id, c.prompt_tokens, loads))]
        cut = engine.enqueue(c, priority, t, prog.program_wait_s, prog.account.service_s)
        if not prog.started:
            prog.started = True
            if self.door is not None:
                self.door.started(prog.spec.program_id)
        if not engine.busy:
            # plan after every other event at this instant, so simultaneous submissions are
            # scheduled together
            if engine.index not in self._waking:
                self._waking.add(engine.index)
                self._push(t, _WAKE, engine.index)
        elif cut is not None:
            self._push(cut, _STEP, engine.index, engine.version)

    def _complete(self, c: SimCall, t: float) -> None:
        prog: _Program = c.program
        spec = c.spec
        prog.account.complete(spec.call_id, list(spec.parents), c.service_s)
        prog.program_wait_s += c.queue_wait_s
        prog.program_service_s += c.service_s
        prog.remaining_output -= c.output_tokens
        prog.done += 1
        if prog.first_token_s < 0 or c.first_token_s < prog.first_token_s:
            prog.first_token_s = c.first_token_s
        self._call_records.append(
            CallRecord(
                prog.index, c.submit_s, c.first_token_s, t, c.output_tokens, c.queue_wait_s, c.service_s,
                c.preemptions, c.cached_tokens, c.prompt_tokens,
            )
        )
        for child_id in prog.children[spec.call_id]:
            prog.pending[child_id] -= 1
            if prog.pending[child_id] == 0:
                child = prog.calls[child_id]
                self._push(t + child.spec.think_s, _SUBMIT, child)
        self._observe(c.service_s)
        if prog.done == len(prog.calls):
            ps = prog.spec
            self._records[prog.index] = ProgramResult(
                ps.program_id, ps.kind, ps.arrival_s, t, ps.output_tokens, len(ps.calls), prog.first_token_s,
                prog.program_wait_s, prog.program_service_s, prog.door_wait_s,
            )
            self.balancer.forget(ps.program_id)
            for e in self.engines:
                e.end_program(ps.program_id)
            if self.door is not None:
                self.door.ended(ps.program_id)
                del self._by_id[ps.program_id]
                if self.door.waiting:
                    self._door_poll(t)

    def _observe(self, service_s: float) -> None:
        if not (self.config.calibrate and self.spec.calibrated):
            return
        cal = self.calibrator
        cal.observe(service_s)
        self._completions += 1
        due = self._completions == cal.min_samples or (
            self._completions > cal.min_samples and self._completions % self.config.recalibrate_every == 0
        )
        if not due:
            return
        mlfq = self.config.mlfq
        bounds = cal.boundaries(mlfq.num_levels, mlfq.growth)
        if bounds is None:
            return
        for e in self.engines:
            q = e.queue
            if isinstance(q, MultiLevelQueues):
                q.set_boundaries(bounds)


def simulate(programs: Sequence[ProgramSpec], config: SimConfig) -> SimResult:
    return Simulation(programs, config).run()
