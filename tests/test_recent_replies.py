"""An engine sends its calls' endings again after a reconnect: a final written to a broker node that
died on the way is lost, and nothing else would tell its caller the call is over."""

from __future__ import annotations

import asyncio
import time

import nats
from meshkit import Mesh

from autellix.proto import CallFinal, decode_reply
from autellix.services.engine.recent_replies import RecentReplies


def test_replies_of_the_window_before_a_disconnect_and_since_go_again() -> None:
    replies = RecentReplies(window_s=10.0, max_kept=100)
    replies.sent(0.0, "a", b"old")
    replies.sent(95.0, "b", b"before")
    replies.disconnected(100.0)
    replies.sent(101.0, "c", b"during")  # buffered while disconnected: may be lost too
    replies.sent(130.0, "d", b"long after")  # kept however long the outage lasts
    assert replies.reconnected(131.0) == [("b", b"before"), ("c", b"during"), ("d", b"long after")]
    assert replies.reconnected(132.0) == []  # no disconnect since: nothing to send again
    assert len(replies) == 1  # the window before now is all that stays


def test_no_disconnect_nothing_again_and_the_kept_stay_bounded() -> None:
    replies = RecentReplies(window_s=10.0, max_kept=3)
    for i in range(5):
        replies.sent(float(i), f"s{i}", b"x")
    assert replies.reconnected(5.0) == []
    replies.disconnected(5.0)
    replies.disconnected(6.0)  # the first disconnect of an outage counts
    assert [s for s, _ in replies.reconnected(7.0)] == ["s2", "s3", "s4"]


async def test_the_engine_sends_a_final_again_when_its_connection_comes_back(mesh: Mesh, nats_url: str) -> None:
    engine = mesh.engines[0]
    result = await mesh.client.program("again").call("hello", max_tokens=4)
    watcher = await nats.connect(nats_url)
    seen: list[CallFinal] = []
    try:
        sub = await watcher.subscribe(">")
        await watcher.flush()
        engine._replies.disconnected(time.time() - 1.0)  # as the connection's callbacks would
        engine._on_reconnected()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            try:
                reply = decode_reply(msg.data)
            except Exception:
                continue  # heartbeats and the like
            if isinstance(reply, CallFinal) and reply.call_id == result.final.call_id:
                seen.append(reply)
        await asyncio.sleep(0)
    finally:
        await watcher.close()
    assert seen and seen[0].output_tokens == result.final.output_tokens
