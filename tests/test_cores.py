"""Unit tests of the pure cores behind the services: process table, scheduler, engine core."""

from __future__ import annotations

import pytest
from eventkit import completed
from hypothesis import given
from hypothesis import strategies as st

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent, TokenEvent
from autellix.engine.sim_backend import SimBackend
from autellix.proto import CallDispatched, EngineHeartbeat, ProgramService, Subjects
from autellix.services.scheduler.core import RejectedCall, SchedulerCore
from autellix.services.tracker.process_table import ProcessTable


# -- proto -------------------------------------------------------------------------------------
def test_subjects_are_built_under_one_root() -> None:
    s = Subjects("acme.prod")
    assert s.call_submit == "acme.prod.call.submit"
    assert s.engine_calls("e-1") == "acme.prod.engine.e-1.calls"
    with pytest.raises(ValueError):
        s.engine_calls("bad.id")
    with pytest.raises(ValueError):
        Subjects("has space")


# -- tracker -----------------------------------------------------------------------------------
def test_process_table_plas_and_atlas_arithmetic() -> None:
    t = ProcessTable(idle_ttl_s=10)
    t.on_dispatched(CallDispatched(call_id="a", program_id="p", engine_id="e1", priority=0), now=0)
    assert t.get("p").active_calls.keys() == {"a"}  # type: ignore[union-attr]
    up = t.on_completed(completed("p", "a", 2.0, parents=[], queue_wait_s=0.5), now=1)
    assert (up.service_s, up.critical_path_s, up.call_path_s) == (2.0, 2.0, 2.0)
    # two children of a in parallel, then a join
    t.on_completed(completed("p", "b", 3.0, parents=["a"]), now=2)
    t.on_completed(completed("p", "c", 1.0, parents=["a"]), now=3)
    up = t.on_completed(completed("p", "d", 1.0, parents=["b", "c"]), now=4)
    assert up.service_s == pytest.approx(7.0)  # PLAS: everything
    assert up.call_path_s == pytest.approx(6.0)  # ATLAS: a(2) + b(3) + d(1)
    assert up.critical_path_s == pytest.approx(6.0)
    entry = t.get("p")
    assert entry is not None and entry.program_wait_s == 0.5 and not entry.active_calls


def test_process_table_forgets_idle_programs_and_ends_on_request() -> None:
    t = ProcessTable(idle_ttl_s=10)
    t.on_completed(completed("idle", "a", 1.0), now=0)
    t.on_dispatched(CallDispatched(call_id="x", program_id="busy", engine_id="e", priority=0), now=0)
    assert t.expire(now=5) == []
    gone = t.expire(now=11)
    assert [g.program_id for g in gone] == ["idle"] and gone[0].ended
    assert t.get("busy") is not None  # an active call keeps it alive
    summary, update = t.end("busy", now=12)  # type: ignore[misc]
    assert summary.program_id == "busy" and update.ended
    assert t.end("busy", now=13) is None


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=30))
def test_attained_service_is_monotone(services: list[float]) -> None:
    t = ProcessTable()
    last = 0.0
    for i, s in enumerate(services):
        up = t.on_completed(completed("p", f"c{i}", s), now=i)
        assert up.service_s >= last
        last = up.service_s


# -- scheduler ---------------------------------------------------------------------------------
def heartbeat(engine: str, used: int = 0, state: str = "up") -> EngineHeartbeat:
    return EngineHeartbeat(engine_id=engine, backend="sim", model="m", kv_tokens_used=used, state=state, interval_s=1)  # type: ignore[arg-type]


def test_scheduler_stamps_follow_tracker_figures() -> None:
    core = SchedulerCore(policy="plas")
    req = core.parse(b'{"program_id": "old", "prompt": "hi"}', "inbox")
    assert core.stamp(req, "inbox", now=0).priority == 0.0
    core.on_program_service(ProgramService(program_id="old", service_s=4.5, critical_path_s=2.0))
    old = core.stamp(req, "inbox", now=1)
    fresh = core.stamp(core.parse(b'{"program_id": "new", "prompt": "hi"}', "inbox"), "inbox", now=1)
    assert old.priority == 4.5 > fresh.priority == 0.0
    core.on_program_service(ProgramService(program_id="old", service_s=4.5, ended=True))
    assert core.stamp(req, "inbox", now=2).priority == 0.0


def test_scheduler_atlas_stamps_use_parent_paths() -> None:
    core = SchedulerCore(policy="atlas")
    core.on_program_service(ProgramService(program_id="p", service_s=5, critical_path_s=4, call_id="a", call_path_s=3))
    child = core.parse(b'{"program_id": "p", "prompt": "x", "parents": ["a"]}', "r")
    unknown = core.parse(b'{"program_id": "p", "prompt": "x"}', "r")
    root = core.parse(b'{"program_id": "p", "prompt": "x", "parents": []}', "r")
    assert core.stamp(child, "r", 0).priority == 3
    assert core.stamp(unknown, "r", 0).priority == 4  # the one-scalar approximation
    assert core.stamp(root, "r", 0).priority == 0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[", "bad_json"),
        (b"[1, 2]", "bad_field"),
        (b'{"program_id": "p", "prompt": "x", "temperature": -1}', "bad_field"),
        (b'{"prompt": "x"}', "missing_program_id"),
        (b'{"program_id": "p", "prompt": "x", "max_tokens": 201}', "bad_max_tokens"),
        (b'{"program_id": "p", "prompt": ""}', "empty_messages"),
    ],
)
def test_scheduler_rejects_bad_input(payload: bytes, code: str) -> None:
    core = SchedulerCore(max_tokens_ceiling=200)
    with pytest.raises(RejectedCall) as info:
        core.parse(payload, "inbox")
    assert info.value.error.code == code
    assert info.value.reply_to == "inbox"


def test_rejection_keeps_the_callers_ids_when_readable() -> None:
    core = SchedulerCore()
    with pytest.raises(RejectedCall) as info:
        core.parse(b'{"program_id": "p", "call_id": "mine", "reply_to": "there", "max_tokens": "x"}', "inbox")
    assert (info.value.error.call_id, info.value.reply_to) == ("mine", "there")


def test_scheduler_routes_to_least_loaded_live_engine() -> None:
    core = SchedulerCore()
    req = core.parse(b'{"program_id": "p", "prompt": "hello", "max_tokens": 100}', "r")
    assert core.route(req, now=0) is None
    core.on_heartbeat(heartbeat("busy", used=5000), now=0)
    core.on_heartbeat(heartbeat("idle", used=0), now=0)
    core.on_heartbeat(heartbeat("leaving", used=0, state="draining"), now=0)
    assert core.route(req, now=0.5) == "idle"
    # routed load (about 101 tokens a call) counts until the next heartbeat
    chosen = [core.route(req, now=0.5) for _ in range(60)]
    assert chosen[:45] == ["idle"] * 45 and "busy" in chosen
    # stale heartbeats: engine presumed dead
    assert core.route(req, now=10) is None


# -- engine core -------------------------------------------------------------------------------
def run_to_end(core: EngineCore, backend: SimBackend, now: float = 0.0) -> list[tuple[float, object]]:
    events: list[tuple[float, object]] = []
    while not core.idle:
        outcome = core.step(now)
        assert outcome is not None
        events += [(now, e) for e in outcome.events]
        now += 1
    return events


def test_engine_core_admits_in_priority_order_within_limits() -> None:
    backend = SimBackend(time_scale=0)
    core = EngineCore(backend, CoreConfig(max_batch=2, max_batched_tokens=64, kv_capacity_tokens=1000))
    core.add(CoreCall("low", "p1", [1] * 5, 4, priority=9.0, program_service_s=9.0), 0)
    core.add(CoreCall("high", "p2", [1] * 5, 4, priority=0.0), 0)
    core.add(CoreCall("mid", "p3", [1] * 5, 4, priority=1.0, program_service_s=1.0), 0)
    events = run_to_end(core, backend)
    finish_order = [e.call_id for _, e in events if isinstance(e, FinishEvent)]
    assert finish_order[:2] == ["high", "mid"] and finish_order[2] == "low"
    tokens = {cid: sum(1 for _, e in events if isinstance(e, TokenEvent) and e.call_id == cid) for cid in finish_order}
    assert tokens == {"high": 4, "mid": 4, "low": 4}


def test_engine_core_respects_kv_capacity_and_chunks_prefill() -> None:
    backend = SimBackend(time_scale=0)
    core = EngineCore(backend, CoreConfig(max_batch=8, max_batched_tokens=16, kv_capacity_tokens=100))
    core.add(CoreCall("a", "p", [1] * 40, 20), 0)
    core.add(CoreCall("b", "p", [1] * 40, 20, priority=1.0, program_service_s=1.0), 0)
    now, preempted, outputs = 0.0, [], {"a": 0, "b": 0}
    while not core.idle:
        outcome = core.step(now)
        assert outcome is not None
        plan = outcome.plan
        if now == 0:
            assert [w.seq_id for w in plan.batch.work] == ["a"] and plan.batch.num_tokens == 16
        preempted += [p.call_id for p in plan.preemptions]
        resident = sum(w.start_pos + len(w.token_ids) for w in plan.batch.work)
        assert resident <= 100, "running KV beyond the budget"
        for e in outcome.events:
            if isinstance(e, TokenEvent):
                outputs[e.call_id] += 1
        now += 1
    assert preempted == ["b"]  # the two outgrow 100 KV tokens together: the lower one yields
    assert outputs == {"a": 20, "b": 20}
    assert core.load().kv_tokens_used == 0 and backend.kv_tokens_used() == 0


def test_engine_core_abort_frees_everything() -> None:
    backend = SimBackend(time_scale=0)
    core = EngineCore(backend, CoreConfig(max_batch=1))
    core.add(CoreCall("run", "p", [1, 2], 50), 0)
    core.add(CoreCall("wait", "p", [1, 2], 50), 0)
    assert core.step(0.0) is not None
    assert isinstance(core.abort("run"), FinishEvent) and isinstance(core.abort("wait"), FinishEvent)
    assert core.abort("run") is None
    assert core.idle and core.schedule(1) is None and backend.kv_tokens_used() == 0


def test_engine_core_validates_context() -> None:
    core = EngineCore(SimBackend(time_scale=0), CoreConfig(kv_capacity_tokens=1000))
    assert core.validate(10, 10) is None
    assert "KV capacity" in (core.validate(900, 200) or "")
    assert "context" in (core.validate(200_000, 1) or "")


def test_long_calls_stay_with_their_program_and_short_ones_spread() -> None:
    core = SchedulerCore(balancer="locality")
    for e in ("e1", "e2", "e3"):
        core.on_heartbeat(heartbeat(e), now=0)
    long_body = '{"program_id": "agent", "prompt": "' + "word " * 3000 + '", "max_tokens": 500}'
    long_req = core.parse(long_body.encode(), "r")
    short_req = core.parse(b'{"program_id": "agent", "prompt": "short", "max_tokens": 500}', "r")
    first = core.route(long_req, now=0.1)  # least used on first sight
    homes = {core.route(long_req, now=0.1) for _ in range(5)}
    assert homes == {first}  # its context lives there, even as that engine fills up
    spread = {core.route(short_req, now=0.1) for _ in range(6)}
    assert spread == {"e1", "e2", "e3"} - {first}  # short calls go to the least-used engines


class _FixedPrefix(SimBackend):
    """A backend whose prefix cache always holds the first ``hit`` tokens of every prompt."""

    def __init__(self, hit: int) -> None:
        super().__init__(time_scale=0, prefix_cache=False)
        self.hit = hit
        self.asked: list[tuple[str, int, str | None]] = []

    def attach_prefix(self, seq_id: str, token_ids, prefix_key: str | None) -> int:
        self.asked.append((seq_id, len(token_ids), prefix_key))
        return min(self.hit, len(token_ids) - 1)

    def end_prefix(self, prefix_key: str) -> None:
        pass

    def cache_stats(self):
        from autellix.engine.backend import CacheStats

        return CacheStats()


def test_engine_core_prefills_only_past_the_attached_prefix() -> None:
    backend = _FixedPrefix(hit=90)
    core = EngineCore(backend, CoreConfig(kv_capacity_tokens=10_000))
    assert core.prefix_cache is backend
    core.add(CoreCall("c1", "p1", list(range(100)), max_tokens=3), now=0.0)
    plan = core.schedule(0.0)
    assert plan is not None
    (work,) = plan.batch.work
    assert (work.start_pos, len(work.token_ids), work.sample) == (90, 10, True)
    assert backend.asked == [("c1", 100, "p1")]
    events = run_to_end(core, backend)
    assert [e.finish_reason for _, e in events if isinstance(e, FinishEvent)] == ["length"]


def test_process_table_counts_a_redelivered_completion_once() -> None:
    table = ProcessTable()
    event = completed("p", "c1", 2.0, engine_id="e", queue_wait_s=0.5, prompt_tokens=3, output_tokens=4)
    assert table.on_completed(event, now=1.0) is not None
    assert table.on_completed(event, now=2.0) is None  # the same completion again (JetStream redelivery)
    entry = table.get("p")
    assert entry is not None
    assert (entry.account.service_s, entry.account.calls_completed, entry.program_wait_s) == (2.0, 1, 0.5)


def test_a_completion_trailing_its_programs_end_does_not_bring_it_back() -> None:
    table = ProcessTable()
    table.on_dispatched(CallDispatched(call_id="c1", program_id="p", engine_id="e", priority=0.0), now=1.0)
    assert table.end("p", now=2.0) is not None
    late = completed("p", "c1", 1.0, engine_id="e")
    assert table.on_completed(late, now=3.0) is None
    assert table.get("p") is None  # no ghost program
    # the same id used again later is a new session
    table.on_dispatched(CallDispatched(call_id="c2", program_id="p", engine_id="e", priority=0.0), now=4.0)
    again = completed("p", "c2", 2.0, engine_id="e")
    assert table.on_completed(again, now=5.0) is not None
    entry = table.get("p")
    assert entry is not None and entry.account.service_s == 2.0
