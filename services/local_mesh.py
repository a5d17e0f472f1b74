"""A whole mesh on this machine: an embedded broker, and the services as tasks or as processes.

One helper for everything that brings a mesh up locally: ``autellix up``, the tests
(``tests/meshkit.py``) and the benches (``bench/live.py``, ``bench/cli.py``, the process benches).

- :class:`LocalBroker`: an embedded nats-server, or an N-node cluster, with (unless auth is off) one
  identity per role; :meth:`LocalBroker.nats_for` is the :class:`NatsConfig` a role connects with.
- :class:`LocalMesh`: tracker, scheduler, engines and an optional gateway in this process, started in
  order (the gateway before the engines, so it hears their first heartbeats), ready once the
  scheduler has heard every engine, and stopped in stages: the gateway stops taking requests,
  then the scheduler, then the engines drain in parallel (one drain timeout for the mesh), then the
  tracker: the path SIGTERM takes.
- :func:`spawn_service` / :func:`stop_process`: one service as an ``autellix <service>`` process, and
  its stop (SIGTERM, then SIGKILL past a timeout).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autellix.engine.backend import ModelBackend
from autellix.proto import DEFAULT_ROOT, Subjects

from .auth import Identity, make_identities, server_config, write_credentials
from .embedded_nats import EmbeddedNats, EmbeddedNatsCluster
from .engine.config import EngineConfig
from .engine.service import EngineService
from .gateway.config import GatewayConfig
from .gateway.service import GatewayService
from .lifecycle import start_in_order, stop_stages
from .nats_config import NatsConfig
from .scheduler.config import SchedulerConfig
from .scheduler.service import SchedulerService
from .tracker.config import TrackerConfig
from .tracker.service import TrackerService


class LocalBroker:
    """An embedded nats-server (``nodes`` > 1: a routed cluster, every node on a free port) on
    ``host``; with ``auth``, one identity per role under ``root`` (:mod:`autellix.services.auth`)."""

    def __init__(
        self, nodes: int = 1, host: str = "127.0.0.1", port: int = 0, auth: bool = False, root: str = DEFAULT_ROOT
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a broker needs at least one node, got {nodes}")
        self.root = root
        self.identities: dict[str, Identity] = make_identities() if auth else {}
        config = server_config(self.identities, Subjects(root)) if self.identities else ""
        self.server: EmbeddedNats | EmbeddedNatsCluster = (
            EmbeddedNatsCluster(nodes, host=host, config=config)
            if nodes > 1
            else EmbeddedNats(host=host, port=port, config=config)
        )
        self.nodes = nodes
        self.url = ""

    def start(self) -> str:
        """Start the server(s); the URL list (raises :class:`NatsServerError`)."""
        self.url = self.server.start()
        return self.url

    def url_for(self, role: str) -> str:
        """The URL ``role`` connects with (its user and password in it, with auth on)."""
        ident = self.identities.get(role)
        return ident.url(self.url) if ident is not None else self.url

    def nats_for(self, role: str) -> NatsConfig:
        return NatsConfig.at(self.url_for(role), self.root)

    def write_client_credentials(self, path: Path) -> Path | None:
        """The client identity's credentials file (None without auth)."""
        return write_credentials(path, self.url_for("client")) if self.identities else None

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalMesh:
    """Tracker, scheduler, engines (each with its model backend, or one made from its config) and an
    optional gateway, as asyncio tasks in this process."""

    tracker: TrackerService
    scheduler: SchedulerService
    engines: list[EngineService]
    gateway: GatewayService | None = None
    #: the other tracker shards, when the programs are split between several (``tracker`` is shard 0)
    more_trackers: list[TrackerService] = field(default_factory=list)
    started: list[Any] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        tracker: TrackerConfig,
        scheduler: SchedulerConfig,
        engines: Sequence[EngineConfig],
        gateway: GatewayConfig | None = None,
        backends: Sequence[ModelBackend | None] = (),
        tracker_shards: int = 1,
    ) -> LocalMesh:
        """``tracker_shards`` trackers, each owning its part of the programs (metrics on the first only)."""
        port = tracker.metrics_port
        shards = [
            replace(tracker, shards=tracker_shards, shard_index=i, metrics_port=port if i == 0 else None)
            for i in range(tracker_shards)
        ]
        trackers = [TrackerService(t) for t in shards] if tracker_shards > 1 else [TrackerService(tracker)]
        return cls(
            trackers[0],
            SchedulerService(scheduler),
            [EngineService(e, backend=backends[i] if i < len(backends) else None) for i, e in enumerate(engines)],
            GatewayService(gateway) if gateway is not None else None,
            more_trackers=trackers[1:],
        )

    @property
    def trackers(self) -> list[TrackerService]:
        return [self.tracker, *self.more_trackers]

    @property
    def root(self) -> str:
        return self.tracker.config.nats.root

    @property
    def services(self) -> list[Any]:
        """In start order."""
        return [*self.trackers, self.scheduler, *([self.gateway] if self.gateway else []), *self.engines]

    async def start(self, stop: asyncio.Event | None = None, engines_within_s: float | None = 10.0) -> bool:
        """Start every service in order, then wait until the scheduler has heard every engine (unless
        ``engines_within_s`` is None). False when ``stop`` was set first; a failed start raises, as
        the service raised it (:meth:`not_started` names it). Either way, :meth:`stop` cleans up."""
        if not await start_in_order(self.services, stop or asyncio.Event(), self.started):
            return False
        if engines_within_s is not None and self.engines:
            await self.scheduler.wait_for_engines(len(self.engines), engines_within_s)
        return True

    async def stop(self) -> None:
        """Stop every service (one never started, or half started, stops at once), in stages."""
        gateway = [self.gateway] if self.gateway is not None else []
        await stop_stages([gateway, [self.scheduler], self.engines, self.trackers])
        self.started.clear()

    def not_started(self) -> list[Any]:
        """The services a failed or stopped :meth:`start` did not start, in start order."""
        return [s for s in self.services if s not in self.started]

    async def __aenter__(self) -> LocalMesh:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def spawn_service(
    command: str, nats: NatsConfig, *flags: str, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    """``autellix <command> --nats URL --root ROOT FLAGS...`` as a process (logs at warning)."""
    full_env = dict(os.environ, AUTELLIX_LOG_LEVEL="warning", **(env or {}))
    argv = [sys.executable, "-m", "autellix.services", command, "--nats", ",".join(nats.urls), "--root", nats.root]
    return subprocess.Popen(
        [*argv, *flags], stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, env=full_env
    )


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> None:
    """SIGTERM (the service drains), then SIGKILL if it is still there after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
