"""A seeded fuzz campaign over every subject of the mesh: a few thousand generated messages (valid,
near-valid and hostile: bad reply subjects, long ids, deep JSON, wrong types, fake engines), then
every service must still be alive and a good call answered. Bounded to seconds."""

from __future__ import annotations

import asyncio
import json
import random
import time

import nats
from meshkit import Mesh

from autellix.proto import Subjects

SEED = 20261202
MESSAGES = 3000


def _string(rng: random.Random) -> object:
    return rng.choice(
        [
            "", "p", "has space", "tab\there", "wild.*", "wild.>", "a..b", "x" * rng.choice([300, 5000, 70_000]),
            "_INBOX.fuzz", "é", "\u0000", "ok-id", 7, None, [], {}, 1e308, True,
        ]
    )  # fmt: skip


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.random()
    if kind < 0.05 and depth < 2:
        return "[" * rng.choice([20, 1000])  # deep or broken nesting, inserted raw below
    if kind < 0.5:
        return _string(rng)
    if kind < 0.8:
        return rng.choice([0, -1, 1, 3, 2**31, 2**63, -(2**70), 0.5, -0.0])
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


FIELDS = [
    "program_id", "call_id", "reply_to", "prompt", "messages", "max_tokens", "temperature", "parents",
    "resume_token_ids", "attempt", "engine_id", "priority", "service_s", "queue_wait_s", "prompt_tokens",
    "output_tokens", "finish_reason", "state", "backend", "model", "interval_s", "stream", "ack",
]  # fmt: skip


def _valid_submit(rng: random.Random, inbox: str) -> dict[str, object]:
    return {"program_id": f"fz{rng.randint(0, 20)}", "prompt": "fuzz", "max_tokens": rng.randint(1, 6),
            "reply_to": inbox, "parents": rng.choice([None, [], ["x"]])}  # fmt: skip


def _message(rng: random.Random, subjects: list[str], inbox: str, engine_id: str) -> tuple[str, bytes]:
    subject = rng.choice(subjects)
    r = rng.random()
    if r < 0.1:
        return subject, bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    if r < 0.15:
        return subject, b'{"a": ' + b"[" * rng.choice([17, 1000, 50_000]) + b"]" * 10 + b"}"
    if r < 0.35:
        base: dict[str, object] = _valid_submit(rng, inbox)
    elif r < 0.45:  # a heartbeat: a fake engine that expires at once, or the real one's id in odd states
        base = {"engine_id": rng.choice(["fake-engine", engine_id, "a.b", "x" * 200]), "backend": "sim",
                "model": "m", "state": rng.choice(["up", "draining", "down", "sideways"]),
                "interval_s": rng.choice([0.01, 0.05, -1.0, 1e9])}  # fmt: skip
        subject = rng.choice([subject, subjects[7]])
    else:
        base = {}
    for name in rng.sample(FIELDS, rng.randint(1, 5)):
        base[name] = _value(rng)
    text = json.dumps(base)
    if rng.random() < 0.05:
        text = text[: rng.randint(0, len(text))]  # truncated JSON
    return subject, text.encode()


async def test_fuzz_every_subject_then_mesh_serves(mesh: Mesh) -> None:
    rng = random.Random(SEED)
    s = Subjects(mesh.root)
    engine_id = mesh.engines[0].engine_id
    subjects = [
        s.call_submit, s.call_abort, s.call_handback, s.program_end, s.tracker_table, s.program_service,
        s.engine_calls(engine_id), s.engine_heartbeat, s.call_dispatched, s.call_completed,
        s.call_dispatched_for("x"), s.call_completed_for("x"),
    ]  # fmt: skip
    nc = await nats.connect(mesh.url, max_reconnect_attempts=0)
    replies = 0

    async def count(msg: object) -> None:
        nonlocal replies
        replies += 1

    inbox = nc.new_inbox()
    await nc.subscribe(inbox + ".>", cb=count)
    await nc.subscribe(inbox, cb=count)
    t0 = time.monotonic()
    try:
        for i in range(MESSAGES):
            subject, payload = _message(rng, subjects, inbox, engine_id)
            await nc.publish(subject, payload, reply=inbox if i % 3 == 0 else "")
            if i % 200 == 0:
                await nc.flush()
        await nc.flush()
    finally:
        await nc.close()
    assert time.monotonic() - t0 < 30
    await asyncio.sleep(0.5)
    for service in [mesh.tracker, mesh.scheduler, *mesh.engines]:
        assert service._nc is not None and service._nc.is_connected, service.name
        assert service.health.ok, (service.name, service.health.reason)
    assert all(not t.done() for t in mesh.engines[0]._tasks)
    assert replies > 100  # rejections with a reply subject were answered
    result = await asyncio.wait_for(mesh.client.program("after-fuzz").call("still there?", max_tokens=3), 30)
    assert result.output_tokens == 3
