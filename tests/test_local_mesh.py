"""The one local-mesh helper (autellix up, the tests, the benches): broker identities, start order,
a failed or stopped start, and the stop that cleans up either way."""

from __future__ import annotations

import asyncio
import socket

import pytest
from meshkit import until

from autellix.engine.factory import BackendSpec
from autellix.services.engine.config import EngineConfig
from autellix.services.gateway.config import GatewayConfig
from autellix.services.local_mesh import LocalBroker, LocalMesh
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.tracker.config import TrackerConfig


def _mesh(nats: NatsConfig, engines: int = 1, scheduler_metrics_port: int | None = None) -> LocalMesh:
    spec = BackendSpec(name="sim", sim_time_scale=0)
    return LocalMesh.of(
        tracker=TrackerConfig(nats=nats, persist=False),
        scheduler=SchedulerConfig(nats=nats, metrics_port=scheduler_metrics_port),
        engines=[EngineConfig(nats=nats, engine_id=f"e{i}", backend=spec, heartbeat_s=0.2) for i in range(engines)],
        gateway=GatewayConfig(nats=nats, host="127.0.0.1", port=0),
    )


async def test_a_mesh_on_an_authenticated_broker_serves_a_call() -> None:
    with LocalBroker(auth=True, root="lm") as broker:
        assert broker.url_for("engine") != broker.url  # each role its own identity
        spec = BackendSpec(name="sim", sim_time_scale=0)
        mesh = LocalMesh.of(
            tracker=TrackerConfig(nats=broker.nats_for("tracker"), persist=False),
            scheduler=SchedulerConfig(nats=broker.nats_for("scheduler")),
            engines=[EngineConfig(nats=broker.nats_for("engine"), engine_id=f"e{i}", backend=spec) for i in range(2)],
        )
        async with mesh:
            assert mesh.root == "lm" and mesh.started == mesh.services
            from autellix.services.client import Client

            async with await Client.connect(nats=broker.nats_for("client")) as client:
                result = await client.program().call("hello", max_tokens=3)
            assert result.output_tokens == 3
        assert not mesh.started


async def test_a_taken_port_names_the_service_and_stop_cleans_up(nats_url: str, root: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mesh = _mesh(NatsConfig.at(nats_url, root), scheduler_metrics_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            await mesh.start(engines_within_s=None)
        assert [s.name for s in mesh.not_started()] == ["scheduler", "gateway", "engine"]
        await mesh.stop()
    assert mesh.tracker._nc is not None and mesh.tracker._nc.is_closed
    assert mesh.scheduler._nc is not None and mesh.scheduler._nc.is_closed  # its half start undone


async def test_a_stop_before_the_start_ends_stops_at_once(root: str) -> None:
    stop = asyncio.Event()
    stop.set()
    mesh = _mesh(NatsConfig.at("nats://127.0.0.1:1", root))  # nothing listens: the tracker never connects
    assert await asyncio.wait_for(mesh.start(stop), 10) is False
    await asyncio.wait_for(mesh.stop(), 30)


async def test_tracker_shards_split_the_programs(nats_url: str, root: str) -> None:
    nats = NatsConfig.at(nats_url, root)
    mesh = LocalMesh.of(
        tracker=TrackerConfig(nats=nats, persist=False, metrics_port=None),
        scheduler=SchedulerConfig(nats=nats),
        engines=[EngineConfig(nats=nats, engine_id="e0", backend=BackendSpec(name="sim", sim_time_scale=0))],
        tracker_shards=2,
    )
    assert [(t.config.shards, t.config.shard_index) for t in mesh.trackers] == [(2, 0), (2, 1)]
    async with mesh:
        from autellix.services.client import Client

        async with await Client.connect(nats=nats) as client:
            for i in range(6):
                await client.program(f"p{i}").call("hi", max_tokens=2)

        def owned() -> list[set[str]]:
            return [{s.program_id for s in t.table.summaries()} for t in mesh.trackers]

        await until(lambda: len(owned()[0] | owned()[1]) == 6)  # the completions reach their shards
        assert not owned()[0] & owned()[1]
    assert not mesh.started
