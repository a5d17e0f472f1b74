"""Preemption hysteresis: a waiting call displaces a running one only from ``preempt_gap`` levels above.

One rule (:meth:`MultiLevelQueues.displaces`) that the engine core and the simulator's engine model
both apply; the same hand-built scenario runs on each."""

from __future__ import annotations

import pytest

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.engine.cost_model import CostModel
from autellix.engine.sim_backend import SimBackend, VirtualClock
from autellix.policy.mlfq import MLFQConfig, MultiLevelQueues
from autellix.policy.variants import make_queue
from autellix.sim.engine_model import SimCall, SimEngine, SimEngineConfig
from autellix.sim.workload import CallSpec as SimCallSpec

# boundaries 1, 2, 4, 8, 16 s: priority 0.5 -> level 0, 1.5 -> level 1, 2.5 -> level 2
LEVELS = dict(num_levels=6, first_boundary_s=1.0)


def test_queue_displaces_only_from_the_gap_above() -> None:
    for gap, near, far in ((0, True, True), (1, True, True), (2, False, True), (3, False, False)):
        q = MultiLevelQueues(MLFQConfig(**LEVELS, preempt_gap=gap))  # type: ignore[arg-type]
        q.add("run", 2.5, 0.0, program_service_s=2.5)
        q.started("run", 0.0)
        q.add("near", 1.5, 0.0, program_service_s=1.5)
        q.add("far", 0.5, 0.0, program_service_s=0.5)
        assert (q.displaces("near", "run"), q.displaces("far", "run")) == (near, far), gap
        assert not q.displaces("run", "far")  # never from below
    # no gap: an earlier arrival at the same level is ahead in the order, and displaces
    q = MultiLevelQueues(MLFQConfig(**LEVELS, preempt_gap=0))  # type: ignore[arg-type]
    q.add("early", 2.5, 0.0, program_service_s=2.5)
    q.add("late", 2.5, 0.0, program_service_s=2.5)
    assert q.displaces("early", "late") and not q.displaces("late", "early")
    with pytest.raises(ValueError):
        MLFQConfig(preempt_gap=-1)


class Clock(VirtualClock):
    @property
    def now(self) -> float:
        return self.now_s


def core_run(gap: int, newcomer: float) -> tuple[list[str], int]:
    """Engine core, one batch slot: 'low' (level 2) runs; a newcomer stamped ``newcomer`` arrives."""
    backend = SimBackend(clock=(clock := Clock()))
    core = EngineCore(
        backend,
        CoreConfig(
            max_batch=1, schedule_every=1, policy="plas", preempt_mode="swap",
            mlfq=MLFQConfig(**LEVELS, preempt_gap=gap),  # type: ignore[arg-type]
        ),
    )
    core.add(CoreCall("low", "a", [1] * 20, 40, priority=2.5, program_service_s=2.5), clock.now)
    finished: list[str] = []
    for i in range(200):
        if i == 3:
            core.add(CoreCall("new", "b", [1] * 20, 5, priority=newcomer, program_service_s=newcomer), clock.now)
        outcome = core.step(clock)
        if outcome is None:
            break
        finished += [e.call_id for e in outcome.events if isinstance(e, FinishEvent)]
    return finished, core.total_preemptions


def sim_run(gap: int, newcomer: float) -> tuple[list[str], int]:
    """The simulator's engine model, the same scenario."""
    queue = make_queue("plas", MLFQConfig(**LEVELS, preempt_gap=gap))  # type: ignore[arg-type]
    engine = SimEngine(0, SimEngineConfig(cost=CostModel(max_batch=1), schedule_every=1), queue, preemptive=True)

    def call(name: str, output: int) -> SimCall:
        return SimCall(name, None, name, SimCallSpec(name, (), 20, output, 0.0, None), 20, output)

    engine.enqueue(call("low", 40), 2.5, 0.0, 0.0, 2.5)
    finished: list[str] = []
    t = engine.plan(0.0)
    assert t is not None
    finished += [c.key for c in engine.on_step_end(t)]  # the prefill step
    t = engine.plan(t)  # one decode run to the end of 'low', unless an arrival cuts it short
    assert t is not None
    cut = engine.enqueue(call("new", 5), newcomer, t / 4, 0.0, newcomer)
    if cut is not None:
        t = cut
    while t is not None:
        finished += [c.key for c in engine.on_step_end(t)]
        t = engine.plan(t)
    return finished, engine.stat_preemptions


@pytest.mark.parametrize("run", [core_run, sim_run], ids=["engine-core", "simulator"])
def test_one_level_ahead_does_not_swap_a_running_call_out(run) -> None:  # type: ignore[no-untyped-def]
    # gap 2: a newcomer one level above waits for the running call; two levels above displaces it
    assert run(2, 1.5) == (["low", "new"], 0)
    finished, preemptions = run(2, 0.5)
    assert finished == ["new", "low"] and preemptions == 1
    # gap 1: one level above is enough
    finished, preemptions = run(1, 1.5)
    assert finished == ["new", "low"] and preemptions == 1


def test_kv_pressure_is_relieved_at_scheduling_points_too() -> None:
    # every step is a scheduling point; two calls whose decode growth overflows the KV between them
    backend = SimBackend(clock=(clock := Clock()))
    core = EngineCore(
        backend, CoreConfig(max_batch=2, kv_capacity_tokens=60, schedule_every=1, policy="plas", preempt_mode="swap")
    )
    core.add(CoreCall("a", "pa", [1] * 20, 30, priority=0.0), clock.now)
    core.add(CoreCall("b", "pb", [1] * 20, 30, priority=0.0), clock.now)
    reasons: list[str] = []
    finished: list[str] = []
    while (outcome := core.step(clock)) is not None:
        reasons += [p.reason for p in outcome.plan.preemptions]
        finished += [e.call_id for e in outcome.events if isinstance(e, FinishEvent)]
        running = [core.get(c) for c in core.running_ids()]
        assert sum(s.context_len for s in running if s is not None) <= 60
    assert sorted(finished) == ["a", "b"] and "kv pressure" in reasons
