"""Sharded trackers: each program's service is counted once, by the shard that owns its slot."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable

import eventkit
import nats
import pytest

from autellix.engine.factory import BackendSpec
from autellix.proto import (
    PROGRAM_SLOTS,
    CallCompleted,
    CallDispatched,
    Subjects,
    TrackerShard,
    encode,
    program_slot,
)
from autellix.proto.messages import completed_message_id
from autellix.services.client import Client
from autellix.services.engine.config import EngineConfig
from autellix.services.engine.service import EngineService
from autellix.services.lifecycle import stop_all
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.scheduler.service import SchedulerService
from autellix.services.tracker.config import TrackerConfig
from autellix.services.tracker.service import TrackerService


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def test_slots_are_stable_and_shards_partition_them() -> None:
    assert program_slot("prog-1") == zlib.crc32(b"prog-1") % PROGRAM_SLOTS  # any language can compute it
    for count in (1, 2, 3, 7):
        owned = [set(TrackerShard(i, count).slots()) for i in range(count)]
        assert set().union(*owned) == set(range(PROGRAM_SLOTS))
        assert sum(map(len, owned)) == PROGRAM_SLOTS  # disjoint
    ids = [f"p{i}" for i in range(1000)]
    share = sum(TrackerShard(0, 2).owns(p) for p in ids) / len(ids)
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError):
        TrackerShard(2, 2)
    with pytest.raises(ValueError):
        TrackerShard(0, PROGRAM_SLOTS + 1)


async def _start_shards(url: str, root: str, n: int, persist: bool = True) -> list[TrackerService]:
    trackers = [
        TrackerService(
            TrackerConfig(nats=NatsConfig.at(url, root), gc_interval_s=0.2, persist=persist, shards=n, shard_index=i)
        )
        for i in range(n)
    ]
    for t in trackers:
        await t.start()
    return trackers


@pytest.mark.parametrize("persist", [True, False])
async def test_two_shards_count_each_program_once_by_its_owner(nats_url: str, root: str, persist: bool) -> None:
    trackers = await _start_shards(nats_url, root, 2, persist)
    s = Subjects(root)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    programs = [f"prog-{i}" for i in range(60)]
    try:
        for n in range(3):
            for pid in programs:
                call_id = f"{pid}-c{n}"
                dispatched = CallDispatched(call_id=call_id, program_id=pid, engine_id="e0", priority=0.0)
                completed = _completed(pid, call_id, 0.25)
                headers = {"Nats-Msg-Id": completed_message_id(completed)}
                if n == 2 and pid in programs[:10]:  # an older publisher: the unslotted subjects
                    await nc.publish(s.call_dispatched, encode(dispatched))
                    subject = s.call_completed
                else:
                    await nc.publish(s.call_dispatched_for(pid), encode(dispatched))
                    subject = s.call_completed_for(pid)
                if persist:
                    await js.publish(subject, encode(completed), headers=headers)
                else:
                    await nc.publish(subject, encode(completed), headers=headers)
        await nc.flush()

        def counted() -> int:
            return sum(
                e.account.calls_completed for t in trackers for pid in programs if (e := t.table.get(pid)) is not None
            )

        await _until(lambda: counted() >= 3 * len(programs))
        await asyncio.sleep(0.3)  # nothing more arrives (a duplicate would show now)
        for pid in programs:
            holders = [t for t in trackers if t.table.get(pid) is not None]
            assert len(holders) == 1, pid
            (holder,) = holders
            assert holder.shard.owns(pid)
            entry = holder.table.get(pid)
            assert entry is not None
            assert entry.account.calls_completed == 3
            assert entry.account.service_s == pytest.approx(0.75)
            assert not entry.active_calls  # every dispatch reached the owner too
        assert all(len(t.table) > 10 for t in trackers)  # both shards hold programs

        async with await Client.connect(nats_url, root=root) as client:
            table = await client.table()
            assert table.shards == 2
            assert sorted(r.program_id for r in table.programs) == sorted(programs)
            pid = next(p for p in programs if trackers[1].shard.owns(p))
            ended = await client.end_program(pid)
            assert ended.ok is True and ended.program is not None and ended.program.calls_completed == 3
            assert trackers[1].table.get(pid) is None
            again = await client.end_program(pid)
            assert again.ok is False and again.code == "unknown_program"
    finally:
        await nc.close()
        await stop_all(trackers)


def _completed(pid: str, call_id: str, service_s: float = 0.5) -> CallCompleted:
    """A finished call, as engine e0 publishes it."""
    return eventkit.completed(pid, call_id, service_s, engine_id="e0", prompt_tokens=10, output_tokens=5)


async def test_a_restarted_shard_restores_only_its_programs(nats_url: str, root: str) -> None:
    trackers = await _start_shards(nats_url, root, 1)
    s = Subjects(root)
    nc = await nats.connect(nats_url)
    programs = [f"q-{i}" for i in range(40)]
    try:
        for pid in programs:
            await nc.jetstream().publish(s.call_completed_for(pid), encode(_completed(pid, f"{pid}-c")))
        await _until(lambda: len(trackers[0].table) == len(programs))
        await stop_all(trackers)  # its records are written at stop
        trackers = await _start_shards(nats_url, root, 2)  # resharded: each loads its own from the bucket
        for t in trackers:
            assert all(t.shard.owns(pid) for pid in t.table.program_ids())
        assert sorted(pid for t in trackers for pid in t.table.program_ids()) == sorted(programs)
        pid = next(p for p in programs if trackers[1].shard.owns(p))
        await nc.jetstream().publish(s.call_completed_for(pid), encode(_completed(pid, f"{pid}-c2")))
        await _until(lambda: (e := trackers[1].table.get(pid)) is not None and e.account.calls_completed == 2)
    finally:
        await nc.close()
        await stop_all(trackers)


async def test_calls_through_a_mesh_with_two_tracker_shards(nats_url: str, root: str) -> None:
    trackers = await _start_shards(nats_url, root, 2)
    scheduler = SchedulerService(SchedulerConfig(nats=NatsConfig.at(nats_url, root), max_tokens_ceiling=512))
    engine = EngineService(
        EngineConfig(
            nats=NatsConfig.at(nats_url, root),
            engine_id=f"e0-{root}",
            backend=BackendSpec(name="sim", sim_time_scale=0.05),
            heartbeat_s=0.2,
            drain_timeout_s=5.0,
        )
    )
    services = [*trackers, scheduler, engine]
    for service in [scheduler, engine]:
        await service.start()
    try:
        await scheduler.wait_for_engines(1, 10)
        async with await Client.connect(nats_url, root=root, timeout_s=60) as client:
            programs = [client.program(f"mesh-{i}") for i in range(12)]
            for _ in range(2):
                await asyncio.gather(*(p.call("a b c", max_tokens=4) for p in programs))

            def done() -> bool:
                rows = [t.table.get(p.program_id) for t in trackers for p in programs]
                return sum(r.account.calls_completed for r in rows if r is not None) == 2 * len(programs)

            await _until(done)
            # the tracker figures reached the scheduler: a program's next call is stamped with its service
            await _until(lambda: all(p.program_id in scheduler.core.programs for p in programs))
            table = await client.table()
            assert sorted(r.program_id for r in table.programs) == sorted(p.program_id for p in programs)
            assert all(r.calls_completed == 2 and r.active_calls == 0 for r in table.programs)
            for p in programs:
                assert (await p.end()).ok is True
    finally:
        await stop_all(services)
