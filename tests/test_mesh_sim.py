"""The mesh end to end over a real nats-server, with the `sim` backend."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats
import pytest
from meshkit import Mesh, start_mesh, stop_mesh, until

from autellix.proto import CallChunk, CallError, CallFinal, Subjects, decode_reply
from autellix.services.client import CallFailed
from autellix.services.nats_config import NatsConfig


async def test_call_streams_through_all_three_services(mesh: Mesh) -> None:
    async with mesh.client.program() as p:
        stream = p.stream("one two three", max_tokens=7)
        pieces = [text async for text in stream]
        assert stream.result is not None
        assert stream.result.output_tokens == 7
        assert stream.result.finish_reason == "length"
        assert "".join(pieces) == stream.result.text == " tok" * 7
        assert stream.result.engine_id == mesh.engines[0].engine_id


async def test_tracker_table_reflects_completed_calls(mesh: Mesh) -> None:
    p = mesh.client.program("prog-table")
    first = await p.call("a b c", max_tokens=4)
    await p.call("d e", max_tokens=6, parents=[first.call_id])
    await until(lambda: (e := mesh.tracker.table.get("prog-table")) is not None and e.account.calls_completed == 2)
    table = await mesh.client.table()
    row = next(r for r in table.programs if r.program_id == "prog-table")
    assert row.calls_completed == 2
    assert row.active_calls == 0
    assert row.engines == [mesh.engines[0].engine_id]
    assert row.service_s > 0
    assert row.service_s == pytest.approx(first.final.service_s + row.service_s - first.final.service_s)
    ended = await p.end()
    assert ended.ok is True and ended.program is not None
    assert ended.program.calls_completed == 2
    assert mesh.tracker.table.get("prog-table") is None
    again = await p.end()
    assert again.ok is False and again.code == "unknown_program" and "unknown program" in again.error
    assert again.program is None


async def test_more_service_means_lower_priority(mesh: Mesh) -> None:
    busy = mesh.client.program("prog-busy")
    for _ in range(3):
        await busy.call("x y z", max_tokens=8)
    await until(lambda: (a := mesh.scheduler.core.programs.get("prog-busy")) is not None and a.calls_completed == 3)
    served = mesh.scheduler.core.programs["prog-busy"].service_s
    assert served > 0
    later = await busy.call("x", max_tokens=2)
    fresh = await mesh.client.program("prog-fresh").call("x", max_tokens=2)
    assert fresh.final.priority == 0.0
    assert later.final.priority == pytest.approx(served)
    assert later.final.priority > fresh.final.priority


BAD_INPUTS = [
    (b"{not json", "bad_json"),
    (b'{"program_id": "p", "max_tokens": "many", "prompt": "hi"}', "bad_field"),
    (b'{"program_id": 7, "prompt": "hi"}', "bad_field"),
    (b'{"prompt": "hi"}', "missing_program_id"),
    (b'{"program_id": "p", "prompt": "hi", "max_tokens": 0}', "bad_max_tokens"),
    (b'{"program_id": "p", "prompt": "hi", "max_tokens": -3}', "bad_max_tokens"),
    (b'{"program_id": "p", "prompt": "hi", "max_tokens": 100000}', "bad_max_tokens"),
    (b'{"program_id": "p", "messages": []}', "empty_messages"),
    (b'{"program_id": "p", "prompt": "' + b"w " * 140_000 + b'", "max_tokens": 8}', "prompt_too_long"),
]


@pytest.mark.parametrize(("payload", "code"), BAD_INPUTS, ids=[c for _, c in BAD_INPUTS])
async def test_bad_input_gets_an_error_and_the_mesh_keeps_serving(mesh: Mesh, payload: bytes, code: str) -> None:
    """Written the way the README tells a plain nats-py user to submit: JSON with a reply inbox."""
    nc = await nats.connect(mesh.url)
    try:
        subjects = Subjects(mesh.root)
        reply = await nc.request(subjects.call_submit, payload, timeout=10)
        error = decode_reply(reply.data)
        assert isinstance(error, CallError)
        assert error.code == code
        assert len(error.message) > 10 and "Traceback" not in error.message
        body = json.loads(reply.data)
        assert body["type"] == "error"
    finally:
        await nc.close()
    good = await mesh.client.program().call("still there?", max_tokens=3)
    assert good.output_tokens == 3


async def test_plain_json_client_reads_the_stream(mesh: Mesh) -> None:
    nc = await nats.connect(mesh.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        request = {"program_id": "plain", "call_id": "c1", "prompt": "hello", "max_tokens": 3, "reply_to": inbox}
        await nc.publish(f"{mesh.root}.call.submit", json.dumps(request).encode())
        kinds = []
        while True:
            msg = await sub.next_msg(timeout=10)
            body = json.loads(msg.data)
            kinds.append(body["type"])
            if body["type"] != "chunk":
                break
        assert kinds == ["chunk", "chunk", "chunk", "final"]
        assert body["call_id"] == "c1" and body["output_tokens"] == 3 and body["finish_reason"] == "length"
        # non-streaming: exactly one reply, so `nats req` works
        reply = await nc.request(
            f"{mesh.root}.call.submit",
            json.dumps({"program_id": "plain", "prompt": "hi", "stream": False}).encode(),
            10,
        )
        final = decode_reply(reply.data)
        assert isinstance(final, CallFinal) and final.output_tokens == 128
    finally:
        await nc.close()


async def test_parallel_calls_in_one_program(mesh: Mesh) -> None:
    async with mesh.client.program() as p:
        root = await p.call("plan", max_tokens=2)
        fan = await asyncio.gather(*(p.call(f"step {i}", max_tokens=3 + i, parents=[root.call_id]) for i in range(5)))
        assert [r.output_tokens for r in fan] == [3, 4, 5, 6, 7]
        assert len({r.call_id for r in fan}) == 5


async def test_abort_frees_the_call(mesh: Mesh) -> None:
    p = mesh.client.program()
    stream = p.stream("long one", max_tokens=500)
    got = []
    async for text in stream:
        got.append(text)
        if len(got) == 3:
            break
    await stream.aclose()
    engine = mesh.engines[0]
    await until(lambda: not engine._inflight)
    assert engine.core is not None and engine.core.idle
    assert (await p.call("after", max_tokens=2)).output_tokens == 2


async def test_no_engine_fails_with_clear_error(nats_url: str, root: str) -> None:
    m = await start_mesh(nats_url, root, engines=0, no_engine_wait_s=0.5)
    try:
        with pytest.raises(CallFailed) as info:
            await m.client.program().call("anyone?", max_tokens=2)
        assert info.value.code == "no_engine"
        assert "no engine" in info.value.message
    finally:
        await stop_mesh(m)


async def test_calls_wait_for_an_engine_that_joins(nats_url: str, root: str) -> None:
    from autellix.engine.factory import BackendSpec
    from autellix.services.engine.config import EngineConfig
    from autellix.services.engine.service import EngineService

    m = await start_mesh(nats_url, root, engines=0, no_engine_wait_s=10)
    late = EngineService(
        EngineConfig(
            nats=NatsConfig.at(nats_url, root), engine_id="late", backend=BackendSpec(name="sim", sim_time_scale=0)
        )
    )
    try:
        pending = asyncio.create_task(m.client.program().call("hello", max_tokens=2))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await late.start()
        result = await asyncio.wait_for(pending, 10)
        assert result.engine_id == "late"
    finally:
        await late.stop()
        await stop_mesh(m)


async def test_engine_stop_drains_running_calls(nats_url: str, root: str) -> None:
    m = await start_mesh(nats_url, root)
    try:
        calls = [asyncio.create_task(m.client.program().call("drain me", max_tokens=40)) for _ in range(3)]
        await until(lambda: len(m.engines[0]._inflight) == 3)
        await m.engines[0].stop()  # the SIGTERM path: stop taking work, finish what runs
        results = await asyncio.gather(*calls)
        assert [r.output_tokens for r in results] == [40, 40, 40]
    finally:
        await stop_mesh(m)


def test_reply_messages_decode_as_a_tagged_union() -> None:
    chunk = msgspec.json.encode({"type": "chunk", "call_id": "c", "seq": 0, "text": "hi"})
    assert isinstance(decode_reply(chunk), CallChunk)


async def test_a_calls_seed_reaches_the_engine(mesh) -> None:  # type: ignore[no-untyped-def]
    """``seed`` travels request -> stamped call -> the engine core's call (the hf backend seeds its
    sampler from it)."""
    import asyncio as _asyncio

    seen: list[int | None] = []
    engine = mesh.engines[0]
    assert engine.core is not None
    add = engine.core.add

    def spy(spec, now):  # type: ignore[no-untyped-def]
        seen.append(spec.seed)
        return add(spec, now)

    engine.core.add = spy  # type: ignore[method-assign]
    async with mesh.client.program() as p:
        await _asyncio.gather(p.call("x", max_tokens=2, seed=1234), p.call("y", max_tokens=2))
    assert sorted(seen, key=lambda v: v is None) == [1234, None]
