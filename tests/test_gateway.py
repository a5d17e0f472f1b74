"""The OpenAI-compatible gateway, with the official `openai` package as the client, against a mesh
of `sim` engines (and once against the real SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from meshkit import Mesh, start_gateway, start_mesh, stop_mesh
from prometheus_client.parser import text_string_to_metric_families

from autellix.engine.factory import BackendSpec
from autellix.proto import CallError, CallRequest, EngineHeartbeat, decode, encode
from autellix.services.gateway.config import GatewayConfig
from autellix.services.gateway.service import GatewayService
from autellix.services.nats_config import NatsConfig

openai = pytest.importorskip("openai")
try:  # the HTTP client the installed openai SDK is built on (httpx2 in its newer releases)
    import httpx2 as httpx
except ImportError:
    import httpx


@dataclass
class Gw:
    mesh: Mesh
    service: GatewayService
    sdk: Any  # openai.AsyncOpenAI

    @property
    def url(self) -> str:
        return self.service.url

    async def model(self) -> str:
        return (await self.sdk.models.list()).data[0].id


def sdk_for(url: str, api_key: str = "none") -> Any:
    # no SDK retries: the tests look at the first answer of each status
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


async def _gw(nats_url: str, root: str, **mesh_kwargs: Any) -> AsyncIterator[Gw]:
    mesh = await start_mesh(nats_url, root, **mesh_kwargs)
    service = await start_gateway(mesh)
    sdk = sdk_for(service.url)
    try:
        yield Gw(mesh, service, sdk)
    finally:
        await sdk.close()
        await service.stop()
        await stop_mesh(mesh)


@pytest.fixture
async def gw(nats_url: str, root: str) -> AsyncIterator[Gw]:
    async for g in _gw(nats_url, root):
        yield g


@pytest.fixture
async def gw_atlas(nats_url: str, root: str) -> AsyncIterator[Gw]:
    async for g in _gw(nats_url, root, policy="atlas"):
        yield g


async def until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
    return value


# -- completions ------------------------------------------------------------------------------------
async def test_chat_non_streaming_with_usage_and_one_call_program(gw: Gw) -> None:
    model = await gw.model()
    assert model.startswith("sim:")
    raw = await gw.sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=5, temperature=0
    )
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == " tok" * 5
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    # no identity: a program of one call, whose id is the call id; the gateway ends it afterwards
    assert raw.headers["x-autellix-one-call-program"] == "true"
    assert raw.headers["x-autellix-program"] == reply.id
    assert raw.headers["x-autellix-program-source"] == "none"
    await until(lambda: gw.mesh.tracker.table.get(reply.id) is None)


async def test_chat_streaming_chunks_usage_and_done(gw: Gw) -> None:
    model = await gw.model()
    stream = await gw.sdk.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}],
        max_completion_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok" * 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


async def test_sse_wire_format_ends_with_done(gw: Gw) -> None:
    model = await gw.model()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{gw.url}/v1/chat/completions", json=body, headers={"X-Session-ID": "sse"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["x-autellix-program"] == "sse"
    events = [e for e in reply.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


async def test_completions_streaming_and_not(gw: Gw) -> None:
    model = await gw.model()
    done = await gw.sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=4)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].text == " tok" * 4 and done.usage.completion_tokens == 4
    stream = await gw.sdk.completions.create(model=model, prompt="Once", max_tokens=3, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == " tok" * 3
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stop_string_cuts_the_text_and_aborts_the_call(gw: Gw) -> None:
    model = await gw.model()
    reply = await gw.sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "go"}], max_tokens=400, stop=["tok tok"]
    )
    assert reply.choices[0].message.content == " "
    assert reply.choices[0].finish_reason == "stop"
    engine = gw.mesh.engines[0]
    await until(lambda: not engine._inflight)  # aborted, not run to 400 tokens


# -- program identity -------------------------------------------------------------------------------
async def test_session_header_makes_two_calls_one_program(gw: Gw) -> None:
    model = await gw.model()
    headers = {"X-Session-ID": "agent-7"}
    for prompt in ("first", "second"):
        raw = await gw.sdk.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=3, extra_headers=headers
        )
        assert raw.headers["x-autellix-program"] == "agent-7"
        assert raw.headers["x-autellix-one-call-program"] == "false"
        assert raw.headers["x-autellix-program-source"] == "header:x-session-id"

    async def two() -> Any:
        table = await gw.mesh.client.table()
        return next((r for r in table.programs if r.program_id == "agent-7" and r.calls_completed == 2), None)

    deadline = time.monotonic() + 10
    while (row := await two()) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert row.service_s > 0
    # the explicit header wins over the body's user
    raw = await gw.sdk.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=1,
        user="someone",
        extra_headers={"x-autellix-program": "explicit", "x-dynamo-session-id": "dyn"},
    )
    assert raw.headers["x-autellix-program"] == "explicit"
    raw = await gw.sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1, user="someone"
    )
    assert raw.headers["x-autellix-program"] == "someone"
    assert raw.headers["x-autellix-program-source"] == "body:user"


async def test_parents_header_gives_atlas_stamps(gw_atlas: Gw) -> None:
    gw = gw_atlas
    model = await gw.model()
    nc = await nats.connect(gw.mesh.url)
    stamps: dict[str, dict[str, Any]] = {}
    service: dict[str, float] = {}

    async def on_dispatched(msg: Any) -> None:
        event = json.loads(msg.data)
        stamps[event["call_id"]] = event

    async def on_service(msg: Any) -> None:
        update = json.loads(msg.data)
        if update.get("call_id"):
            service[update["call_id"]] = update["call_path_s"]

    await nc.subscribe(f"{gw.mesh.root}.events.call.dispatched.*", cb=on_dispatched)  # every program slot
    await nc.subscribe(f"{gw.mesh.root}.tracker.service", cb=on_service)
    await nc.flush()
    try:
        headers = {"X-Session-ID": "tree", "X-Autellix-Parents": ""}
        root = await gw.sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "plan"}], max_tokens=8, extra_headers=headers
        )
        await until(lambda: root.id in service)
        await asyncio.sleep(0.1)  # the scheduler hears the same update
        child = await gw.sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "step"}],
            max_tokens=2,
            extra_headers={"X-Session-ID": "tree", "X-Autellix-Parents": root.id},
        )
        await until(lambda: child.id in stamps)
        assert stamps[root.id]["parents"] == [] and stamps[root.id]["priority"] == 0.0
        assert stamps[child.id]["parents"] == [root.id]
        # ATLAS: a child's priority is its parent's finish on the critical path
        assert stamps[child.id]["priority"] == pytest.approx(service[root.id]) and service[root.id] > 0
    finally:
        await nc.close()


async def test_program_end_endpoint_and_final_header(gw: Gw) -> None:
    model = await gw.model()
    msgs = [{"role": "user", "content": "x"}]
    await gw.sdk.chat.completions.create(model=model, messages=msgs, max_tokens=2, extra_headers={"X-Session-ID": "p1"})
    await until(lambda: gw.mesh.tracker.table.get("p1") is not None)
    async with httpx.AsyncClient() as http:
        ended = await http.post(f"{gw.url}/v1/programs/p1/end")
        assert ended.status_code == 200 and ended.json()["ok"] is True
        assert ended.json()["program"]["program_id"] == "p1"
        again = await http.post(f"{gw.url}/v1/programs/p1/end")
        assert again.status_code == 404 and again.json()["error"]["code"] == "program_not_found"
    assert gw.mesh.tracker.table.get("p1") is None
    # X-Session-Final: the program ends with its last call (before the response completes)
    headers = {"X-Session-ID": "p2"}
    await gw.sdk.chat.completions.create(model=model, messages=msgs, max_tokens=2, extra_headers=headers)
    stream = await gw.sdk.chat.completions.create(
        model=model, messages=msgs, max_tokens=2, stream=True, extra_headers={**headers, "X-Session-Final": "true"}
    )
    [c async for c in stream]
    assert gw.mesh.tracker.table.get("p2") is None


# -- errors -----------------------------------------------------------------------------------------
async def test_bad_input_is_400_in_openai_shape(gw: Gw) -> None:
    model = await gw.model()
    msgs = [{"role": "user", "content": "x"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "unsupported_parameter"),
        ({"logprobs": True}, "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "unsupported_parameter"),
        ({"extra_body": {"frobnicate": 1}}, "unsupported_parameter"),
        ({"max_tokens": 0}, "bad_max_tokens"),  # the scheduler's own check, mapped
        ({"max_tokens": 100_000}, "bad_max_tokens"),
        ({"temperature": 5}, "invalid_request"),
    ]
    for extra, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await gw.sdk.chat.completions.create(model=model, messages=msgs, **extra)
        assert info.value.status_code == 400
        assert info.value.code == code, (extra, info.value.body)
        assert info.value.type == "invalid_request_error"
    # one model served: any name gets it (agents hard-code model names) ...
    any_name = await gw.sdk.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=1)
    assert any_name.model == model
    # ... with several, the name must be one of them
    other = EngineHeartbeat(
        engine_id="elsewhere", backend="sim", model="other-model", interval_s=60, sent_at=time.time()
    )
    gw.service.live.on_heartbeat(other, time.time())
    with pytest.raises(openai.NotFoundError) as nf:
        await gw.sdk.chat.completions.create(model="gpt-nope", messages=msgs)
    assert nf.value.code == "model_not_found" and "other-model" in nf.value.message
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{gw.url}/v1/chat/completions", content=b"{not json")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_json"


async def test_no_engine_is_503_and_not_ready(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=0, no_engine_wait_s=0.3)
    service = await start_gateway(mesh)
    sdk = sdk_for(service.url)
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{service.url}/health")).status_code == 200
            ready = await http.get(f"{service.url}/ready")
            assert ready.status_code == 503 and ready.json()["engines"] == 0
            assert (await http.get(f"{service.url}/v1/models")).json()["data"] == []
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}], stream=True)
        assert info.value.status_code == 503 and info.value.code == "no_engine"
    finally:
        await sdk.close()
        await service.stop()
        await stop_mesh(mesh)


async def test_rate_limited_is_429(nats_url: str, root: str) -> None:
    """A scheduler that refuses with `rate_limited` (bounded queues): the agent sees OpenAI's 429."""
    nc = await nats.connect(nats_url)

    async def refuse(msg: Any) -> None:
        request = decode(msg.data, CallRequest)
        error = CallError(call_id=request.call_id, code="rate_limited", message="too many calls queued; retry later")
        await nc.publish(request.reply_to, encode(error))

    await nc.subscribe(f"{root}.call.submit", cb=refuse)
    service = GatewayService(GatewayConfig(nats=NatsConfig.at(nats_url, root), host="127.0.0.1", port=0))
    await service.start()
    sdk = sdk_for(service.url)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 429 and info.value.code == "rate_limited"
        assert info.value.type == "rate_limit_error"
    finally:
        await sdk.close()
        await service.stop()
        await nc.close()


async def test_api_keys_name_tenants(gw: Gw) -> None:
    service = await start_gateway(gw.mesh, api_keys="k-acme=acme,k-beta=beta")
    model = await gw.model()
    msgs = [{"role": "user", "content": "x"}]
    nc = await nats.connect(gw.mesh.url)
    seen: list[dict[str, Any]] = []

    async def on_submit(msg: Any) -> None:
        seen.append(json.loads(msg.data))

    await nc.subscribe(f"{gw.mesh.root}.call.submit", cb=on_submit)
    await nc.flush()
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk_for(service.url, "wrong").chat.completions.create(model=model, messages=msgs)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        acme = sdk_for(service.url, "k-acme")
        raw = await acme.chat.completions.with_raw_response.create(
            model=model, messages=msgs, max_tokens=2, extra_headers={"X-Session-ID": "s"}
        )
        assert raw.headers["x-autellix-program"] == "s"
        await until(lambda: seen)
        assert seen[0]["tenant"] == "acme" and seen[0]["program_id"] == "acme/s"
        async with httpx.AsyncClient() as http:  # another tenant cannot end acme's program
            other = await http.post(f"{service.url}/v1/programs/s/end", headers={"Authorization": "Bearer k-beta"})
            assert other.status_code == 404
            mine = await http.post(f"{service.url}/v1/programs/s/end", headers={"Authorization": "Bearer k-acme"})
            assert mine.status_code == 200
        await acme.close()
    finally:
        await nc.close()
        await service.stop()


async def test_disconnect_mid_stream_aborts_the_call(gw: Gw) -> None:
    model = await gw.model()
    nc = await nats.connect(gw.mesh.url)
    completed: list[dict[str, Any]] = []

    async def on_completed(msg: Any) -> None:
        completed.append(json.loads(msg.data))

    await nc.subscribe(f"{gw.mesh.root}.events.call.completed.*", cb=on_completed)  # every program slot
    await nc.flush()
    try:
        stream = await gw.sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "long"}], max_tokens=500, stream=True
        )
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.close()  # the HTTP connection goes away mid-stream
        event = await until(lambda: next((e for e in completed if e["call_id"].startswith("chatcmpl-")), None))
        assert event["finish_reason"] == "abort"
        assert event["output_tokens"] < 500
        assert not gw.mesh.engines[0]._inflight
    finally:
        await nc.close()


# -- metrics ----------------------------------------------------------------------------------------
def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_counters_move(gw: Gw) -> None:
    model = await gw.model()
    async with httpx.AsyncClient() as http:
        before = _samples((await http.get(f"{gw.url}/metrics")).text)
        await gw.sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3)
        reply = await http.get(f"{gw.url}/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    after = _samples(reply.text)
    key = ("autellix:gateway_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    assert (
        after[("autellix:gateway_generation_tokens_total", ())]
        == before[("autellix:gateway_generation_tokens_total", ())] + 3
    )
    assert after[("autellix:gateway_time_to_first_token_seconds_count", ())] >= 1


# -- the real model ---------------------------------------------------------------------------------
@pytest.mark.model
async def test_capital_of_france_through_the_sdk(nats_url: str, root: str, hf_backend: Any) -> None:
    mesh = await start_mesh(nats_url, root, backend=BackendSpec(name="hf"), backend_instance=hf_backend)
    service = await start_gateway(mesh)
    sdk = sdk_for(service.url)
    try:
        model = (await sdk.models.list()).data[0].id
        reply = await sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            extra_headers={"X-Session-ID": "geo"},
        )
        assert "Paris" in reply.choices[0].message.content
    finally:
        await sdk.close()
        await service.stop()
        await stop_mesh(mesh)
