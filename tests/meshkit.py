"""Helpers to run an in-process mesh (tracker, scheduler, engines) in tests, on the same
:class:`autellix.services.local_mesh.LocalMesh` that ``autellix up`` and the benches use."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autellix.engine.backend import ModelBackend
from autellix.engine.core import CoreConfig
from autellix.engine.factory import BackendSpec
from autellix.services.client import Client
from autellix.services.engine.config import EngineConfig
from autellix.services.gateway.config import GatewayConfig
from autellix.services.gateway.service import GatewayService
from autellix.services.local_mesh import LocalMesh
from autellix.services.nats_config import NatsConfig
from autellix.services.scheduler.config import SchedulerConfig
from autellix.services.tracker.config import TrackerConfig


@dataclass
class Mesh(LocalMesh):
    url: str = ""
    client: Client = field(default=None)  # type: ignore[assignment]  (set by start_mesh)
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

    def nats(role: str) -> NatsConfig:
        return NatsConfig.at(urls.get(role, url), root)

    spec = backend or BackendSpec(name="sim", sim_time_scale=0.05)
    port = 0 if metrics else None  # Prometheus endpoints on free ports
    local = LocalMesh.of(
        tracker=TrackerConfig(nats=nats("tracker"), gc_interval_s=0.2, kv_replicas=kv_replicas, metrics_port=port),
        scheduler=SchedulerConfig(
            nats=nats("scheduler"), policy=policy, max_tokens_ceiling=512, no_engine_wait_s=no_engine_wait_s,
            metrics_port=port, door=door, **(scheduler_options or {}),
        ),
        engines=[
            EngineConfig(
                nats=nats("engine"), engine_id=f"e{i}-{root}", backend=spec, heartbeat_s=heartbeat_s,
                drain_timeout_s=5.0, core=CoreConfig(max_batched_tokens=max_batched_tokens, policy=policy),
                metrics_port=port,
            )
            for i in range(engines)
        ],
        backends=[backend_instance] * engines,
    )
    mesh = Mesh(local.tracker, local.scheduler, local.engines, url=url)
    try:
        await mesh.start()
        mesh.client = await Client.connect(urls.get("client", url), root=root, timeout_s=60)
    except BaseException:
        await mesh.stop()
        raise
    return mesh


async def start_gateway(mesh: Mesh, **config: Any) -> GatewayService:
    """A gateway on a free port in front of the mesh, once it has heard the engines' heartbeats."""
    service = GatewayService(GatewayConfig(nats=NatsConfig.at(mesh.url, mesh.root), host="127.0.0.1", port=0, **config))
    await service.start()
    deadline = time.monotonic() + 5
    while mesh.engines and not service.live.engines(time.time()):
        assert time.monotonic() < deadline, "the gateway saw no heartbeat"
        await asyncio.sleep(0.02)
    return service


async def until(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait until ``predicate()`` is true, polling; TimeoutError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def gateway_chat(
    base: str, max_tokens: int, timeout_s: float = 20.0, check_alive: Callable[[], None] = lambda: None
) -> Any:
    """Once the gateway at ``base`` is ready (an engine's heartbeat heard), one OpenAI chat call
    ("hi") to its first model; the reply, as JSON. ``check_alive`` raises if what serves it died."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_alive()
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as reply:
                if reply.status == 200:
                    break
        except OSError:
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.1)
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as reply:
        model = json.load(reply)["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


async def wait_for_engines(scheduler: Any, n: int, timeout_s: float = 10.0) -> None:
    await scheduler.wait_for_engines(n, timeout_s)


async def stop_mesh(mesh: Mesh) -> None:
    if mesh.client is not None:
        await mesh.client.close()
    await mesh.stop()
