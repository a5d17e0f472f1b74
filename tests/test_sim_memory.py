"""Program-level KV memory in the simulator: retention order, CPU tier, door (and their invariants)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import finish_times_under_two_hash_seeds, programs

from autellix.engine.cost_model import CostModel
from autellix.policy.door import Door, DoorConfig
from autellix.policy.retention import RetentionIndex
from autellix.policy.variants import POLICY_NAMES, make_queue
from autellix.sim.engine_model import DONE, SimCall, SimEngine, SimEngineConfig
from autellix.sim.simulator import MEMORY_NAMES, SimConfig, Simulation
from autellix.sim.workload import CallSpec, ProgramSpec


def _call(program_id: str, call_id: str, prompt: int, output: int, history: SimCall | None = None) -> SimCall:
    spec = CallSpec(call_id, (), prompt, output)
    return SimCall(f"{program_id}/{call_id}", None, program_id, spec, prompt, output, history=history, state=DONE)


def _engine(memory: str, budget: int = 1000, tier: int = 0) -> SimEngine:
    cost = CostModel(kv_capacity_tokens=budget)
    config = SimEngineConfig(cost=cost, retain=memory != "lru", tier_tokens=tier)
    return SimEngine(0, config, make_queue("fcfs", None), preemptive=False)


# --- retention order -------------------------------------------------------------------------------
def test_retain_evicts_ended_programs_before_older_active_ones_lru_does_not() -> None:
    kept = {}
    for memory in ("lru", "retain"):
        e = _engine(memory)
        e._cache_put(_call("A", "1", 300, 100))  # oldest, program A still active
        e._cache_put(_call("B", "1", 300, 100))
        e.end_program("B")
        e._cache_put(_call("C", "1", 300, 100))  # 1200 > 1000: one must go
        kept[memory] = {k for k in ("A/1", "B/1", "C/1") if k in e.cache}
    assert kept["lru"] == {"B/1", "C/1"}
    assert kept["retain"] == {"A/1", "C/1"}


def test_retain_evicts_contained_entries_first_and_hits_survive() -> None:
    e = _engine("retain")
    b1 = _call("B", "1", 200, 50)
    e._cache_put(b1)
    e.end_program("B")
    a1 = _call("A", "1", 300, 100)
    e._cache_put(a1)
    a2 = _call("A", "2", 500, 100, history=a1)  # contains a1's context
    e._cache_put(a2)  # 250 + 400 + 600 > 1000
    assert "A/1" not in e.cache and "A/2" in e.cache and "B/1" in e.cache
    assert e.cache.covers("A/1")  # still found inside a2's entry
    assert e.cache.active_tokens == 600  # contained and ended entries are not the active working set
    a3 = _call("A", "3", 700, 10, history=a1)
    assert e._cache_hit(a3) == 400


def test_retention_index_ends_a_program_in_retention_order_whatever_the_hash_seed() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    keys = [f"k{i}" for i in range(30)]
    for k in keys:
        idx.add(k, "p", 1)
    idx.add("live", "q", 1)
    idx.end_program("p")
    order = []
    while (v := idx.pop_victim()) is not None:
        order.append(v[0])
    assert order == [*keys, "live"]


# --- CPU tier -------------------------------------------------------------------------------------
def _tier_programs() -> list[ProgramSpec]:
    a = ProgramSpec(
        "A", 0.0, (CallSpec("1", (), 3000, 10), CallSpec("2", ("1",), 10, 10, think_s=5.0, context_parent="1"))
    )
    b = ProgramSpec("B", 0.5, (CallSpec("1", (), 4800, 10), CallSpec("2", (), 4800, 10)))
    return [a, b]


def test_tier_round_trip_charges_swap_time_and_saves_the_prefill() -> None:
    cost = CostModel(kv_capacity_tokens=10_000)
    out = {}
    for memory in ("retain", "tier"):
        sim = Simulation(_tier_programs(), SimConfig(policy="fcfs", cost=cost, memory=memory, audit=True))
        result = sim.run()
        a2 = sim.states[0].calls["2"]
        out[memory] = (a2, result.engine_stats[0])
    a2, stats = out["retain"]
    assert a2.cached_tokens == 0 and stats["tier_in_tokens"] == 0  # B's calls pushed A's context out
    a2, stats = out["tier"]
    assert a2.cached_tokens == 3010  # swapped back in, not re-prefilled
    assert stats["tier_out_tokens"] == stats["tier_in_tokens"] == 3010
    assert stats["tier_s"] == pytest.approx(cost.swap_time(3010))  # swap-in charged; the copy out overlaps
    assert stats["tier_out_s"] == pytest.approx(cost.swap_time(3010))
    assert cost.swap_time(3010) < cost.recompute_time(3010)
    assert stats["prefill_tokens"] == out["retain"][1]["prefill_tokens"] - 3010


def test_tier_keeps_nothing_of_ended_programs() -> None:
    e = _engine("tier", budget=1000, tier=4000)
    e._cache_put(_call("B", "1", 300, 100))
    e.end_program("B")
    e._cache_put(_call("A", "1", 400, 100))
    e._cache_put(_call("C", "1", 400, 100))
    assert e.tier is not None and len(e.tier) == 0 and e.stat_tier_out_tokens == 0
    e._cache_put(_call("D", "1", 400, 100))  # now an active context (A's) must go: to the tier
    assert "A/1" in e.tier and e.stat_tier_out_tokens == 500


# --- door ------------------------------------------------------------------------------------------
def test_door_admits_in_arrival_order_while_the_working_set_fits() -> None:
    door = Door(DoorConfig(high_water=0.9))
    door.report("e0", capacity_tokens=1000, active_tokens=0, retained_tokens=0)
    door.arrive("p1", 0.0)
    assert door.admit(0.0) == ["p1"]  # nothing active: always
    door.started("p1")
    door.report("e0", 1000, 300, 0)
    for i, pid in enumerate(("p2", "p3", "p4")):
        door.arrive(pid, 1.0 + i)
    # p2: 300 + 1 * 300 <= 900; p3: 300 + 2 * 300 <= 900 (p2 not in the reports yet); p4: 1200 > 900
    assert door.admit(3.0) == ["p2", "p3"]
    door.started("p2")
    door.started("p3")
    door.report("e0", 1000, 700, 200)
    assert door.admit(4.0) == []  # 900 + 300 > 900: p4 waits
    door.ended("p1")
    door.report("e0", 1000, 400, 100)
    assert door.admit(5.0) == ["p4"]  # 500 + 250 <= 900
    assert door.waiting == 0 and door.active == 3 and door.held_total == 3


def test_door_counts_the_cpu_tier_in_its_capacity_only_when_told() -> None:
    for count_tier, admitted in ((False, []), (True, ["p2"])):
        door = Door(DoorConfig(high_water=0.9, count_tier=count_tier, spill_gate=None))
        door.report("e0", 1000, 0, 0, tier_tokens=4000)
        door.arrive("p1", 0.0)
        assert door.admit(0.0) == ["p1"]
        door.started("p1")
        door.report("e0", 1000, 300, 600, tier_tokens=4000)
        door.arrive("p2", 1.0)
        # 900 + 900 > 0.9 * 1000 without the tier; <= 0.9 * 5000 with it
        assert door.admit(1.0) == admitted
        assert door.working_set() == (900, 5000 if count_tier else 1000)


def test_door_spill_gate_opens_the_door_while_the_tier_spill_is_cheap() -> None:
    door = Door(DoorConfig(high_water=0.9, spill_gate=0.05))
    door.report("e0", 1000, 0, 0, tier_tokens=4000)
    door.arrive("p1", 0.0)
    assert door.admit(0.0) == ["p1"]
    door.started("p1")
    # the working set (900) is over 0.9 x 1000 with p2, but swapping in costs 1% of busy time: open
    door.report("e0", 1000, 300, 600, tier_tokens=4000, spill_share=0.01)
    door.arrive("p2", 1.0)
    door.arrive("p3", 1.1)
    assert door.spill_open() and door.admit(1.2) == ["p2", "p3"]
    door.started("p2")
    door.started("p3")
    # the spill now costs 8%: the working-set rule applies again, p4 waits
    door.report("e0", 1000, 500, 900, tier_tokens=4000, spill_share=0.08)
    door.arrive("p4", 2.0)
    assert not door.spill_open() and door.admit(2.0) == []
    # an engine without a tier: the gate never opens (an evicted context there is re-prefilled)
    door.report("e1", 1000, 0, 0, tier_tokens=0, spill_share=0.0)
    door.report("e0", 1000, 500, 900, tier_tokens=4000, spill_share=0.0)
    assert not door.spill_open()
    with pytest.raises(ValueError):
        DoorConfig(spill_gate=1.0)


def test_door_never_deadlocks_a_program_larger_than_the_budget_runs_alone() -> None:
    door = Door()
    door.report("e0", 1000, 5000, 3000)  # stale or huge: still, nothing is active
    door.arrive("big", 0.0)
    door.arrive("small", 0.1)
    assert door.admit(0.2) == ["big"]
    door.started("big")
    assert door.admit(0.3) == []
    door.ended("big")
    assert door.admit(0.4) == ["small"]


def test_door_in_the_simulator_holds_later_programs_behind_one_larger_than_the_budget() -> None:
    cost = CostModel(kv_capacity_tokens=10_000)
    big = ProgramSpec("big", 0.0, tuple(CallSpec(f"c{i}", (), 3000, 20) for i in range(5)))  # 5 x 3000 > 10k
    smalls = [ProgramSpec(f"s{i}", 0.01 * (i + 1), (CallSpec("c", (), 100, 5),)) for i in range(3)]
    sim = Simulation([big, *smalls], SimConfig(policy="fcfs", cost=cost, memory="door", audit=True))
    result = sim.run()
    by_id = {p.program_id: p for p in result.programs}
    assert len(by_id) == 4
    starts = [sim.states[i].calls["c"].submit_s for i in (1, 2, 3)]
    assert starts == sorted(starts) and starts[0] >= by_id["big"].finish_s  # waited, in arrival order
    assert all(by_id[f"s{i}"].door_wait_s > 0 for i in range(3))
    assert by_id["big"].door_wait_s == 0


def test_memory_variants_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown memory variant"):
        SimConfig(memory="lfu")


# --- invariants with the tier and the door on --------------------------------------------------------
SMALL = CostModel(kv_capacity_tokens=6000, max_batch=4, max_batched_tokens=512)



@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    programs(max_calls=6, max_output=100, think_s=(0.0, 0.01, 0.5, 3.0)),
    st.sampled_from(POLICY_NAMES),
    st.sampled_from(MEMORY_NAMES),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.5, 4.0]),
)
def test_no_call_lost_or_left_holding_kv(
    progs: list[ProgramSpec], policy: str, memory: str, engines: int, tier_scale: float
) -> None:
    config = SimConfig(policy=policy, engines=engines, cost=SMALL, memory=memory, tier_scale=tier_scale, audit=True)
    sim = Simulation(progs, config)
    result = sim.run()  # audit: KV <= budget, batch <= max after every decision
    assert len(result.programs) == len(progs)
    assert len(result.calls) == sum(len(p.calls) for p in progs)
    for state in sim.states:
        for c in state.calls.values():
            assert c.state == DONE and c.completions == 1 and c.generated == c.output_tokens
            assert c.submit_s >= state.spec.arrival_s
    for e in sim.engines:
        assert e.kv_used == 0 and not e.running and not e.calls and e.queued_tokens == 0
        assert e.cache.active_tokens == 0 and e.retained_tokens() == 0  # every program ended
        assert e.cache.tokens <= e.kv_capacity_tokens
        if e.tier is not None:
            assert e.tier.tokens <= e.config.tier_tokens
    if sim.door is not None:
        assert sim.door.waiting == 0 and sim.door.active == 0


def test_memory_variants_do_not_depend_on_the_hash_seed() -> None:
    outs = finish_times_under_two_hash_seeds("policy='atlas', engines=2, kv_scale=0.05, memory='all', tier_scale=0.5")
    assert len(outs) == 1 and outs != {""}


def test_cli_compares_memory_variants_side_by_side(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from autellix.sim.__main__ import main

    out = tmp_path / "o.json"
    code = main([
        "--workload", "bfcl", "--policies", "fcfs", "--memory", "tier,all", "--rates", "0.5,2", "--programs", "30",
        "--balancer", "locality", "--kv-scale", "0.1", "--json", str(out), "--no-progress",
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["config"]["memory"] == ["lru", "tier", "all"]  # lru always added: the baseline
    assert {p["variant"] for p in data["points"]} == {"fcfs", "fcfs+tier", "fcfs+all"}
    t10 = data["analysis"]["by_balancer"]["locality"]["targets"]["10x"]["policies"]
    assert t10["fcfs"]["ratio_to_fcfs"] == 1.0 and "fcfs+all" in t10
    assert all("door_wait_s_mean" in p and "tier_in_tokens" in p for p in data["points"])
    assert "fcfs+tier" in capsys.readouterr().out
