"""The scheduler's routing cache (live engines and balancer candidates kept between heartbeats and
updated in place) chooses exactly what a fresh computation chooses."""

from __future__ import annotations

import random

import pytest

from autellix.proto import CallRequest, EngineHeartbeat
from autellix.services.scheduler.core import SchedulerCore


def _heartbeat(rng: random.Random, engine_id: str, now: float, limits: list[int]) -> EngineHeartbeat:
    state = rng.choice(["up"] * 8 + ["draining", "down"])
    return EngineHeartbeat(
        engine_id=engine_id, backend="sim", model="m", state=state, running=rng.randint(0, 4),
        kv_tokens_used=rng.randint(0, 5000), kv_tokens_queued=rng.randint(0, 3000),
        interval_s=rng.choice([0.05, 0.1, 0.5]), calls_limit=rng.choice(limits), sent_at=now,
    )  # fmt: skip


@pytest.mark.parametrize("balancer", ["locality", "least-used", "round-robin"])
@pytest.mark.parametrize("seed", range(6))
def test_cached_routing_matches_a_fresh_computation(balancer: str, seed: int) -> None:
    rng = random.Random(seed)
    cached, fresh = SchedulerCore(balancer=balancer), SchedulerCore(balancer=balancer)
    engines = [f"e{i}" for i in range(rng.randint(1, 9))]
    now = 1000.0
    for step in range(3000):
        now += rng.choice([0.0, 0.001, 0.01, 0.05, 0.2])
        roll = rng.random()
        if roll < 0.25:
            hb = _heartbeat(rng, rng.choice(engines), now, [0, 3, 6] if seed % 2 else [1, 2])  # odd: often all full
            cached.on_heartbeat(hb, now)
            fresh.on_heartbeat(hb, now)
        elif roll < 0.3:
            assert [d for d, _ in cached.dead_engines(now)] == [d for d, _ in fresh.dead_engines(now)]
        else:
            call = CallRequest(
                program_id=f"p{rng.randint(0, 20)}", call_id=f"c{step}", prompt="x" * rng.randint(1, 12000)
            )
            fresh._live = fresh._candidates = None  # recomputed from scratch for every call
            chosen = cached.route(call, now)
            assert chosen == fresh.route(call, now), step
            assert cached.live_count(now) == len(fresh.live_engines(now))
