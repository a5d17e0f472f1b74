"""The scheduler's submit path, without a broker: what it publishes for a call the door lets in at once
and for one it holds, and the count of calls in flight it keeps beside its routing table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from autellix.proto import CallAccepted, CallRequest, EngineHeartbeat, StampedCall, encode
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.scheduler.core import SchedulerCore
from autellix.services.scheduler.service import SchedulerService


@dataclass
class _Msg:
    data: bytes
    subject: str
    reply: str = ""


@dataclass
class _Recorder:
    """Stands in for the NATS connection: keeps what the service publishes."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    is_closed: bool = False

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: object = None) -> None:
        self.sent.append((subject, payload))


def _heartbeat(used: int) -> EngineHeartbeat:
    return EngineHeartbeat(
        engine_id="e1", backend="sim", model="m", kv_tokens_used=used, kv_tokens_capacity=1000, interval_s=60.0,
        sent_at=time.time(), policy="plas",
    )


def _service() -> tuple[SchedulerService, _Recorder]:
    service = SchedulerService(SchedulerConfig(nats=NatsConfig.at("nats://unused:4222", "fast")))
    recorder = _Recorder()
    service._nc = recorder  # type: ignore[assignment]  # pyright: ignore[reportAttributeAccessIssue]
    return service, recorder


def _beat(service: SchedulerService, used: int) -> None:
    hb = _heartbeat(used)
    service.core.on_heartbeat(hb, time.time())
    assert service.door is not None
    service.door.on_heartbeat(hb)


async def _submit(service: SchedulerService, program: str, call: str) -> None:
    request = CallRequest(program_id=program, call_id=call, prompt="some words", max_tokens=8, ack=True,
                          reply_to=f"_INBOX.{call}")  # fmt: skip
    await service._on_submit(_Msg(encode(request), service.subjects.call_submit))  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def _door_accepted(recorder: _Recorder, call: str) -> list[CallAccepted]:
    """The "accepted" replies (engine "": the call waits at the door) the scheduler sent the call's caller."""
    out = []
    for subject, payload in recorder.sent:
        if subject == f"_INBOX.{call}":
            reply = msgspec.json.decode(payload, type=CallAccepted)
            assert reply.engine_id == ""
            out.append(reply)
    return out


async def test_a_call_let_in_at_once_is_routed_and_only_a_held_one_hears_from_the_door() -> None:
    service, recorder = _service()
    _beat(service, used=0)
    await _submit(service, "A", "a1")  # nothing active: the door lets A in, and the call is routed
    stamped = [s for s, _ in recorder.sent if s == service.subjects.engine_calls("e1")]
    assert len(stamped) == 1 and _door_accepted(recorder, "a1") == []  # its engine says "accepted"

    _beat(service, used=800)  # A holds 800 of 1000: a second program does not fit
    await _submit(service, "B", "b1")
    assert [a.call_id for a in _door_accepted(recorder, "b1")] == ["b1"]  # taken: it waits at the door
    assert service.door is not None and service.door.holds("B")
    assert len([s for s, _ in recorder.sent if s == service.subjects.engine_calls("e1")]) == 1


def test_the_count_of_calls_in_flight_follows_the_routing_table() -> None:
    core = SchedulerCore(call_deadline_s=10.0)
    for engine in ("e1", "e2"):
        core.on_heartbeat(
            EngineHeartbeat(engine_id=engine, backend="sim", model="m", interval_s=60.0, policy="plas"), 0.0
        )

    def route(call: str, now: float) -> str:
        request = CallRequest(program_id="p", call_id=call, prompt="x", max_tokens=4)
        stamped: StampedCall = core.stamp(request, "_INBOX.r", now)
        engine = core.route(stamped, now)
        assert engine is not None
        core.on_routed(stamped, engine)
        return engine

    def in_flight() -> int:
        count = sum(map(len, core.routed.values()))
        assert core._in_flight == count
        return count

    engines = {call: route(call, 0.0) for call in ("c1", "c2", "c3", "c4")}
    route("c1", 0.0)  # routed again where it is: not counted twice
    assert in_flight() == 4
    core.on_completed("c1", engines["c1"])
    core.on_completed("c1", engines["c1"])  # a duplicate completion
    assert in_flight() == 3
    late = route("c5", 5.0)  # its deadline is later than the others'
    expired = core.expired(10.5)
    assert sorted(r.call_id for _, r in expired) == ["c2", "c3", "c4"] and in_flight() == 1
    core.on_heartbeat(EngineHeartbeat(engine_id=late, backend="sim", model="m", state="down"), 11.0)
    assert in_flight() == 0 and core._deadlines == []
