"""The engine model on hand-built scenarios."""

from __future__ import annotations

from autellix.engine.cost_model import CostModel
from autellix.policy.mlfq import MLFQConfig
from autellix.sim.generators import generate
from autellix.sim.simulator import SimConfig, Simulation, simulate
from autellix.sim.workload import CallSpec, ProgramSpec, scaled_arrivals


def chain(pid: str, arrival: float, n: int, prompt: int, output: int) -> ProgramSpec:
    calls = tuple(
        CallSpec(f"c{i}", (f"c{i - 1}",) if i else (), prompt, output, 0.0, f"c{i - 1}" if i else None)
        for i in range(n)
    )
    return ProgramSpec(pid, arrival, calls, kind="chain")


def head_of_line_workload() -> list[ProgramSpec]:
    """One long program, then a stream of one-call programs arriving while it runs."""
    return [chain("long", 0.0, 12, 50, 200)] + [chain(f"s{i}", 0.5 + 0.4 * i, 1, 50, 20) for i in range(30)]


def short_latency(policy: str) -> float:
    cost = CostModel(max_batch=1)  # admission binds: one call at a time
    cfg = SimConfig(policy=policy, cost=cost, calibrate=False, mlfq=MLFQConfig(num_levels=6, first_boundary_s=0.1))
    res = simulate(head_of_line_workload(), cfg)
    shorts = [p.finish_s - p.arrival_s for p in res.programs if p.program_id.startswith("s")]
    return sum(shorts) / len(shorts)


def test_program_level_priority_removes_head_of_line_blocking() -> None:
    fcfs, plas, atlas, srpt = (short_latency(p) for p in ("fcfs", "plas", "atlas", "srpt"))
    assert plas < 0.5 * fcfs
    assert atlas < 0.5 * fcfs
    assert srpt <= plas * 1.05


def test_request_level_mlfq_cannot_tell_a_long_programs_new_call_from_a_short_program() -> None:
    # every call of the long program re-enters the top queue under request-level MLFQ
    assert short_latency("plas") < short_latency("mlfq")


def test_preempted_calls_pay_swap_time_and_resume() -> None:
    cost = CostModel(max_batch=1)
    cfg = SimConfig(policy="plas", cost=cost, calibrate=False, mlfq=MLFQConfig(num_levels=6, first_boundary_s=0.1))
    res = simulate(head_of_line_workload(), cfg)
    stats = res.engine_stats[0]
    assert stats["preemptions"] > 0
    assert stats["swap_s"] > 0
    assert sum(c.preemptions for c in res.calls) == stats["preemptions"]


def test_prefix_cache_reuses_the_programs_history_on_the_same_engine() -> None:
    p = chain("p", 0.0, 3, 100, 10)
    sim = Simulation([p], SimConfig(policy="fcfs"))
    sim.run()
    calls = sim.states[0].calls
    assert [calls[c].prompt_tokens for c in ("c0", "c1", "c2")] == [100, 210, 320]
    assert [calls[c].cached_tokens for c in ("c0", "c1", "c2")] == [0, 110, 220]
    sim = Simulation([p], SimConfig(policy="fcfs", carry_context=False))
    sim.run()
    assert [c.cached_tokens for c in sim.states[0].calls.values()] == [0, 0, 0]
    assert [c.prompt_tokens for c in sim.states[0].calls.values()] == [100, 100, 100]


def test_prefix_cache_hits_the_nearest_ancestor_cached_on_the_engine() -> None:
    # round-robin over 2 engines: each call lands where its grandparent ran, not its parent
    sim = Simulation([chain("p", 0.0, 5, 100, 10)], SimConfig(policy="fcfs", engines=2, balancer="round-robin"))
    sim.run()
    calls = sim.states[0].calls
    assert [calls[f"c{i}"].engine for i in range(5)] == [0, 1, 0, 1, 0]
    # contexts (prompt + output): c0 110, c1 220, c2 330; each call hits the one two back
    assert [calls[f"c{i}"].cached_tokens for i in range(5)] == [0, 0, 110, 220, 330]


def test_prefix_cache_hits_a_siblings_copy_of_the_shared_history() -> None:
    # root, then child a; child b (same parent) runs after a, with root's own entry evicted
    calls = (
        CallSpec("root", (), 100, 10, 0.0, None),
        CallSpec("a", ("root",), 20, 10, 0.0, "root"),
        CallSpec("b", ("a",), 30, 10, 0.0, "root"),  # waits for a, but its context is root's
    )
    sim = Simulation([ProgramSpec("p", 0.0, calls, kind="tree")], SimConfig(policy="fcfs"))
    engine = sim.engines[0]
    sim.run()
    got = sim.states[0].calls
    assert got["b"].prompt_tokens == 140
    assert got["b"].cached_tokens == 110  # root's context
    # a's entry alone still covers root's context once root's and b's own entries are gone
    engine.cache.remove("p/root")
    engine.cache.remove("p/b")
    assert engine._cache_hit(got["b"]) == 110
    engine.cache.remove("p/a")
    assert engine._cache_hit(got["b"]) == 0


def test_locality_keeps_prefix_hits_that_round_robin_loses() -> None:
    programs = scaled_arrivals(generate("bfcl", 40, seed=3), 0.5)

    def hit_rate(lb: str) -> float:
        res = simulate(programs, SimConfig(policy="fcfs", engines=4, balancer=lb))
        hits = sum(s["cache_hit_tokens"] for s in res.engine_stats)
        return hits / sum(s["prompt_tokens"] for s in res.engine_stats)

    local, rr = hit_rate("locality"), hit_rate("round-robin")
    assert local > 0.85
    # round-robin still hits older turns' contexts left on each engine, but misses the latest
    assert rr < local - 0.1


def test_step_time_follows_the_cost_model() -> None:
    cost = CostModel()
    res = simulate([chain("p", 0.0, 1, 100, 1)], SimConfig(policy="fcfs", cost=cost))
    # one prefill step of 100 tokens that also samples the only output token
    assert res.programs[0].finish_s == cost.step_time(100, 0, 100)
    res = simulate([chain("p", 0.0, 1, 100, 3)], SimConfig(policy="fcfs", cost=cost))
    expected = cost.step_time(100, 0, 100) + cost.step_time(0, 1, 100) + cost.step_time(0, 1, 101)
    assert abs(res.programs[0].finish_s - expected) < 1e-12


def test_kv_capacity_bounds_the_batch() -> None:
    cost = CostModel(kv_capacity_tokens=10_000)
    programs = [chain(f"p{i}", 0.0, 1, 3000, 50) for i in range(6)]
    sim = Simulation(programs, SimConfig(policy="fcfs", cost=cost, audit=True))
    res = sim.run()
    firsts = sorted(c.first_token_s for c in res.calls)
    # only three 3000-token prompts fit in 9,900 admissible tokens: the rest wait for room
    assert firsts[2] < firsts[3]
    waits = sorted(c.queue_wait_s for c in res.calls)
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
