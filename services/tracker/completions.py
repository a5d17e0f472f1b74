"""Completed events through JetStream: a tracker that was down counts every completion once.

Engines publish one completed event per call on ``<root>.events.call.completed.<slot>`` (the program's
slot; core NATS, so the schedulers read it at once) with a ``Nats-Msg-Id`` header of engine, call, attempt and
finish reason. A work-queue stream captures those subjects (and the unslotted one of older engines),
dropping duplicates within its window, and the trackers read it through one durable consumer per shard,
filtered to the shard's slots (a deliver group when replicas of a shard share the work), acknowledging
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
from nats.js.api import ConsumerConfig, ConsumerInfo, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from autellix.proto import Subjects, TrackerShard

from .store import jetstream_not_ready

JETSTREAM_ERRORS = (nats.js.errors.Error, nats.errors.Error)

#: the tracker's durable consumer (and deliver group) on the completions stream; with several shards,
#: each has its own, ``trackers-<index>-of-<count>``, filtered to its slots
DURABLE = "trackers"
#: completions older than this are dropped from the stream, applied or not
MAX_AGE_S = 3600.0
#: publishes of the same completion (same engine, call, attempt and outcome) within this window count once
DUPLICATE_WINDOW_S = 120.0
#: an event delivered to a tracker that crashed before acknowledging it goes to another after this
#: long (applying one takes microseconds, so a short wait costs nothing)
ACK_WAIT_S = 3.0
#: a bound on what waits while no tracker reads (then the oldest go)
MAX_MSGS = 1_000_000


def stream_name(root: str) -> str:
    """A JetStream stream name for the deployment root (no dots, spaces or wildcards allowed)."""
    return "AUTELLIX_COMPLETED_" + re.sub(r"[^A-Za-z0-9_-]", "_", root)


def durable_name(shard: TrackerShard) -> str:
    return DURABLE if shard.count == 1 else shard.queue


def filter_subjects(subjects: Subjects, shard: TrackerShard) -> list[str]:
    """What a shard's consumer takes: its slots, and (shard 0) the unslotted subject of older publishers."""
    if shard.count == 1:
        return [subjects.call_completed, subjects.any_slot(subjects.call_completed)]
    slots = [f"{subjects.call_completed}.{slot}" for slot in shard.slots()]
    return [subjects.call_completed, *slots] if shard.index == 0 else slots


def _layout(name: str) -> int | None:
    """The shard count of a trackers' consumer name (None: not a trackers' consumer)."""
    if name == DURABLE:
        return 1
    match = re.fullmatch(rf"{DURABLE}-\d+-of-(\d+)", name)
    return int(match.group(1)) if match else None


async def _drop_other_layouts(js: JetStreamContext, stream: str, subjects: Subjects, shard: TrackerShard) -> None:
    """Delete the trackers' consumers of another shard count (a work-queue stream refuses overlapping
    consumers), and this shard's own when its filter is not this layout's. The events they had not
    acknowledged stay in the stream and go to this layout's consumers."""
    want = sorted(filter_subjects(subjects, shard))
    for info in await _consumers(js, stream):
        layout = _layout(info.name)
        if layout is None:
            continue
        config = info.config
        mine = info.name == durable_name(shard)
        have = sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
        if layout != shard.count or (mine and have != want):
            await js.delete_consumer(stream, info.name)


async def _consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    return list(await js.consumers_info(stream))


async def subscribe_completions(
    nc: NATS,
    subjects: Subjects,
    cb: Callable[[Msg], Awaitable[None]],
    replicas: int = 1,
    shard: TrackerShard | None = None,
) -> Subscription:
    """Create (or update) the stream and bind this shard's durable consumer; ``cb`` must ack."""
    shard = shard or TrackerShard()
    js = nc.jetstream()
    config = StreamConfig(
        name=stream_name(subjects.root),
        subjects=[subjects.call_completed, subjects.any_slot(subjects.call_completed)],
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
    await _drop_other_layouts(js, config.name or "", subjects, shard)
    durable = durable_name(shard)
    return await js.subscribe(
        subjects.call_completed,
        queue=durable,
        durable=durable,
        stream=config.name,
        cb=cb,
        manual_ack=True,
        config=ConsumerConfig(
            ack_wait=ACK_WAIT_S, max_ack_pending=10_000, filter_subjects=filter_subjects(subjects, shard)
        ),
    )
