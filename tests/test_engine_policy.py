"""The engine announces its queues' policy in its heartbeat; a scheduler of another policy routes
nothing to it (and says so once), instead of a silent mismatch."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from meshkit import start_mesh, stop_mesh

from autellix.engine.core import CoreConfig
from autellix.engine.factory import BackendSpec
from autellix.proto import CallFinal, EngineHeartbeat, StampedCall, Subjects, decode, decode_reply, encode
from autellix.services.engine.config import EngineConfig
from autellix.services.engine.service import EngineService
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.core import SchedulerCore


def heartbeat(engine_id: str, policy: str, state: str = "up") -> EngineHeartbeat:
    return EngineHeartbeat(engine_id=engine_id, backend="sim", model="m", state=state, policy=policy)  # type: ignore[arg-type]


def test_a_scheduler_refuses_an_engine_of_another_policy() -> None:
    core = SchedulerCore(policy="plas")
    assert core.on_heartbeat(heartbeat("fifo", "fcfs"), 0.0) is True  # first heard: said once
    assert core.on_heartbeat(heartbeat("fifo", "fcfs"), 0.5) is False
    assert core.live_engines(0.5) == [] and core.refused == {"fifo": "fcfs"}
    request = core.parse(b'{"program_id": "p", "prompt": "x"}', "_INBOX.r")
    assert core.route(request, 0.5) is None
    # an engine of the same policy, and an older one that does not say its policy, are taken
    assert core.on_heartbeat(heartbeat("same", "plas"), 0.5) is False
    assert core.on_heartbeat(heartbeat("old", ""), 0.5) is False
    assert {v.heartbeat.engine_id for v in core.live_engines(0.5)} == {"same", "old"}
    for _ in range(8):
        assert core.route(request, 0.5) in ("same", "old")


def test_an_engine_that_changes_policy_is_dropped_with_its_calls() -> None:
    core = SchedulerCore(policy="atlas")
    core.on_heartbeat(heartbeat("e1", "atlas"), 0.0)
    request = core.parse(b'{"program_id": "p", "prompt": "x"}', "_INBOX.r")
    stamped = core.stamp(request, "_INBOX.r", 0.0)
    assert core.route(stamped, 0.0) == "e1"
    core.on_routed(stamped, "e1")
    assert core.active_by_program == {"p": 1}
    assert core.on_heartbeat(heartbeat("e1", "plas"), 1.0) is True  # restarted with another policy
    assert core.live_engines(1.0) == [] and core.routed == {} and core.active_by_program == {}
    core.on_heartbeat(heartbeat("e1", "plas", state="down"), 2.0)
    assert core.refused == {}
    assert core.on_heartbeat(heartbeat("e1", "plas"), 3.0) is True  # back again: said again


async def test_the_mesh_routes_only_to_engines_of_its_policy(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=1, policy="plas")
    fifo = EngineService(
        EngineConfig(
            nats=NatsConfig.at(nats_url, root),
            engine_id=f"fifo-{root}",
            backend=BackendSpec(name="sim", sim_time_scale=0.05),
            heartbeat_s=0.2,
            core=CoreConfig(policy="fcfs"),
        )
    )
    nc = await nats.connect(nats_url)
    try:
        subjects = Subjects(root)
        beats = await nc.subscribe(subjects.engine_heartbeat)
        await fifo.start()
        deadline = time.monotonic() + 10
        while fifo.engine_id not in mesh.scheduler.core.refused:
            assert time.monotonic() < deadline, "the scheduler never heard the fcfs engine"
            await asyncio.sleep(0.02)
        policies = {}
        while len(policies) < 2:
            hb = decode((await beats.next_msg(timeout=5)).data, EngineHeartbeat)
            policies[hb.engine_id] = hb.policy
        assert policies == {mesh.engines[0].engine_id: "plas", fifo.engine_id: "fcfs"}
        # new programs go to the least-used engine: with the fcfs one refused, all go to the plas one
        results = await asyncio.gather(*(mesh.client.program().call(f"p{i}", max_tokens=3) for i in range(6)))
        assert {r.engine_id for r in results} == {mesh.engines[0].engine_id}
        # a stamp of another policy published straight to the fcfs engine (an older scheduler's) is still served
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        stamped = StampedCall(call_id="direct", program_id="d", reply_to=inbox, prompt="x", max_tokens=2, policy="plas")
        await nc.publish(subjects.engine_calls(fifo.engine_id), encode(stamped))
        while not isinstance(reply := decode_reply((await replies.next_msg(timeout=10)).data), CallFinal):
            pass
        assert reply.engine_id == fifo.engine_id and reply.output_tokens == 2
    finally:
        await nc.close()
        await fifo.stop()
        await stop_mesh(mesh)


@pytest.mark.parametrize("policy", ["fcfs", "atlas"])
async def test_the_engines_heartbeat_says_its_policy(nats_url: str, root: str, policy: str) -> None:
    mesh = await start_mesh(nats_url, root, engines=1, policy=policy)
    try:
        assert mesh.scheduler.core.refused == {}
        view = mesh.scheduler.core.engines[mesh.engines[0].engine_id]
        assert view.heartbeat.policy == policy
    finally:
        await stop_mesh(mesh)
