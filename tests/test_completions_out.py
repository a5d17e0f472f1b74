"""Completed events reach the tracker once, with or without a JetStream stream to capture them."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats

from autellix.proto import CallCompleted, Subjects
from autellix.services.client import Client


async def _count_completions(url: str, root: str, calls: int, wait_s: float) -> tuple[Counter[str], bool | None]:
    from autellix.bench.live import start_local_mesh

    mesh = await start_local_mesh(url, "fcfs", 1, 0.02, root=root)  # its tracker keeps no stream
    watcher = await nats.connect(url)
    seen: Counter[str] = Counter()
    try:
        subjects = Subjects(root)

        async def on_event(msg: nats.aio.msg.Msg) -> None:
            import msgspec

            seen[msgspec.json.decode(msg.data, type=CallCompleted).call_id] += 1

        await watcher.subscribe(subjects.any_slot(subjects.call_completed), cb=on_event)
        await watcher.flush()
        client = await Client.connect(url, root=root, timeout_s=30)
        try:
            program = client.program("once")
            for i in range(calls):
                await program.call(f"call {i}", max_tokens=4)
        finally:
            await client.close()
        await asyncio.sleep(wait_s)  # a blind retry would publish again every ~2.25 s
        outbox = mesh.engines[0]._outbox
        return seen, getattr(outbox, "stream_exists", None)
    finally:
        await watcher.close()
        await mesh.stop()


async def test_without_a_stream_each_completed_event_is_published_once(nats_url: str, root: str) -> None:
    seen, stream_exists = await _count_completions(nats_url, root, calls=3, wait_s=5.0)
    assert len(seen) == 3
    assert set(seen.values()) == {1}, seen
    assert stream_exists is False
