"""Simulator invariants, checked on random workloads (hypothesis) with the engines' audit on."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import finish_times_under_two_hash_seeds, programs

from autellix.engine.cost_model import CostModel
from autellix.policy.balancer import BALANCER_NAMES
from autellix.policy.mlfq import MLFQConfig
from autellix.policy.variants import POLICY_NAMES
from autellix.sim.engine_model import DONE
from autellix.sim.simulator import SimConfig, Simulation
from autellix.sim.workload import ProgramSpec

# a small engine so that KV, batch and token budgets all bind
SMALL = CostModel(kv_capacity_tokens=6000, max_batch=4, max_batched_tokens=512)


configs = st.builds(
    SimConfig,
    policy=st.sampled_from(POLICY_NAMES),
    engines=st.integers(1, 3),
    balancer=st.sampled_from(BALANCER_NAMES),
    cost=st.just(SMALL),
    carry_context=st.booleans(),
    schedule_every=st.sampled_from([1, 3, 8]),
    mlfq=st.sampled_from([MLFQConfig(num_levels=4, first_boundary_s=0.02, beta=3.0), MLFQConfig()]),
    audit=st.just(True),
    locality_threshold=st.sampled_from([0, 2048]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), configs)
def test_every_call_runs_once_to_completion_within_the_kv_capacity(progs: list[ProgramSpec], config: SimConfig) -> None:
    sim = Simulation(progs, config)
    result = sim.run()  # audit: KV <= budget and batch <= max after every scheduling decision
    assert len(result.programs) == len(progs)
    assert len(result.calls) == sum(len(p.calls) for p in progs)
    for state in sim.states:
        by_id = state.calls
        for c in by_id.values():
            assert c.state == DONE and c.completions == 1
            assert c.generated == c.output_tokens
            assert c.prefilled == c.prompt_tokens
            assert c.admissions == c.preemptions + 1  # resumed, never restarted
            assert c.submit_s <= c.first_token_s <= c.finish_s
            for parent in c.spec.parents:
                assert c.submit_s >= by_id[parent].finish_s + c.spec.think_s - 1e-9
            if not c.spec.parents:
                assert abs(c.submit_s - state.spec.arrival_s - c.spec.think_s) < 1e-9
        assert state.done == len(state.spec.calls)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), configs)
def test_same_input_same_result(progs: list[ProgramSpec], config: SimConfig) -> None:
    config = replace(config, audit=False)
    a = Simulation(progs, config).run()
    b = Simulation(list(progs), config).run()
    assert a.programs == b.programs
    assert a.calls == b.calls
    assert a.engine_stats == b.engine_stats


def test_result_does_not_depend_on_the_hash_seed() -> None:
    """Nothing iterates a set of strings: two interpreters with different hash seeds agree."""
    outs = finish_times_under_two_hash_seeds("policy='atlas', engines=2, kv_scale=0.05")
    assert len(outs) == 1 and outs != {""}
