"""The scheduler service: a thin NATS shell around :class:`SchedulerCore`.

Several schedulers can run: they share the submission subject through a queue group, and each
keeps its own copy of the tracker's figures and the engines' heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from autellix.proto import (
    SCHEDULER_QUEUE,
    CallDispatched,
    CallError,
    CallRequest,
    EngineHeartbeat,
    ErrorCode,
    ProgramService,
    Subjects,
    decode,
    encode,
)
from autellix.services.logs import get_logger
from autellix.services.nats_conn import connect

from .config import SchedulerConfig
from .core import RejectedCall, SchedulerCore


class SchedulerService:
    name = "scheduler"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.root)
        self.core = SchedulerCore(
            policy=config.policy, max_tokens_ceiling=config.max_tokens_ceiling, balancer=config.balancer
        )
        self.log = get_logger("scheduler", scheduler_id=self.core.scheduler_id)
        self._nc: NATS | None = None
        self._engine_seen = asyncio.Event()
        self._waiting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.log.info("starting", config=dataclasses.asdict(self.config))
        nc = self._nc = await connect(self.config.nats_url, "autellix-scheduler")
        s = self.subjects
        await nc.subscribe(s.program_service, cb=self._on_service)
        await nc.subscribe(s.engine_heartbeat, cb=self._on_heartbeat)
        await nc.subscribe(s.call_submit, queue=SCHEDULER_QUEUE, cb=self._on_submit)
        await nc.flush()
        self.log.info("ready", policy=self.config.policy)

    async def stop(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return
        # drain: stop taking submissions, finish the ones in hand (including those waiting for an engine)
        if self._waiting:
            self.log.info("waiting for calls without an engine", calls=len(self._waiting))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._waiting, return_exceptions=True), timeout=5)
        await self._nc.drain()
        self.log.info("stopped")

    # -- inputs -----------------------------------------------------------------------------
    async def _on_service(self, msg: Msg) -> None:
        try:
            self.core.on_program_service(decode(msg.data, ProgramService))
        except msgspec.MsgspecError as exc:
            self.log.warning("bad program-service update dropped", error=str(exc))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, EngineHeartbeat)
        except msgspec.MsgspecError as exc:
            self.log.warning("bad heartbeat dropped", error=str(exc))
            return
        known = hb.engine_id in self.core.engines
        self.core.on_heartbeat(hb, time.time())
        if not known and hb.state == "up":
            self.log.info("engine joined", engine_id=hb.engine_id, backend=hb.backend, model=hb.model)
        self._engine_seen.set()
        self._engine_seen.clear()

    async def _on_submit(self, msg: Msg) -> None:
        now = time.time()
        try:
            request = self.core.parse(msg.data, msg.reply)
        except RejectedCall as rejected:
            await self._reject(rejected.error, rejected.reply_to)
            return
        reply_to = request.reply_to or msg.reply
        if not reply_to:
            self.log.warning("call without a reply subject dropped", call_id=request.call_id)
            return
        if not await self._dispatch(request, reply_to, now):
            task = asyncio.create_task(self._dispatch_when_engine(request, reply_to, now))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)

    async def _reject(self, error: CallError, reply_to: str) -> None:
        self.log.warning(
            "call rejected", call_id=error.call_id, program_id=error.program_id, code=error.code, reason=error.message
        )
        if reply_to and self._nc is not None:
            await self._nc.publish(reply_to, encode(error))

    async def _dispatch(self, request: CallRequest, reply_to: str, submitted: float) -> bool:
        assert self._nc is not None
        now = time.time()
        engine_id = self.core.route(request, now)
        if engine_id is None:
            return False
        stamped = self.core.stamp(request, reply_to, submitted)
        await self._nc.publish(self.subjects.engine_calls(engine_id), encode(stamped))
        await self._nc.publish(
            self.subjects.call_dispatched,
            encode(
                CallDispatched(
                    call_id=stamped.call_id,
                    program_id=stamped.program_id,
                    engine_id=engine_id,
                    priority=stamped.priority,
                    parents=stamped.parents,
                    dispatched_at=now,
                )
            ),
        )
        with structlog.contextvars.bound_contextvars(program_id=stamped.program_id, call_id=stamped.call_id):
            self.log.debug("call dispatched", engine_id=engine_id, priority=round(stamped.priority, 6))
        return True

    async def _dispatch_when_engine(self, request: CallRequest, reply_to: str, submitted: float) -> None:
        deadline = submitted + self.config.no_engine_wait_s
        self.log.info("no live engine: call waits", call_id=request.call_id, program_id=request.program_id)
        while (left := deadline - time.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._engine_seen.wait(), timeout=min(left, 0.5))
            if await self._dispatch(request, reply_to, submitted):
                return
        await self._reject(
            CallError(
                call_id=request.call_id,
                program_id=request.program_id,
                code=ErrorCode.NO_ENGINE,
                message=f"no engine was available within {self.config.no_engine_wait_s:g} s; try again later",
            ),
            reply_to,
        )
