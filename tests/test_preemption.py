"""The engine core's preemptive scheduling with the `sim` backend: displacement, the beta rule,
and no call lost, duplicated or left holding KV under random arrivals, aborts and preemptions."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autellix.engine.core import (
    CallPhase,
    CoreCall,
    CoreConfig,
    EngineCore,
    FinishEvent,
    StepPlan,
    TokenEvent,
)
from autellix.engine.sim_backend import SimBackend, VirtualClock
from autellix.policy.mlfq import MLFQConfig


class FakeClock(VirtualClock):
    """Virtual time: each step advances by the sim backend's modelled step and swap times."""

    @property
    def now(self) -> float:
        return self.now_s


def step(core: EngineCore, backend: SimBackend, clock: FakeClock) -> tuple[StepPlan | None, list[object]]:
    outcome = core.step(clock)
    return (None, []) if outcome is None else (outcome.plan, list(outcome.events))


def test_burst_of_high_priority_calls_displaces_a_long_low_one() -> None:
    backend = SimBackend(clock=(clock := FakeClock()))
    core = EngineCore(
        backend, CoreConfig(max_batch=2, kv_capacity_tokens=10_000, schedule_every=2, preempt_mode="swap")
    )
    core.add(CoreCall("long", "big", [1] * 100, 200, priority=50.0, program_service_s=50.0), clock.now)
    finished: list[str] = []
    tokens: dict[str, int] = {}
    preemptions = []
    for i in range(40):
        plan, events = step(core, backend, clock)
        if i == 5:  # a burst from fresh programs while the long call runs
            for j in range(4):
                core.add(CoreCall(f"short{j}", f"p{j}", [1] * 10, 5), clock.now)
        if plan:
            preemptions += plan.preemptions
        for e in events:
            if isinstance(e, TokenEvent):
                tokens[e.call_id] = tokens.get(e.call_id, 0) + 1
            elif isinstance(e, FinishEvent):
                finished.append(e.call_id)
    while not core.idle:
        _, events = step(core, backend, clock)
        for e in events:
            if isinstance(e, TokenEvent):
                tokens[e.call_id] = tokens.get(e.call_id, 0) + 1
            elif isinstance(e, FinishEvent):
                finished.append(e.call_id)
                assert e.state.spec.call_id != "long" or e.state.preemptions >= 1
    assert finished[-1] == "long" and sorted(finished[:4]) == ["short0", "short1", "short2", "short3"]
    assert tokens == {"long": 200, "short0": 5, "short1": 5, "short2": 5, "short3": 5}
    assert any(p.call_id == "long" and p.mode == "swap" and "displaced by short" in p.reason for p in preemptions)


def test_fcfs_never_displaces_a_running_call() -> None:
    backend = SimBackend(clock=(clock := FakeClock()))
    core = EngineCore(backend, CoreConfig(max_batch=1, policy="fcfs", schedule_every=1))
    core.add(CoreCall("first", "a", [1] * 10, 30, priority=99.0), clock.now)
    step(core, backend, clock)
    core.add(CoreCall("urgent", "b", [1] * 10, 3), clock.now)
    finished = []
    while not core.idle:
        plan, events = step(core, backend, clock)
        assert plan is None or not plan.preemptions
        finished += [e.call_id for e in events if isinstance(e, FinishEvent)]
    assert finished == ["first", "urgent"]


def test_starved_call_is_promoted_by_the_beta_rule() -> None:
    backend = SimBackend(clock=(clock := FakeClock()))
    mlfq = MLFQConfig(num_levels=4, first_boundary_s=1.0, beta=2.0)  # fresh calls (~0.4 s) stay on top
    core = EngineCore(backend, CoreConfig(max_batch=1, schedule_every=1, mlfq=mlfq, calibrate_every=10**9))
    # an old program's call sits in the bottom queue; fresh programs keep arriving in the top one
    core.add(CoreCall("old", "heavy", [1] * 8, 4, priority=10.0, program_service_s=1.0), clock.now)
    assert core.queue.level_of("old") == 3
    n = 0
    promoted_at = None
    for i in range(2000):
        if len([c for c in core.call_ids() if c != "old"]) < 2:
            core.add(CoreCall(f"fresh{n}", f"f{n}", [1] * 8, 50), clock.now)
            n += 1
        state = core.get("old")
        if state is None:
            break
        if promoted_at is None and core.queue.level_of("old") == 0:
            promoted_at = clock.now
            # promotion happens once (wait) / (service) reaches beta, with the program's service
            since = clock.now if state.waiting_since is None else state.waiting_since
            waited = state.queue_wait_s + clock.now - since
            assert 2.0 <= waited <= 2.2, waited  # beta x program service, to within a step
        step(core, backend, clock)
        assert i < 1999, "the old call starved"
    assert promoted_at is not None


def test_recompute_mode_resumes_where_it_stopped() -> None:
    backend = SimBackend(clock=(clock := FakeClock()))
    core = EngineCore(backend, CoreConfig(max_batch=1, schedule_every=1, preempt_mode="recompute"))
    core.add(CoreCall("low", "a", [1] * 20, 10, priority=5.0, program_service_s=5.0), clock.now)
    for _ in range(4):
        step(core, backend, clock)
    core.add(CoreCall("high", "b", [1] * 5, 2), clock.now)
    plan, _ = step(core, backend, clock)
    assert plan is not None and [p.mode for p in plan.preemptions] == ["recompute"]
    low = core.get("low")
    assert low is not None and low.phase is CallPhase.WAITING and low.kv_len == 0 and len(low.output_ids) == 4
    events = []
    while not core.idle:
        events += step(core, backend, clock)[1]
    done = {e.call_id: e for e in events if isinstance(e, FinishEvent)}
    assert len(done["low"].state.output_ids) == 10
    assert done["low"].state.recomputed_tokens == 23  # 20 prompt + 3 generated tokens were in its KV
    # sim tokens encode their position: exact resume means positions 20..29 with no gap or repeat
    assert done["low"].state.output_ids == [50_000 + p for p in range(20, 30)]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 40), st.floats(0, 20)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 6)),
        st.tuples(st.just("end"), st.integers(0, 2)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    policy=st.sampled_from(["fcfs", "mlfq", "plas", "atlas"]),
    mode=st.sampled_from(["auto", "swap", "recompute"]),
    max_batch=st.integers(1, 6),
    kv=st.integers(120, 400),
    retention=st.sampled_from(["lru", "program"]),
    tier=st.sampled_from([0, 150]),
)
def test_no_call_lost_duplicated_or_left_holding_kv(ops, policy, mode, max_batch, kv, retention, tier) -> None:  # type: ignore[no-untyped-def]
    # retained contexts share the KV budget; evicted ones go to a small CPU tier when there is one
    backend = SimBackend(clock=(clock := FakeClock()), kv_capacity_tokens=kv, retention=retention, tier_tokens=tier)
    # a small swap pool so the pool-full fallback to recompute is exercised too
    backend.swap_pool_capacity_bytes = 200 * backend.kv_bytes_per_token()  # type: ignore[attr-defined]
    core = EngineCore(
        backend,
        CoreConfig(
            max_batch=max_batch,
            kv_capacity_tokens=kv,
            max_batched_tokens=32,
            policy=policy,
            schedule_every=2,
            preempt_mode=mode,
            mlfq=MLFQConfig(first_boundary_s=0.005, beta=4.0),
        ),
    )
    added: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}

    def consume(events: list[object]) -> None:
        for e in events:
            if isinstance(e, TokenEvent):
                assert e.call_id not in finished, "a token after the call finished"
                tokens.setdefault(e.call_id, []).extend(e.token_ids)
            elif isinstance(e, FinishEvent):
                assert e.call_id not in finished, "a call finished twice"
                finished[e.call_id] = e.finish_reason

    def check_kv() -> None:
        running = [core.get(c) for c in core.running_ids()]
        held = sum(s.kv_len for s in running if s)
        assert held <= kv
        assert backend.kv_tokens_used() == held
        assert backend.device.tokens <= kv - held, "retained KV beyond what running calls leave free"
        assert backend.tier is None or backend.tier.tokens <= tier

    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens, priority = op
            cid = f"c{len(added)}"
            added[cid] = max_tokens
            if core.validate(prompt, max_tokens) is None:
                core.add(
                    CoreCall(cid, f"p{len(added) % 3}", list(range(1, prompt + 1)), max_tokens, priority), clock.now
                )
            else:
                finished[cid] = "rejected"
        elif op[0] == "abort":
            cid = f"c{op[1]}"
            event = core.abort(cid)
            if event is not None:
                consume([event])
        elif op[0] == "end":
            backend.end_prefix(f"p{op[1]}")
        else:
            for _ in range(op[1]):
                consume(step(core, backend, clock)[1])
                check_kv()
    guard = 0
    while not core.idle:
        consume(step(core, backend, clock)[1])
        check_kv()
        guard += 1
        assert guard < 20_000, "the engine stopped making progress"
    assert set(finished) == set(added)
    for cid, reason in finished.items():
        if reason in ("length", "stop"):
            assert len(tokens.get(cid, [])) == added[cid]
    assert backend.kv_tokens_used() == 0 and not backend._swapped and core.load().swapped == 0
    assert not backend._fed and not backend._key, "a finished call's state is left in the backend"
    stats = backend.cache_stats()
    assert stats.hit_tokens <= stats.prompt_tokens and stats.tier_hit_tokens <= stats.hit_tokens
    assert stats.retained_tokens <= kv and stats.tiered_tokens <= tier
