"""The gateway service: one NATS connection (the Python client's) and uvicorn serving the app.

``start`` returns once the port is bound and the heartbeat subscription flushed; ``stop`` stops
taking connections, lets requests in flight finish (uvicorn's graceful shutdown, bounded), then
closes the connection. uvicorn runs inside our event loop and never installs signal handlers of its
own: SIGTERM reaches ``autellix``'s lifecycle, which calls ``stop`` like for every service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Generator

import uvicorn
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from autellix.proto import EngineHeartbeat
from autellix.services.client import Client
from autellix.services.inbound import decode_or_drop
from autellix.services.log_throttle import LogThrottle
from autellix.services.logs import get_logger
from autellix.services.nats_conn import connect

from .app import Gateway
from .config import GatewayConfig
from .live_models import LiveModels
from .metrics import GatewayMetrics


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals belong to autellix's lifecycle, which calls GatewayService.stop


class GatewayService:
    name = "gateway"

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.log = get_logger("gateway")
        self._throttle = LogThrottle()
        self.live = LiveModels()
        self.metrics = GatewayMetrics()
        self.gateway: Gateway | None = None
        self._nc: NATS | None = None
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None and self._server.servers, "the gateway is not started"
        sock = self._server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        self.log.info("starting", config=cfg.redacted())
        nc = self._nc = await connect(cfg.nats, "autellix-gateway")
        client = Client(nc, root=cfg.nats.root, timeout_s=cfg.call_timeout_s)
        await nc.subscribe(client.subjects.engine_heartbeat, cb=self._on_heartbeat)
        await nc.flush()
        self.gateway = Gateway(cfg, client, self.live, self.metrics)
        server = self._server = _Server(
            uvicorn.Config(
                self.gateway.app(),
                host=cfg.host,
                port=cfg.port,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_level="warning",
                timeout_graceful_shutdown=10,
            )
        )
        self._serving = asyncio.create_task(server.serve())
        while not server.started:
            if self._serving.done():  # bind failed (port taken): uvicorn logged why and "exited"
                with contextlib.suppress(SystemExit):
                    self._serving.result()
                await nc.drain()
                raise OSError(f"the gateway could not listen on {cfg.host}:{cfg.port}")
            await asyncio.sleep(0.01)
        self.log.info("ready", url=self.url)

    async def _on_heartbeat(self, msg: Msg) -> None:
        heartbeat = decode_or_drop(msg.data, EngineHeartbeat, self.log, self._throttle, "heartbeat")
        if heartbeat is not None:
            self.live.on_heartbeat(heartbeat, time.time())

    async def stop(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
        if self.gateway is not None:
            await self.gateway.drain()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self.log.info("stopped")
