"""The scheduler's door (services/scheduler/door_gate.py): arrival order, no deadlock, a bounded queue,
and an open door where engines report no KV capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autellix.policy.door import DoorConfig, SpillMeter
from autellix.proto import CallRequest, EngineHeartbeat, ProgramService
from autellix.services.scheduler.door_gate import DoorFull, DoorGate


def hb(used: int = 0, retained: int = 0, capacity: int = 1000, engine: str = "e1") -> EngineHeartbeat:
    return EngineHeartbeat(
        engine_id=engine, backend="sim", model="m", kv_tokens_used=used, kv_tokens_capacity=capacity,
        kv_tokens_idle_contexts=retained,
    )


def req(program: str, call: str) -> CallRequest:
    return CallRequest(program_id=program, call_id=call, prompt="hi", max_tokens=4)


def ended(program: str) -> ProgramService:
    return ProgramService(program_id=program, service_s=1.0, ended=True)


def let_in(gate: DoorGate, program: str, call: str, now: float) -> list[str]:
    """Submit a call; the call ids that go to an engine now (it, or those the door releases)."""
    if gate.submit(req(program, call), "inbox", now):
        return [call]
    return [h.request.call_id for h, _ in gate.release(now)]


def test_door_admits_in_arrival_order_while_the_working_set_fits() -> None:
    gate = DoorGate()
    gate.on_heartbeat(hb())
    assert let_in(gate, "A", "a1", 0.0) == ["a1"]  # nothing active: the head goes in
    gate.started("A")
    assert let_in(gate, "A", "a2", 0.1) == ["a2"]  # inside: its calls pass
    gate.on_heartbeat(hb(used=600, retained=300))  # A holds 900 of 1000
    assert let_in(gate, "B", "b1", 1.0) == [] and let_in(gate, "C", "c1", 1.5) == []
    assert let_in(gate, "B", "b2", 2.0) == []  # B's parallel call waits with it
    assert gate.waiting_programs() == 2
    gate.on_program_service(ended("A"))
    released = gate.release(3.0)
    assert [(h.request.call_id, round(w, 3)) for h, w in released] == [("b1", 2.0), ("b2", 1.0)]
    assert gate.release(3.0) == []  # C waits until B's figures show (one program at a time meanwhile)
    gate.started("B")
    gate.on_heartbeat(hb(used=100, retained=50))
    assert [h.request.call_id for h, _ in gate.release(3.5)] == ["c1"]


def test_spill_gate_reads_the_engines_tier_from_their_heartbeats() -> None:
    def tiered(spill: float) -> EngineHeartbeat:
        return EngineHeartbeat(
            engine_id="e1", backend="sim", model="m", kv_tokens_used=600, kv_tokens_capacity=1000,
            kv_tokens_idle_contexts=300, kv_tokens_tier_capacity=4000, tier_spill_share=spill,
        )

    gate = DoorGate(DoorConfig(spill_gate=0.02))
    gate.on_heartbeat(hb())
    assert let_in(gate, "A", "a1", 0.0) == ["a1"]
    gate.started("A")
    gate.on_heartbeat(tiered(0.01))  # over the working set, but the tier's spill is cheap: open
    assert let_in(gate, "B", "b1", 1.0) == ["b1"]
    gate.started("B")
    gate.on_heartbeat(tiered(0.10))  # the spill costs 10% of busy time: the working-set rule holds C
    assert let_in(gate, "C", "c1", 2.0) == []
    gate.on_heartbeat(tiered(0.0))
    assert [h.request.call_id for h, _ in gate.release(3.0)] == ["c1"]
    # without the gate the same reports hold B at once
    gate = DoorGate(DoorConfig(spill_gate=None))
    gate.on_heartbeat(hb())
    assert let_in(gate, "A", "a1", 0.0) == ["a1"]
    gate.started("A")
    gate.on_heartbeat(tiered(0.0))
    assert let_in(gate, "B", "b1", 1.0) == []


def test_spill_meter_reads_complete_windows_of_busy_time() -> None:
    meter = SpillMeter(window_s=5.0)
    assert meter.observe(2.0, 1.0) == 0.0  # the window is not complete yet
    assert meter.observe(5.0, 1.0) == pytest.approx(0.2)
    assert meter.observe(8.0, 3.0) == pytest.approx(0.2)  # held until the next window completes
    assert meter.observe(10.0, 3.0) == pytest.approx(0.4)


def test_a_program_larger_than_the_budget_still_runs_alone() -> None:
    gate = DoorGate()
    gate.on_heartbeat(hb(used=5000))  # whatever the engines report
    assert let_in(gate, "huge", "h1", 0.0) == ["h1"]
    gate.started("huge")
    assert let_in(gate, "next", "n1", 1.0) == []
    gate.on_program_service(ended("huge"))
    assert [h.request.call_id for h, _ in gate.release(2.0)] == ["n1"]


def test_door_queue_is_bounded() -> None:
    gate = DoorGate(max_waiting=2)
    gate.on_heartbeat(hb())
    let_in(gate, "A", "a1", 0.0)
    gate.started("A")
    gate.on_heartbeat(hb(used=950))
    let_in(gate, "B", "b1", 1.0)
    let_in(gate, "C", "c1", 1.0)
    with pytest.raises(DoorFull, match="waiting for engine memory"):
        gate.submit(req("D", "d1"), "inbox", 1.0)
    assert gate.submit(req("B", "b2"), "inbox", 1.0) is False  # a waiting program's call still queues
    assert gate.refused_total == 1


def test_door_is_open_without_memory_reports_and_for_known_programs() -> None:
    gate = DoorGate()
    gate.on_heartbeat(hb(capacity=0))  # a backend without a prefix cache reports no capacity
    assert gate.open and all(gate.submit(req(f"p{i}", "c"), "inbox", 0.0) for i in range(5))
    gate.on_heartbeat(hb(used=990))
    assert not gate.open
    gate.on_program_service(ProgramService(program_id="old", service_s=2.0))  # ran before: inside
    assert gate.submit(req("old", "c9"), "inbox", 1.0)
    assert not gate.submit(req("new", "n1"), "inbox", 1.0)
    gate.forget_engine("e1")  # the only reporting engine died: open again, the waiting go in
    assert [h.request.call_id for h, _ in gate.release(2.0)] == ["n1"]


def test_programs_let_in_elsewhere_pass_and_count_only_in_the_working_set() -> None:
    """A program the tracker knows (another scheduler let it in) is not one of the door's own: its KV
    weighs in the working set, not in the door's program count, so the door admits cautiously."""
    gate = DoorGate()
    gate.on_heartbeat(hb(used=100, retained=300))
    gate.on_program_service(ProgramService(program_id="elsewhere", service_s=1.0))
    assert let_in(gate, "elsewhere", "e1", 0.0) == ["e1"]
    assert let_in(gate, "A", "a1", 0.0) == ["a1"]  # none of the door's own is active: the head goes in
    gate.started("A")
    gate.on_heartbeat(hb(used=200, retained=300))
    # 500 + 500 (the whole working set over the door's one program) > 0.9 * 1000: B waits
    assert let_in(gate, "B", "b1", 1.0) == []
    gate.on_program_service(ended("A"))
    assert [h.request.call_id for h, _ in gate.release(2.0)] == ["b1"]
    gate.on_program_service(ended("elsewhere"))
    assert gate.submit(req("elsewhere", "e2"), "inbox", 3.0) is False  # ended: a new session queues


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("call"), st.integers(0, 7)),
            st.tuples(st.just("beat"), st.integers(0, 1500), st.integers(0, 1500)),
            st.tuples(st.just("end"), st.integers(0, 7)),
            st.tuples(st.just("gone"), st.just(0)),
        ),
        max_size=60,
    ),
    max_waiting=st.integers(1, 4),
)
def test_no_call_lost_or_duplicated_and_programs_go_in_arrival_order(ops, max_waiting) -> None:  # type: ignore[no-untyped-def]
    gate = DoorGate(max_waiting=max_waiting)
    gate.on_heartbeat(hb())
    submitted: list[str] = []
    refused: list[str] = []
    routed: list[str] = []
    arrivals: list[str] = []  # programs in the order they first reached the door
    let_in_order: list[str] = []
    now = 0.0

    def route(calls: list[str]) -> None:
        for call in calls:
            program = call.split(".")[0]
            if program not in let_in_order:
                let_in_order.append(program)
            gate.started(program)
        routed.extend(calls)

    for i, op in enumerate(ops):
        now += 0.1
        if op[0] == "call":
            program, call = f"p{op[1]}", f"p{op[1]}.{i}"
            try:
                passed = gate.submit(req(program, call), "inbox", now)
            except DoorFull:
                refused.append(call)
                continue
            submitted.append(call)
            if program not in arrivals:
                arrivals.append(program)
            route([call] if passed else [])
        elif op[0] == "beat":
            gate.on_heartbeat(hb(used=op[1], retained=op[2]))
        elif op[0] == "end":
            gate.on_program_service(ended(f"p{op[1]}"))
        else:
            gate.forget_engine("e1")
        route([h.request.call_id for h, _ in gate.release(now)])
    for program in list(arrivals):  # every program ends: the door lets everyone in, one at a time
        gate.on_program_service(ended(program))
        route([h.request.call_id for h, _ in gate.release(now + 1)])
        if gate.waiting_programs() == 0:
            break
    for _ in range(20):  # each round ends every program inside, so the head of the queue goes in
        if not gate.waiting_programs():
            break
        for program in list(let_in_order):
            gate.on_program_service(ended(program))
        route([h.request.call_id for h, _ in gate.release(now + 2)])
    assert sorted(routed) == sorted(submitted), "a call was lost or routed twice"
    assert let_in_order == arrivals, "a program overtook one that arrived before it"
    assert all(c not in routed for c in refused)
