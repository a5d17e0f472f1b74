"""The ``sim`` backend's program-aware KV memory through the engine core: retention order, the CPU
tier's round trip, and what it reports."""

from __future__ import annotations

import zlib

import pytest

from autellix.engine.backend import PrefixCache
from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.engine.cost_model import CostModel
from autellix.engine.sim_backend import SimBackend, VirtualClock


def run_call(core: EngineCore, spec: CoreCall) -> tuple[FinishEvent, list[float]]:
    """Run one call to its end alone; returns its finish event and each step's elapsed time."""
    core.add(spec, 0.0)
    elapsed: list[float] = []
    done = None
    while not core.idle:
        outcome = core.step(0.0)
        assert outcome is not None
        elapsed.append(outcome.result.output.elapsed_s)
        done = next((e for e in outcome.events if isinstance(e, FinishEvent)), done)
    assert done is not None
    return done, elapsed


def words(n: int, tag: str) -> list[int]:
    return [zlib.crc32(f"{tag}{i}".encode()) % 40_000 + 2 for i in range(n)]


def test_sim_backend_is_a_prefix_cache_and_validates() -> None:
    assert isinstance(SimBackend(time_scale=0), PrefixCache)
    with pytest.raises(ValueError):
        SimBackend(time_scale=0, retention="lfu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SimBackend(time_scale=0, tier_tokens=-1)


def test_retention_order_contained_then_ended_then_lru() -> None:
    backend = SimBackend(time_scale=0, retention="program")
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=10_000))
    a1, _ = run_call(core, CoreCall("a1", "A", words(20, "a"), 3))
    run_call(core, CoreCall("b1", "B", words(20, "b"), 3))
    run_call(core, CoreCall("c1", "C", words(20, "c"), 3))
    # A's second turn re-sends its history: a2's entry extends a1's, which becomes contained
    a2, _ = run_call(core, CoreCall("a2", "A", a1.state.all_ids + words(5, "a2"), 3))
    assert a2.state.kv_len > 0 and backend.cache_stats().hit_tokens == 23
    core.end_program("B")
    assert list(backend.device) == ["a1", "b1", "c1", "a2"]  # contained, ended, then LRU
    assert backend.cache_stats().retained_tokens == 23 + 23 + 23 + 31
    assert core.load().idle_context_tokens == 23 + 31  # C's and A's latest contexts; B ended
    # a call that needs the room evicts in that order
    backend.kv_capacity_tokens = 23 + 23 + 31 + 10
    core.kv_capacity_tokens = backend.kv_capacity_tokens
    run_call(core, CoreCall("d1", "D", words(19, "d"), 1))
    assert list(backend.device) == ["c1", "a2", "d1"]
    assert backend.cache_stats().evictions == 2
    # with lru the same history is evicted oldest first, whatever it holds
    lru = SimBackend(time_scale=0, retention="lru")
    core = EngineCore(lru, CoreConfig(kv_capacity_tokens=10_000))
    a1, _ = run_call(core, CoreCall("a1", "A", words(20, "a"), 3))
    run_call(core, CoreCall("b1", "B", words(20, "b"), 3))
    run_call(core, CoreCall("a2", "A", a1.state.all_ids + words(5, "a2"), 3))
    lru.end_prefix("B")
    assert list(lru.device) == ["b1", "a1", "a2"]  # a1 was touched by a2's hit


def test_ended_program_calling_again_is_live_again() -> None:
    backend = SimBackend(time_scale=0, retention="program")
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=10_000))
    run_call(core, CoreCall("a1", "A", words(20, "a"), 3))
    run_call(core, CoreCall("b1", "B", words(20, "b"), 3))
    core.end_program("A")
    assert list(backend.device) == ["a1", "b1"] and core.load().idle_context_tokens == 23
    core.add(CoreCall("a2", "A", words(7, "x"), 2), 0.0)
    core.step(0.0)  # admitted: A is live again before its call finishes
    assert list(backend.device) == ["b1", "a1"] and core.load().idle_context_tokens == 23


def tier_setup(cost: CostModel) -> tuple[SimBackend, EngineCore, VirtualClock, FinishEvent]:
    clock = VirtualClock()
    backend = SimBackend(cost, clock=clock, retention="program", tier_tokens=10_000, kv_capacity_tokens=400)
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=400, max_batched_tokens=512))
    p1, _ = run_call(core, CoreCall("p1", "P", words(100, "p"), 10))
    assert list(backend.device) == ["p1"]
    # another program's long call needs the room: P's context goes to the CPU tier, not away
    run_call(core, CoreCall("q1", "Q", words(320, "q"), 5))
    assert "p1" not in backend.device and backend.tier is not None and "p1" in backend.tier
    stats = backend.cache_stats()
    assert stats.tiered_tokens == 110 and stats.evictions == 0
    assert core.load().idle_context_tokens == 110 + 325  # P's and Q's latest contexts
    assert backend.stat_tier_s == 0 and backend.stat_tier_out_s == pytest.approx(cost.swap_time(110))
    return backend, core, clock, p1


def test_tier_round_trip_charges_the_swap_and_resumes_exactly() -> None:
    cost = CostModel()
    backend, core, _, p1 = tier_setup(cost)
    prompt = p1.state.all_ids + words(5, "p2")
    p2, elapsed = run_call(core, CoreCall("p2", "P", prompt, 4))
    assert p2.state.recomputed_tokens == 0
    stats = backend.cache_stats()
    assert stats.tier_hit_tokens == 110 and stats.hit_tokens == 110
    # the first step prefills the 5 new tokens and waits for the swap-in of P's context (110
    # tokens); Q's context, moved out to make room for it, is copied out beside the steps
    assert backend.stat_tier_s == pytest.approx(cost.swap_time(110))
    assert backend.stat_tier_out_s == pytest.approx(cost.swap_time(110) + cost.swap_time(325))
    assert elapsed[0] == pytest.approx(cost.step_time(5, 0, 115) + cost.swap_time(110))
    # the same tokens (their ids encode their positions) as recomputing everything
    plain = SimBackend(cost, time_scale=0, prefix_cache=False)
    again, _ = run_call(EngineCore(plain, CoreConfig(kv_capacity_tokens=400)), CoreCall("p2", "P", prompt, 4))
    assert p2.state.output_ids == again.state.output_ids
    assert p2.text == again.text


def test_tier_entry_is_reprefilled_when_the_swap_costs_more() -> None:
    slow_pcie = CostModel(swap_s_per_token=1e-3)  # swapping 110 tokens > prefilling them
    backend, core, _, p1 = tier_setup(slow_pcie)
    _, elapsed = run_call(core, CoreCall("p2", "P", p1.state.all_ids + words(5, "p2"), 4))
    stats = backend.cache_stats()
    assert stats.tier_hit_tokens == 0 and stats.hit_tokens == 0
    assert elapsed[0] == pytest.approx(slow_pcie.step_time(115, 0, 115))


def test_no_tier_loses_the_context_and_lru_keeps_the_old_behaviour() -> None:
    backend = SimBackend(time_scale=0, retention="lru", kv_capacity_tokens=400)
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=400, max_batched_tokens=512))
    p1, _ = run_call(core, CoreCall("p1", "P", words(100, "p"), 10))
    run_call(core, CoreCall("q1", "Q", words(320, "q"), 5))
    assert backend.tier is None and "p1" not in backend.device and backend.cache_stats().evictions == 1
    run_call(core, CoreCall("p2", "P", p1.state.all_ids + words(5, "p2"), 4))
    assert backend.cache_stats().hit_tokens == 0


def test_engine_flags_and_env_choose_retention_and_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    from autellix.engine.factory import BackendSpec, make_backend
    from autellix.services.engine.config import EngineConfig

    default = make_backend(BackendSpec(name="sim", kv_capacity_tokens=1000))
    assert isinstance(default, SimBackend) and default.kv_capacity_tokens == 1000
    assert default.device.retention == "program" and default.tier is not None and default.tier_tokens == 4000
    monkeypatch.setenv("AUTELLIX_BACKEND", "sim")
    monkeypatch.setenv("AUTELLIX_RETENTION", "lru")
    monkeypatch.setenv("AUTELLIX_KV_TIER_TOKENS", "0")
    plain = make_backend(EngineConfig.from_env().backend)
    assert isinstance(plain, SimBackend) and plain.device.retention == "lru" and plain.tier is None
    with pytest.raises(ValueError):
        BackendSpec(name="sim", retention="lfu")
