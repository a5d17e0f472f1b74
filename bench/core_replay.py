"""Replay the simulator's programs through the real engine core, in virtual time.

One :class:`autellix.engine.core.EngineCore` drives one :class:`autellix.engine.sim_backend.SimBackend`
on a :class:`autellix.engine.sim_backend.VirtualClock`: every step takes the backend's modelled time
(cost model, tier transfers, preemption swaps), nothing sleeps. Programs arrive, think and fan out as
the simulator (:mod:`autellix.sim.simulator`) plays them; calls are stamped by the same policy code;
prompts are token lists built as the live benchmark (:mod:`autellix.bench.live`) builds its texts (the
context parent's prompt and answer, then a marker unique in the program and filler), so the backend's
prefix cache matches them by content. A program's contexts are ended on the engine when its last call
finishes, as the simulator ends them.

The result is a :class:`autellix.sim.simulator.SimResult`, so :func:`autellix.sim.metrics.summarise`
gives the simulator's own figures. This is the engine side of the differential check between the
simulator's closed-form engine model (:mod:`autellix.sim.engine_model`) and the engine the mesh runs
(tests/test_differential.py); benchmarks can use it to run the engine core on a workload without a
mesh.

Event granularity: calls that arrive while a step runs join at the step's end (the simulator cuts a
decode run at the next step boundary too). Single engine only (no balancer).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.engine.cost_model import CostModel, llama31_8b_h100
from autellix.engine.sim_backend import SimBackend, VirtualClock
from autellix.engine.sim_context_store import Retention
from autellix.policy.mlfq import MLFQConfig, MultiLevelQueues
from autellix.policy.program_account import ProgramAccount
from autellix.policy.variants import stamp
from autellix.sim.engine_model import SIM_SCHEDULE_EVERY
from autellix.sim.simulator import CallRecord, ProgramResult, SimResult
from autellix.sim.workload import ProgramSpec


@dataclass(frozen=True, slots=True)
class CoreReplayConfig:
    policy: str = "fcfs"
    cost: CostModel = field(default_factory=llama31_8b_h100)
    carry_context: bool = True
    #: a scheduling point every N steps (the simulator's ``schedule_every``)
    schedule_every: int = SIM_SCHEDULE_EVERY
    retention: Retention = "lru"
    tier_tokens: int = 0
    #: tell the engine a program ended when its last call finishes
    end_programs: bool = True
    mlfq: MLFQConfig = field(default_factory=MLFQConfig)


@dataclass(slots=True)
class _Call:
    spec_index: int
    prompt: list[int]
    submit_s: float = 0.0


@dataclass(slots=True)
class _Program:
    index: int
    spec: ProgramSpec
    account: ProgramAccount
    pending: dict[int, int]
    #: call id -> indices of the calls that depend on it
    children: dict[str, list[int]]
    calls: dict[str, _Call] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    remaining_output: int = 0
    done: int = 0
    program_wait_s: float = 0.0
    program_service_s: float = 0.0
    first_token_s: float = -1.0
    finish_s: float = 0.0


_ARRIVE, _SUBMIT = 0, 1


class CoreReplay:
    def __init__(self, programs: Sequence[ProgramSpec], config: CoreReplayConfig | None = None) -> None:
        self.config = cfg = config or CoreReplayConfig()
        self.programs = sorted(programs, key=lambda p: p.arrival_s)
        cost = cfg.cost
        self.clock = VirtualClock()
        self.backend = SimBackend(
            cost, clock=self.clock, retention=cfg.retention, tier_tokens=cfg.tier_tokens,
            prefix_cache=cfg.carry_context,
        )
        self.core = EngineCore(
            self.backend,
            CoreConfig(
                max_batch=cost.max_batch,
                max_batched_tokens=cost.max_batched_tokens,
                kv_capacity_tokens=cost.kv_capacity_tokens,
                policy=cfg.policy,
                schedule_every=cfg.schedule_every,
                preempt_mode="swap",  # the simulator swaps every preempted call
                mlfq=cfg.mlfq,
            ),
        )
        #: as the simulator: a prompt is cut to fit half the KV capacity with its output
        self.max_context = max(2, min(cost.max_context, cost.kv_capacity_tokens // 2))
        self._tok = self.backend.encode_prompt("tok")[0]
        self._filler = self.backend.encode_prompt("www")[0]
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._states: dict[str, _Program] = {}
        self._records: list[ProgramResult | None] = [None] * len(self.programs)
        self._calls: list[CallRecord] = []
        self.stat_swap_s = 0.0

    def _push(self, t: float, kind: int, obj: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    def run(self) -> SimResult:
        started = time.perf_counter()
        for i, p in enumerate(self.programs):
            self._push(p.arrival_s, _ARRIVE, i)
        clock, core, heap = self.clock, self.core, self._heap
        while heap or not core.idle:
            while heap and heap[0][0] <= clock.now_s:
                t, _, kind, obj = heapq.heappop(heap)
                if kind == _ARRIVE:
                    self._arrive(obj, t)  # type: ignore[arg-type]
                else:
                    self._submit(obj, t)  # type: ignore[arg-type]
            outcome = core.step(clock)
            if outcome is None:
                if not heap:
                    if core.idle:
                        break
                    raise RuntimeError("the engine core holds calls but plans no step")
                clock.now_s = max(clock.now_s, heap[0][0])  # idle until the next event
                continue
            for stats in outcome.result.swaps.values():
                self.stat_swap_s += stats.elapsed_s
            for event in outcome.events:
                if isinstance(event, FinishEvent):
                    self._complete(event, clock.now_s)
        records = [r for r in self._records if r is not None]
        if len(records) != len(self.programs):
            raise RuntimeError(f"{len(self.programs) - len(records)} programs never finished")
        cache = self.backend.cache_stats()
        q = core.queue
        return SimResult(
            config=None,  # type: ignore[arg-type]
            programs=records,
            calls=self._calls,
            makespan_s=clock.now_s,
            wall_s=time.perf_counter() - started,
            engine_stats=[
                {
                    "steps": self.backend.stat_steps,
                    "preemptions": core.total_preemptions,
                    "swap_s": self.stat_swap_s,
                    "prompt_tokens": cache.prompt_tokens,
                    "cache_hit_tokens": cache.hit_tokens,
                    "tier_hit_tokens": cache.tier_hit_tokens,
                    "tier_s": self.backend.stat_tier_s,
                }
            ],
            boundaries=tuple(q.boundaries) if isinstance(q, MultiLevelQueues) else (),
        )

    # -- programs ------------------------------------------------------------------------------
    def _arrive(self, index: int, t: float) -> None:
        spec = self.programs[index]
        prog = _Program(
            index=index,
            spec=spec,
            account=ProgramAccount(spec.program_id),
            pending={i: len(c.parents) for i, c in enumerate(spec.calls)},
            children={c.call_id: [] for c in spec.calls},
            remaining_output=spec.output_tokens,
        )
        for i, c in enumerate(spec.calls):
            for p in c.parents:
                prog.children[p].append(i)
        self._states[spec.program_id] = prog
        for i, c in enumerate(spec.calls):
            if not c.parents:
                self._push(t + c.think_s, _SUBMIT, (prog, i))

    def _prompt(self, prog: _Program, i: int) -> list[int]:
        """The call's prompt as the live benchmark sends it: history, then a marker and filler."""
        c = prog.spec.calls[i]
        ids = self.backend.encode_prompt(f"q{i:x}") + [self._filler] * (c.new_prompt_tokens - 1)
        if self.config.carry_context and c.context_parent is not None:
            parent = prog.calls[c.context_parent]
            ids = parent.prompt + [self._tok] * prog.outputs[c.context_parent] + ids
        limit = max(1, self.max_context - c.output_tokens)
        return ids[-limit:] if len(ids) > limit else ids

    def _submit(self, item: tuple[_Program, int], t: float) -> None:
        prog, i = item
        c = prog.spec.calls[i]
        call = prog.calls[c.call_id] = _Call(i, self._prompt(prog, i), submit_s=t)
        priority = stamp(self.config.policy, prog.account, list(c.parents), prog.remaining_output)
        self.core.add(
            CoreCall(
                call_id=f"{prog.spec.program_id}/{c.call_id}",
                program_id=prog.spec.program_id,
                prompt_ids=call.prompt,
                max_tokens=c.output_tokens,
                priority=priority,
                ignore_eos=True,
                program_wait_s=prog.program_wait_s,
                program_service_s=prog.account.service_s,
            ),
            t,
        )

    def _complete(self, event: FinishEvent, t: float) -> None:
        state = event.state
        prog = self._states[state.spec.program_id]
        call_id = state.spec.call_id.split("/", 1)[1]
        c = prog.spec.calls[prog.calls[call_id].spec_index]
        prog.outputs[call_id] = len(state.output_ids)
        prog.account.complete(call_id, list(c.parents), state.service_s)
        prog.program_wait_s += state.queue_wait_s
        prog.program_service_s += state.service_s
        prog.remaining_output -= c.output_tokens
        prog.done += 1
        first = state.first_token_at if state.first_token_at is not None else t
        if prog.first_token_s < 0 or first < prog.first_token_s:
            prog.first_token_s = first
        self._calls.append(
            CallRecord(
                prog.index, prog.calls[call_id].submit_s, first, t, len(state.output_ids), state.queue_wait_s,
                state.service_s, state.preemptions, 0, len(state.spec.prompt_ids),
            )
        )
        for child in prog.children[call_id]:
            prog.pending[child] -= 1
            if prog.pending[child] == 0:
                self._push(t + prog.spec.calls[child].think_s, _SUBMIT, (prog, child))
        if prog.done == len(prog.spec.calls):
            ps = prog.spec
            self._records[prog.index] = ProgramResult(
                ps.program_id, ps.kind, ps.arrival_s, t, ps.output_tokens, len(ps.calls), prog.first_token_s,
                prog.program_wait_s, prog.program_service_s,
            )
            del self._states[ps.program_id]
            if self.config.end_programs:
                self.core.end_program(ps.program_id)


def replay(programs: Sequence[ProgramSpec], config: CoreReplayConfig | None = None) -> SimResult:
    return CoreReplay(programs, config).run()
