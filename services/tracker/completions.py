"""Completed events through JetStream: a tracker that was down counts every completion once.

Engines publish one completed event per call on ``<root>.events.call.completed`` (core NATS, so the
schedulers read it at once) with a ``Nats-Msg-Id`` header of call id, attempt and finish reason. A
work-queue stream captures that subject, dropping duplicates within its window, and the trackers read
it through one durable consumer (a deliver group when several trackers share the work), acknowledging
each event after applying it. So events published while every tracker was down (restarting, or cut
off with the broker) wait in the stream and are applied when a tracker comes back, and an event
redelivered after a crash between apply and acknowledgement is recognised by the process table (a
call's service is counted once, by call id). Without JetStream the tracker falls back to a plain
subscription (and says so).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from autellix.proto import Subjects

from .store import jetstream_not_ready

JETSTREAM_ERRORS = (nats.js.errors.Error, nats.errors.Error)

#: the tracker's durable consumer (and deliver group) on the completions stream
DURABLE = "trackers"
#: completions older than this are dropped from the stream, applied or not
MAX_AGE_S = 3600.0
#: publishes of the same completion (same call, attempt and outcome) within this window count once
DUPLICATE_WINDOW_S = 120.0
#: an event delivered to a tracker that crashed before acknowledging it goes to another after this
#: long (applying one takes microseconds, so a short wait costs nothing)
ACK_WAIT_S = 3.0
#: a bound on what waits while no tracker reads (then the oldest go)
MAX_MSGS = 1_000_000


def stream_name(root: str) -> str:
    """A JetStream stream name for the deployment root (no dots, spaces or wildcards allowed)."""
    return "AUTELLIX_COMPLETED_" + re.sub(r"[^A-Za-z0-9_-]", "_", root)


def message_id(call_id: str, attempt: int, finish_reason: str) -> str:
    """The ``Nats-Msg-Id`` of a completed event: one per call, attempt and outcome."""
    return f"{call_id}:{attempt}:{finish_reason}"


async def subscribe_completions(
    nc: NATS, subjects: Subjects, cb: Callable[[Msg], Awaitable[None]], replicas: int = 1
) -> Subscription:
    """Create (or update) the stream and bind the trackers' durable consumer; ``cb`` must ack."""
    js = nc.jetstream()
    config = StreamConfig(
        name=stream_name(subjects.root),
        subjects=[subjects.call_completed],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=MAX_AGE_S,
        max_msgs=MAX_MSGS,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )
    for _ in range(60):  # a cluster may still be placing its peers
        try:
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if getattr(exc, "err_code", None) == 10005:
                    raise
                await js.update_stream(config)  # exists with another configuration: bring it up to date
            break
        except JETSTREAM_ERRORS as exc:
            if not jetstream_not_ready(exc):
                raise
            await asyncio.sleep(0.25)
    return await js.subscribe(
        subjects.call_completed,
        queue=DURABLE,
        durable=DURABLE,
        stream=config.name,
        cb=cb,
        manual_ack=True,
        config=ConsumerConfig(ack_wait=ACK_WAIT_S, max_ack_pending=10_000),
    )
