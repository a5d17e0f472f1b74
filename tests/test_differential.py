"""Differential test: the simulator's engine model (:mod:`autellix.sim.engine_model`, closed-form
decode runs) and the engine the mesh runs (:class:`autellix.engine.core.EngineCore` with the ``sim``
backend, one step at a time, :mod:`autellix.bench.core_replay`) on the same programs.

Both share the cost model, the policies and the prefix-matching semantics; they differ in
mechanics the figures should not care much about: the simulator admits against a 1% watermark and
counts a call's whole prompt from admission, the core counts the KV it has written; the simulator
cuts a decode run for an arrival at the next step boundary, the replay lets arrivals in at step
ends; the core's calibration of MLFQ boundaries runs on its own schedule.

Bounds, from what these cases gave (2-core host, 2026-12-02; relative differences):

- at low load (rate 0.5/s, full KV budget: contexts stay cached, nothing is preempted) the two agree
  to a fraction of a percent: sharegpt and bfcl mean and p99 latency and throughput < 0.01%, TTFT
  0.4% and 0.01%, hit rate 0.9146 = 0.9146 and 0.8901 = 0.8901. Bounded at 2% (1% on throughput).
- past the retention cliff (bfcl at 2/s with 1/20 of the KV budget: contexts are evicted, calls
  re-prefill, the engine falls behind) the mechanics above shift individual evictions and the
  queues amplify them: mean latency 1.6%, p99 2.0%, throughput 1.5%, TTFT 3.2%, hit rate 0.066 vs
  0.051. Bounded at 5% (mean, throughput), 8% (p99, TTFT) and 0.02 absolute on the hit rate.
- not in the test (too slow for it: 36 s with lats programs): mixed, 15 programs, rate 0.5, full
  budget: mean latency 0.1%, p99 0.3%, hit rate 0.865 vs 0.862; at rate 1 and 1/10 of the budget:
  mean 2.1%, p99 1.2%, hit rate 0.638 vs 0.625, preemptions 5 vs 0 (the core preempts under KV
  pressure where the simulator's watermark left room).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from autellix.bench.core_replay import CoreReplayConfig, replay
from autellix.engine.cost_model import llama31_8b_h100
from autellix.sim.generators import generate
from autellix.sim.metrics import summarise
from autellix.sim.simulator import SimConfig, simulate
from autellix.sim.workload import scaled_arrivals


def both(workload: str, n: int, rate: float, kv_scale: float, policy: str = "fcfs") -> tuple[dict, dict]:  # type: ignore[type-arg]
    programs = scaled_arrivals(generate(workload, n, seed=0), 1.0 / rate)
    base = llama31_8b_h100()
    cost = replace(base, kv_capacity_tokens=int(base.kv_capacity_tokens * kv_scale))
    core = summarise(replay(programs, CoreReplayConfig(policy=policy, cost=cost)))
    sim = summarise(simulate(programs, SimConfig(policy=policy, cost=cost)))
    return core, sim


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


@pytest.mark.parametrize("workload", ["sharegpt", "bfcl"])
def test_engine_core_agrees_with_the_simulator_at_low_load(workload: str) -> None:
    core, sim = both(workload, 24, rate=0.5, kv_scale=1.0)
    assert core["programs"] == sim["programs"]
    for key in ("latency_s_mean", "latency_s_p99", "token_latency_s_mean"):
        assert rel(core[key], sim[key]) <= 0.02, (key, core[key], sim[key])
    assert rel(core["throughput_tokens_s"], sim["throughput_tokens_s"]) <= 0.01
    assert abs(core["prefix_hit_rate"] - sim["prefix_hit_rate"]) <= 0.01
    assert core["prefix_hit_rate"] > 0.5  # the contexts are reused: the comparison covers the cache
    assert core["preemptions"] == sim["preemptions"] == 0


def test_engine_core_agrees_with_the_simulator_past_the_retention_cliff() -> None:
    core, sim = both("bfcl", 30, rate=2.0, kv_scale=0.05)
    assert not sim["stable"] and not core["stable"]  # both fall behind the same way
    for key, bound in (("latency_s_mean", 0.05), ("latency_s_p99", 0.08), ("throughput_tokens_s", 0.05)):
        assert rel(core[key], sim[key]) <= bound, (key, core[key], sim[key])
    assert abs(core["prefix_hit_rate"] - sim["prefix_hit_rate"]) <= 0.02
    assert core["prefix_hit_rate"] < 0.3  # the cliff: most history is re-prefilled
    assert abs(core["preemptions"] - sim["preemptions"]) <= max(2, 0.1 * sim["preemptions"])
    assert math.isfinite(core["ttft_s_mean"]) and rel(core["ttft_s_mean"], sim["ttft_s_mean"]) <= 0.08
