"""No single message disables a service: one test per class of bad message found against the mesh
(issue 11), each over a real nats-server, each ending with the mesh still serving a good call."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import nats
import pytest
from meshkit import Mesh, until

from autellix.proto import CallError, CallFinal, Subjects, decode_reply
from autellix.proto.limits import MAX_ID_CHARS, check_shape, is_subject, storage_key
from autellix.services.log_throttle import LogThrottle
from autellix.services.nats_config import NatsConfig


def _alive(mesh: Mesh) -> None:
    """Every service can still do its work: connections open, loops running, health ok."""
    for service in [mesh.tracker, mesh.scheduler, *mesh.engines]:
        assert service._nc is not None and service._nc.is_connected, service.name
        health = getattr(service, "health", None)
        assert health is None or health.ok, (service.name, health.reason)
    for engine in mesh.engines:
        assert all(not t.done() for t in engine._tasks), "an engine loop ended"


async def _good_call(mesh: Mesh) -> None:
    result = await asyncio.wait_for(mesh.client.program().call("still there?", max_tokens=3), 20)
    assert result.output_tokens == 3


async def _raw(mesh: Mesh) -> nats.NATS:
    return await nats.connect(mesh.url)


# -- reply subjects ---------------------------------------------------------------------------------
BAD_REPLY_TO = ["has space", "has\ttab", "wild.*", "wild.>", "x" * 5000, "a..b", ".lead", "trail."]


@pytest.mark.parametrize("reply_to", BAD_REPLY_TO, ids=["space", "tab", "star", "gt", "5000", "empty-token", "lead",
                                                        "trail"])
async def test_bad_reply_to_is_rejected_before_use(mesh: Mesh, reply_to: str) -> None:
    nc = await _raw(mesh)
    try:
        body = {"program_id": "victim", "call_id": "c-bad", "prompt": "hi", "max_tokens": 2, "reply_to": reply_to}
        reply = await nc.request(Subjects(mesh.root).call_submit, json.dumps(body).encode(), timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError)
        assert error.code == "bad_field" and "reply_to" in error.message
        assert error.program_id == "victim" and error.call_id == "c-bad"  # kept where readable
    finally:
        await nc.close()
    _alive(mesh)
    await _good_call(mesh)


def test_subject_validator() -> None:
    assert is_subject("_INBOX.abc.def") and is_subject("a-b_c.1")
    for bad in ["", "a b", "a\tb", "a\r\nPUB x", "a.*", ">", "a..b", "x" * 600, "é"]:
        assert not is_subject(bad), bad


# -- one stamped call straight to an engine, or handed back --------------------------------------------
@pytest.mark.parametrize("where", ["engine", "handback"])
async def test_malformed_stamped_call_cannot_kill_the_step_loop(mesh: Mesh, where: str) -> None:
    s = Subjects(mesh.root)
    subject = s.engine_calls(mesh.engines[0].engine_id) if where == "engine" else s.call_handback
    nc = await _raw(mesh)
    try:
        for reply_to in ["has space", "x" * 5000, "wild.*"]:
            call = {"call_id": "c1", "program_id": "p", "reply_to": reply_to, "prompt": "hi", "max_tokens": 3}
            await nc.publish(subject, json.dumps(call).encode())
        # and one that is valid but asks for no tokens at all, straight to the engine
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        call = {"call_id": "c2", "program_id": "p", "reply_to": inbox, "prompt": "hi", "max_tokens": 0}
        await nc.publish(s.engine_calls(mesh.engines[0].engine_id), json.dumps(call).encode())
        error = decode_reply((await sub.next_msg(timeout=10)).data)
        assert isinstance(error, CallError) and error.code == "bad_max_tokens"
        await nc.flush()
    finally:
        await nc.close()
    await asyncio.sleep(0.2)
    _alive(mesh)
    await _good_call(mesh)


# -- ids too long for storage keys, in every event the tracker reads --------------------------------------
async def test_long_ids_cannot_break_the_tracker(mesh: Mesh) -> None:
    s = Subjects(mesh.root)
    huge = "p" * 3000
    nc = await _raw(mesh)
    try:
        reply = await nc.request(s.call_submit, json.dumps({"program_id": huge, "prompt": "hi"}).encode(), 10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError) and error.code == "bad_field" and error.program_id == ""
        dispatched = {"call_id": "c", "program_id": huge, "engine_id": "e", "priority": 0}
        await nc.publish(s.call_dispatched, json.dumps(dispatched).encode())
        for _ in range(2):
            completed = {
                "call_id": "c" * 600_000, "program_id": "q", "engine_id": "e", "service_s": 1.0,
                "queue_wait_s": 0.0, "prompt_tokens": 1, "output_tokens": 1, "finish_reason": "stop",
            }  # fmt: skip
            await nc.publish(s.call_completed, json.dumps(completed).encode())
        await nc.flush()
    finally:
        await nc.close()
    await asyncio.sleep(0.2)
    assert mesh.tracker.table.get(huge) is None and mesh.tracker.table.get("q") is None
    _alive(mesh)
    # the tracker still counts and stores real programs
    p = mesh.client.program("after-long-ids")
    await p.call("x", max_tokens=2)
    await until(lambda: (e := mesh.tracker.table.get("after-long-ids")) is not None and e.account.calls_completed)
    await until(lambda: not mesh.tracker.store._dirty)


def test_storage_keys_are_bounded_and_distinct() -> None:
    assert storage_key("p1") == "cDE"  # the keys earlier versions wrote
    long_a, long_b = storage_key("a" * 100_000), storage_key("a" * 99_999 + "b")
    assert len(long_a) == 65 and long_a.startswith("=") and long_a != long_b
    assert not any(storage_key(x).startswith("=") for x in ["", "x" * 64, "é" * 32])


# -- nesting, wrong types, oversize fields -----------------------------------------------------------
async def test_deep_json_gets_bad_json(mesh: Mesh) -> None:
    nc = await _raw(mesh)
    try:
        deep = b'{"program_id": "p", "prompt": "hi", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        reply = await nc.request(Subjects(mesh.root).call_submit, deep, timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError) and error.code == "bad_json" and "nested" in error.message
    finally:
        await nc.close()
    _alive(mesh)


def test_depth_check_counts_only_structure() -> None:
    check_shape(b'{"a": "' + b"[" * 5000 + b'"}')  # brackets inside a string are text
    check_shape(b"[" * 16 + b"]" * 16)
    with pytest.raises(msgspec.DecodeError):
        check_shape(b"[" * 17 + b"]" * 17)


OVERSIZE = [
    {"call_id": "c" * (MAX_ID_CHARS + 1)},
    {"parents": ["x"] * 2000},
    {"resume_token_ids": [-1]},
    {"messages": [{"role": "r" * 1000, "content": "hi"}]},
    {"attempt": -1},
    {"temperature": 1e300},
]


@pytest.mark.parametrize("extra", OVERSIZE, ids=[next(iter(e)) for e in OVERSIZE])
async def test_every_field_is_bounded_and_errors_keep_the_program(mesh: Mesh, extra: dict[str, object]) -> None:
    nc = await _raw(mesh)
    try:
        body = {"program_id": "mine", "prompt": "hi", "max_tokens": 2, **extra}
        reply = await nc.request(Subjects(mesh.root).call_submit, json.dumps(body).encode(), timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError) and error.code == "bad_field"
        assert error.program_id == "mine"
    finally:
        await nc.close()


# -- every other subject: events, updates, heartbeats, aborts, program end --------------------------------
async def test_garbage_on_every_subject_leaves_the_mesh_serving(mesh: Mesh) -> None:
    s = Subjects(mesh.root)
    engine_id = mesh.engines[0].engine_id
    junk = [b"", b"{", b"[]", b"null", b'{"call_id": 7}', b"[" * 5000, b'{"engine_id": "a.b", "backend": "x",'
            b' "model": "m"}', b'{"engine_id": "a b", "backend": "x", "model": "m", "state": "up"}',
            b'{"program_id": "x", "service_s": -5}', b'{"call_id": "c", "engine_id": "*"}']  # fmt: skip
    subjects = [
        s.call_submit, s.call_abort, s.call_handback, s.program_end, s.tracker_table, s.program_service,
        s.engine_calls(engine_id), s.engine_heartbeat, s.call_dispatched, s.call_completed,
        s.call_dispatched_for("x"), s.call_completed_for("x"),
    ]  # fmt: skip
    nc = await _raw(mesh)
    try:
        for subject in subjects:
            for payload in junk:
                await nc.publish(subject, payload)
                await nc.publish(subject, payload, reply=nc.new_inbox())
        reply = await nc.request(s.program_end, b'{"program_id": "never-seen"}', timeout=5)
        assert json.loads(reply.data) == {
            "ok": False, "code": "unknown_program", "error": "unknown program 'never-seen'"
        }  # fmt: skip
        reply = await nc.request(s.program_end, b"[" * 1000, timeout=5)
        assert json.loads(reply.data)["code"] == "bad_json"
        reply = await nc.request(s.program_end, b'{"program_id": 7}', timeout=5)
        assert json.loads(reply.data)["code"] == "bad_field"
        await nc.flush()
    finally:
        await nc.close()
    await asyncio.sleep(0.3)
    _alive(mesh)
    assert set(mesh.scheduler.core.engines) == {engine_id}
    await _good_call(mesh)


# -- a call the engine refuses after dispatch releases its program's active count -------------------------
async def test_rejected_call_releases_the_active_count(mesh: Mesh) -> None:
    nc = await _raw(mesh)
    try:
        body = {"program_id": "too-long", "prompt": "w " * 140_000, "max_tokens": 8}
        reply = await nc.request(Subjects(mesh.root).call_submit, json.dumps(body).encode(), timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError) and error.code == "prompt_too_long" and error.program_id == "too-long"
    finally:
        await nc.close()
    # the dispatched event created the program; the engine's rejection releases its call
    await until(lambda: (e := mesh.tracker.table.get("too-long")) is not None and not e.active_calls)
    entry = mesh.tracker.table.get("too-long")
    assert entry is not None and entry.account.calls_completed == 0 and entry.account.service_s == 0
    await until(lambda: not any(mesh.scheduler.core.routed.values()))  # its own copy of the event


def test_phantom_active_calls_expire() -> None:
    from autellix.proto import CallDispatched
    from autellix.services.tracker.process_table import ProcessTable

    t = ProcessTable(idle_ttl_s=10, active_call_max_s=100)
    t.on_dispatched(CallDispatched(call_id="lost", program_id="p", engine_id="e", priority=0), now=0)
    assert t.expire(50) == [] and t.get("p") is not None  # idle past its TTL, but a call is active
    assert [u.program_id for u in t.expire(101)] == ["p"]  # the call never completed: forgotten


# -- an aborted call ends with the documented final ----------------------------------------------------
async def test_abort_ends_with_final_abort(mesh: Mesh) -> None:
    s = Subjects(mesh.root)
    nc = await _raw(mesh)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = {"program_id": "ab", "call_id": "to-abort", "prompt": "go", "max_tokens": 500, "reply_to": inbox}
        await nc.publish(s.call_submit, json.dumps(body).encode())
        first = json.loads((await sub.next_msg(timeout=10)).data)
        assert first["type"] == "chunk"
        await nc.publish(s.call_abort, b'{"call_id": "to-abort"}')
        while True:
            reply = decode_reply((await sub.next_msg(timeout=10)).data)
            if not isinstance(reply, CallFinal | CallError):
                continue
            break
        assert isinstance(reply, CallFinal) and reply.finish_reason == "abort"
        assert 0 < reply.output_tokens < 500 and reply.program_id == "ab"
    finally:
        await nc.close()
    await until(lambda: (e := mesh.tracker.table.get("ab")) is not None and not e.active_calls)


# -- health: a service that cannot work stops counting as up --------------------------------------------
async def test_dead_step_loop_fails_the_engine_and_stops_its_heartbeats(mesh: Mesh) -> None:
    engine = mesh.engines[0]
    assert engine.core is not None

    def broken(now: float) -> None:
        raise RuntimeError("injected fault")

    engine.core.schedule = broken  # type: ignore[method-assign]
    engine._wake.set()
    await asyncio.wait_for(engine.health.failed.wait(), 5)
    assert "injected fault" in engine.health.reason
    # its heartbeats stop, so the scheduler forgets it within 3 intervals and routes nothing there
    await until(lambda: engine.engine_id not in mesh.scheduler.core.engines, timeout_s=3)


async def test_closed_connection_fails_the_service(mesh: Mesh) -> None:
    assert mesh.tracker._nc is not None
    await mesh.tracker._nc.close()
    await asyncio.wait_for(mesh.tracker.health.failed.wait(), 5)
    assert "closed" in mesh.tracker.health.reason


def test_log_throttle_passes_a_burst_then_one_per_window() -> None:
    now = [0.0]
    throttle = LogThrottle(every_s=10, burst=3, clock=lambda: now[0])
    passed = [throttle.allow("k") for _ in range(100)]
    assert passed[:3] == [0, 0, 0] and all(p is None for p in passed[3:])
    now[0] = 10.5
    assert throttle.allow("k") == 97  # the next line says how many were held back
    assert throttle.allow("other") == 0


# -- every call has a deadline ----------------------------------------------------------------------
async def test_call_past_its_deadline_fails_clearly_and_is_dropped(nats_url: str, root: str) -> None:
    from meshkit import start_mesh, stop_mesh

    from autellix.engine.factory import BackendSpec

    m = await start_mesh(nats_url, root, backend=BackendSpec(name="sim", sim_time_scale=1.0))
    nc = await nats.connect(nats_url)
    try:
        body = {"program_id": "slow", "call_id": "late", "prompt": "go", "max_tokens": 500, "deadline_s": 0.3,
                "stream": False}  # fmt: skip
        t0 = time.monotonic()
        reply = await nc.request(Subjects(root).call_submit, json.dumps(body).encode(), timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError) and error.code == "deadline_exceeded"
        assert error.call_id == "late" and error.program_id == "slow"
        assert 0.3 <= time.monotonic() - t0 < 2
        await until(lambda: not m.engines[0]._inflight)  # the engine dropped it
        await until(lambda: (e := m.tracker.table.get("slow")) is not None and not e.active_calls)
    finally:
        await nc.close()
        await stop_mesh(m)


# -- shutdown: SIGTERM ends a service that cannot reach its broker --------------------------------------
def test_sigterm_ends_a_service_still_connecting() -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, AUTELLIX_LOG_LEVEL="info")
    cmd = [sys.executable, "-m", "autellix.services.cli", "scheduler", "--nats", f"nats://127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # it has started and is trying to connect
            if b'"starting"' in line:
                break
        time.sleep(1.0)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- backpressure: bounded queues shed with rate_limited ---------------------------------------------
async def test_engine_sheds_past_its_waiting_limit(nats_url: str, root: str) -> None:
    from meshkit import start_mesh, stop_mesh, wait_for_engines

    from autellix.engine.factory import BackendSpec
    from autellix.services.engine.config import EngineConfig
    from autellix.services.engine.service import EngineService

    m = await start_mesh(nats_url, root, engines=0)
    spec = BackendSpec(name="sim", sim_time_scale=1.0, max_batch=2)
    config = EngineConfig(nats=NatsConfig.at(nats_url, root), engine_id="small", backend=spec, max_waiting=1,
                          heartbeat_s=0.2)  # fmt: skip
    engine = EngineService(config)
    await engine.start()
    nc = await nats.connect(nats_url)
    try:
        await wait_for_engines(m.scheduler, 1)
        requests = [
            nc.request(Subjects(root).call_submit, json.dumps(
                {"program_id": f"bp{i}", "prompt": "x", "max_tokens": 30, "stream": False}).encode(), timeout=20)
            for i in range(6)
        ]  # fmt: skip
        replies = [decode_reply(r.data) for r in await asyncio.gather(*requests)]
        shed = [r for r in replies if isinstance(r, CallError)]
        assert len(shed) == 3 and all(r.code == "rate_limited" and "limit" in r.message for r in shed)
        assert sum(isinstance(r, CallFinal) for r in replies) == 3
        await until(lambda: all(not e.active_calls for e in (m.tracker.table.get(f"bp{i}") for i in range(6)) if e))
    finally:
        await nc.close()
        await engine.stop()
        await stop_mesh(m)


def test_scheduler_limits_calls_in_flight_per_program() -> None:
    from autellix.services.scheduler.core import RejectedCall, SchedulerCore

    core = SchedulerCore(max_calls_per_program=2)
    body = b'{"program_id": "greedy", "prompt": "x", "reply_to": "r"}'
    for _ in range(2):
        request = core.parse(body, "")
        core.on_routed(core.stamp(request, "r", 0.0), "e1")
    with pytest.raises(RejectedCall) as info:
        core.parse(body, "")
    assert info.value.error.code == "rate_limited" and info.value.error.program_id == "greedy"
    core.parse(b'{"program_id": "other", "prompt": "x"}', "r")  # other programs are not held back
    core.on_completed(request.call_id, "e1")
    assert core.parse(body, "").program_id == "greedy"


# -- shutdown budgets --------------------------------------------------------------------------------
class _SlowStop:
    def __init__(self, name: str, stop_s: float, budget_s: float = 5.0) -> None:
        self.name, self.stop_s, self.stop_timeout_s = name, stop_s, budget_s

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await asyncio.sleep(self.stop_s)


async def test_engines_stop_in_parallel_and_within_their_budget() -> None:
    from autellix.services.lifecycle import stop_stages

    t0 = time.monotonic()
    await stop_stages([[_SlowStop("a", 0.3), _SlowStop("b", 0.3), _SlowStop("c", 0.3)]])
    assert time.monotonic() - t0 < 0.6  # one drain, not three
    t0 = time.monotonic()
    await stop_stages([[_SlowStop("hung", 60, budget_s=0.2)], [_SlowStop("next", 0)]])
    assert time.monotonic() - t0 < 1.0  # a stop that hangs is abandoned at its budget


async def test_stuck_model_step_fails_the_engine(nats_url: str, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshkit import start_mesh, stop_mesh

    import autellix.services.engine.service as engine_service
    from autellix.engine.factory import BackendSpec
    from autellix.services.engine.config import EngineConfig
    from autellix.services.engine.service import EngineService

    def hung(backend: object, plan: object) -> object:
        time.sleep(1.5)
        raise RuntimeError("never finished")

    m = await start_mesh(nats_url, root, engines=0)
    spec = BackendSpec(name="sim", sim_time_scale=0)
    config = EngineConfig(nats=NatsConfig.at(nats_url, root), engine_id="stuck", heartbeat_s=0.1, step_stuck_s=0.4,
                          backend=spec)  # fmt: skip
    engine = EngineService(config)
    await engine.start()
    try:
        monkeypatch.setattr(engine_service, "execute_plan", hung)
        call = asyncio.create_task(m.client.program().call("x", max_tokens=2))
        await asyncio.wait_for(engine.health.failed.wait(), 5)
        assert "model step has run" in engine.health.reason
        await until(lambda: "stuck" not in m.scheduler.core.engines, timeout_s=3)
        call.cancel()
    finally:
        await engine.stop()
        await stop_mesh(m)


async def test_a_failed_service_ends_the_process_with_status_1() -> None:
    from autellix.services.lifecycle import Health, run_until_signal

    class Failing(_SlowStop):
        def __init__(self) -> None:
            super().__init__("failing", 0)
            self.health = Health("failing")
            self.stopped = False

        async def start(self) -> None:
            asyncio.get_running_loop().call_later(0.1, self.health.fail, "injected")

        async def stop(self) -> None:
            self.stopped = True

    service = Failing()
    assert await asyncio.wait_for(run_until_signal([service]), 5) == 1
    assert service.stopped


async def test_a_call_whose_output_cannot_be_sent_fails_alone(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = mesh.engines[0]
    real_chunk = engine._chunk

    async def chunk(flight, text: str) -> None:  # type: ignore[no-untyped-def]
        if flight.call.program_id == "poison":
            raise nats.errors.MaxPayloadError
        await real_chunk(flight, text)

    monkeypatch.setattr(engine, "_chunk", chunk)
    poison = asyncio.create_task(mesh.client.program("poison").call("x", max_tokens=20))
    good = [asyncio.create_task(mesh.client.program().call("y", max_tokens=20)) for _ in range(3)]
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(poison, 10)
    assert getattr(info.value, "code", None) == "internal"
    assert [r.output_tokens for r in await asyncio.gather(*good)] == [20, 20, 20]
    _alive(mesh)
    await until(lambda: not engine._inflight)
    await until(lambda: (e := mesh.tracker.table.get("poison")) is not None and not e.active_calls)


def test_calls_on_a_gone_engine_leave_the_active_counts() -> None:
    from autellix.proto import CallDispatched, EngineHeartbeat
    from autellix.services.tracker.engine_liveness import EngineLiveness
    from autellix.services.tracker.process_table import ProcessTable

    live = EngineLiveness()
    live.on_heartbeat(EngineHeartbeat(engine_id="a", backend="sim", model="m", interval_s=1.0), now=0)
    live.on_heartbeat(EngineHeartbeat(engine_id="b", backend="sim", model="m", interval_s=1.0), now=0)
    assert live.gone(2.9) == []
    live.on_heartbeat(EngineHeartbeat(engine_id="b", backend="sim", model="m", state="down"), now=3)
    assert live.gone(3.1) == ["b", "a"] and live.gone(10) == []

    t = ProcessTable()
    t.on_dispatched(CallDispatched(call_id="c1", program_id="p", engine_id="a", priority=0), now=0)
    t.on_dispatched(CallDispatched(call_id="c2", program_id="p", engine_id="b", priority=0), now=0)
    t.on_dispatched(CallDispatched(call_id="c2", program_id="p", engine_id="a", priority=0), now=1)  # resubmitted
    assert t.engine_gone("b") == []  # c2 moved on to engine a
    assert t.engine_gone("a") == ["p"] and not t.get("p").active_calls  # type: ignore[union-attr]


async def test_tracker_drops_active_calls_of_an_engine_that_stopped(mesh: Mesh) -> None:
    s = Subjects(mesh.root)
    nc = await _raw(mesh)
    try:
        beat = {"engine_id": "ghost", "backend": "sim", "model": "m", "interval_s": 0.1}
        await nc.publish(s.engine_heartbeat, json.dumps(beat).encode())
        dispatched = {"call_id": "c-ghost", "program_id": "haunted", "engine_id": "ghost", "priority": 0}
        await nc.publish(s.call_dispatched, json.dumps(dispatched).encode())
        await nc.flush()
        await until(lambda: (e := mesh.tracker.table.get("haunted")) is not None and e.active_calls)
        # no more heartbeats from the ghost: within 3 intervals and a GC round, its call is dropped
        await until(lambda: not mesh.tracker.table.get("haunted").active_calls, timeout_s=5)  # type: ignore[union-attr]
    finally:
        await nc.close()


def test_scheduler_routes_around_full_engines() -> None:
    from autellix.proto import EngineHeartbeat
    from autellix.services.scheduler.core import SchedulerCore

    core = SchedulerCore(balancer="round-robin")
    for eid, waiting in (("full", 9), ("room", 0)):
        hb = EngineHeartbeat(engine_id=eid, backend="sim", model="m", running=1, waiting=waiting, calls_limit=10)
        core.on_heartbeat(hb, now=0)
    request = core.parse(b'{"program_id": "p", "prompt": "x"}', "r")
    assert {core.route(request, 0.1) for _ in range(5)} == {"room"}
    assert core.engines["room"].pending_calls == 5
    for _ in range(5):  # "room" is full too now (counting what was routed): either may take the call and shed it
        core.route(request, 0.1)
    assert core.route(request, 0.1) in ("full", "room")
