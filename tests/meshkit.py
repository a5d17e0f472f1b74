"""Helpers to run an in-process mesh (tracker, scheduler, engines) in tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from autellix.engine.backend import ModelBackend
from autellix.engine.factory import BackendSpec
from autellix.services.client import Client
from autellix.services.engine.config import EngineConfig
from autellix.services.engine.service import EngineService
from autellix.services.gateway.config import GatewayConfig
from autellix.services.gateway.service import GatewayService
from autellix.services.lifecycle import stop_all
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.scheduler.service import SchedulerService
from autellix.services.tracker.config import TrackerConfig
from autellix.services.tracker.service import TrackerService


@dataclass
class Mesh:
    url: str
    root: str
    tracker: TrackerService
    scheduler: SchedulerService
    engines: list[EngineService]
    client: Client
    extra: list[object] = field(default_factory=list)


async def start_mesh(
    url: str,
    root: str,
    engines: int = 1,
    backend: BackendSpec | None = None,
    policy: str = "plas",
    heartbeat_s: float = 0.2,
    no_engine_wait_s: float = 5.0,
    max_batched_tokens: int = 2048,
    backend_instance: ModelBackend | None = None,
    metrics: bool = False,
    role_urls: dict[str, str] | None = None,
    kv_replicas: int = 1,
    door: bool = False,
    scheduler_options: dict[str, Any] | None = None,
) -> Mesh:
    """``role_urls``: per role (tracker, scheduler, engine, client) the URL to connect with, for an
    authenticated broker; ``url`` for any role not named."""
    urls = role_urls or {}
    spec = backend or BackendSpec(name="sim", sim_time_scale=0.05)
    port = 0 if metrics else None  # Prometheus endpoints on free ports
    tracker = TrackerService(
        TrackerConfig(
            nats_url=urls.get("tracker", url),
            root=root,
            gc_interval_s=0.2,
            kv_replicas=kv_replicas,
            metrics_port=port,
        )
    )
    scheduler = SchedulerService(
        SchedulerConfig(
            nats_url=urls.get("scheduler", url),
            root=root,
            policy=policy,
            max_tokens_ceiling=512,
            no_engine_wait_s=no_engine_wait_s,
            metrics_port=port,
            door=door,
            **(scheduler_options or {}),
        )
    )
    engine_services = [
        EngineService(
            EngineConfig(
                nats_url=urls.get("engine", url),
                root=root,
                engine_id=f"e{i}-{root}",
                backend=spec,
                heartbeat_s=heartbeat_s,
                drain_timeout_s=5.0,
                max_batched_tokens=max_batched_tokens,
                policy=policy,
                metrics_port=port,
            ),
            backend=backend_instance,
        )
        for i in range(engines)
    ]
    for service in [tracker, scheduler, *engine_services]:
        await service.start()
    client = await Client.connect(urls.get("client", url), root=root, timeout_s=60)
    await wait_for_engines(scheduler, engines)
    return Mesh(url, root, tracker, scheduler, engine_services, client)


async def start_gateway(mesh: Mesh, **config: Any) -> GatewayService:
    """A gateway on a free port in front of the mesh, once it has heard the engines' heartbeats."""
    service = GatewayService(GatewayConfig(nats_url=mesh.url, root=mesh.root, host="127.0.0.1", port=0, **config))
    await service.start()
    deadline = time.monotonic() + 5
    while mesh.engines and not service.live.engines(time.time()):
        assert time.monotonic() < deadline, "the gateway saw no heartbeat"
        await asyncio.sleep(0.02)
    return service


async def wait_for_engines(scheduler: SchedulerService, n: int, timeout_s: float = 10.0) -> None:
    await scheduler.wait_for_engines(n, timeout_s)


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.client.close()
    await stop_all([mesh.scheduler, *mesh.engines, mesh.tracker])
