"""The scheduler service: a thin NATS shell around :class:`SchedulerCore`.

Several schedulers can run: they share the submission subject through a queue group, and each
keeps its own copy of the tracker's figures and the engines' heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from autellix.policy.door import DoorConfig
from autellix.proto import (
    SCHEDULER_QUEUE,
    CallAbort,
    CallAccepted,
    CallCompleted,
    CallDispatched,
    CallError,
    CallRequest,
    CallRetry,
    EngineHeartbeat,
    ErrorCode,
    ProgramService,
    StampedCall,
    Subjects,
    encode,
)
from autellix.services.auth import inbox_prefix
from autellix.services.inbound import decode_or_drop
from autellix.services.lifecycle import Health
from autellix.services.log_throttle import LogThrottle
from autellix.services.logs import get_logger
from autellix.services.nats_config import config_for_log
from autellix.services.nats_conn import connect

from .config import SchedulerConfig
from .core import RejectedCall, SchedulerCore, call_tokens, estimate_prompt_tokens
from .door_gate import DoorFull, DoorGate
from .metrics import SchedulerMetrics


class SchedulerService:
    name = "scheduler"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.nats.root)
        self.core = SchedulerCore(
            policy=config.policy,
            max_tokens_ceiling=config.max_tokens_ceiling,
            balancer=config.balancer,
            call_deadline_s=config.call_deadline_s,
            max_calls_per_program=config.max_calls_per_program,
            tenant_half_life_s=config.tenant_half_life_s,
            max_calls_per_tenant=config.max_calls_per_tenant,
            max_tokens_per_tenant=config.max_tokens_per_tenant,
            tenant_users=config.tenant_users,
        )
        self.log = get_logger("scheduler", scheduler_id=self.core.scheduler_id)
        #: the door (issue 10): new programs wait while the engines' working set does not fit
        self.door: DoorGate | None = (
            DoorGate(
                DoorConfig(high_water=config.door_high_water, spill_gate=config.door_spill_gate),
                config.door_max_waiting,
            ) if config.door else None
        )
        self._nc: NATS | None = None
        #: engine id -> the subject its calls go to (built and checked once per engine)
        self._engine_subjects: dict[str, str] = {}
        self._engine_seen = asyncio.Event()
        self._waiting: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.metrics = SchedulerMetrics(config.metrics_port, waiting=lambda: len(self._waiting))
        self._throttle = LogThrottle()
        self.health = Health(self.name)
        self._stopping = False

    async def start(self) -> None:
        self.log.info("starting", config=config_for_log(self.config))
        nc = self._nc = await connect(
            self.config.nats,
            "autellix-scheduler",
            on_closed=self._on_closed,
            on_reconnected=lambda: self.core.on_reconnected(time.time()),
        )
        s = self.subjects
        await nc.subscribe(s.program_service, cb=self._on_service)
        await nc.subscribe(s.engine_heartbeat, cb=self._on_heartbeat)
        await nc.subscribe(s.call_completed, cb=self._on_completed)  # publishers older than the slots
        await nc.subscribe(s.any_slot(s.call_completed), cb=self._on_completed)
        await nc.subscribe(s.call_submit, queue=SCHEDULER_QUEUE, cb=self._on_submit)
        await nc.subscribe(f"{s.call_submit}.*", queue=SCHEDULER_QUEUE, cb=self._on_submit)
        await nc.subscribe(s.call_handback, queue=SCHEDULER_QUEUE, cb=self._on_handback)
        await nc.flush()
        self._watchdog = asyncio.create_task(self._watch_engines())
        self.metrics.endpoint.start()
        self._watchdog.add_done_callback(self._on_watchdog_done)
        self.log.info("ready", policy=self.config.policy, balancer=self.config.balancer)

    def _on_closed(self) -> None:
        if not self._stopping:
            self.health.fail("the NATS connection closed")

    def _on_watchdog_done(self, task: asyncio.Task[None]) -> None:
        if not self._stopping and not task.cancelled():
            self.health.fail(f"the engine watchdog ended: {task.exception()!r}")

    async def stop(self) -> None:
        self._stopping = True
        if self._nc is None or self._nc.is_closed:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        # drain: stop taking submissions, finish the ones in hand (including those waiting for an engine)
        if self._waiting:
            self.log.info("waiting for calls without an engine", calls=len(self._waiting))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._waiting, return_exceptions=True), timeout=5)
        await self._nc.drain()
        self.metrics.endpoint.stop()
        self.log.info("stopped")

    # -- inputs -----------------------------------------------------------------------------
    async def _on_service(self, msg: Msg) -> None:
        update = decode_or_drop(msg.data, ProgramService, self.log, self._throttle, "program-service update")
        if update is None:
            return
        self.core.on_program_service(update)
        if self.door is not None:
            self.door.on_program_service(update)
            if update.ended:
                await self._open_door()

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode_or_drop(msg.data, EngineHeartbeat, self.log, self._throttle, "heartbeat")
        if hb is None:
            return
        known = hb.engine_id in self.core.engines
        if self.core.on_heartbeat(hb, time.time()):
            self.log.warning(
                "engine refused: its queues serve another policy; nothing is routed to it",
                engine_id=hb.engine_id,
                engine_policy=hb.policy,
                policy=self.core.policy,
            )
        self.metrics.engines.set(self.core.live_count(time.time()))
        refused = hb.engine_id in self.core.refused
        if self.door is not None:
            if refused:
                self.door.forget_engine(hb.engine_id)
            else:
                self.door.on_heartbeat(hb)
            await self._open_door()
        if not known and not refused and hb.state == "up":
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
            self._throttle.log(self.log, "call without a reply subject dropped", call_id=request.call_id)
            return
        owner = self.subjects.sender(msg.subject, self.subjects.call_submit)
        if owner and not reply_to.startswith(inbox_prefix(owner) + "."):
            # an authenticated caller's stream goes to its own inboxes only, never into another's
            message = f"reply_to must be one of your inboxes ({inbox_prefix(owner)}.…), got {reply_to[:80]!r}"
            error = CallError(
                call_id=request.call_id, program_id=request.program_id, code=ErrorCode.BAD_FIELD, message=message
            )
            if msg.reply.startswith(inbox_prefix(owner) + "."):
                await self._reject(error, msg.reply)
            return
        prompt_tokens = estimate_prompt_tokens(request)
        tenant = self.core.tenant_of(request, owner)
        refusal = self.core.tenant_refusal(request, tenant, call_tokens(request, prompt_tokens))
        if refusal is not None:
            error = CallError(
                call_id=request.call_id, program_id=request.program_id, code=ErrorCode.RATE_LIMITED, message=refusal
            )
            await self._reject(error, reply_to)
            return
        if self.door is not None and not await self._through_door(request, reply_to, now, owner):
            return
        if await self._dispatch(request, reply_to, now, owner, prompt_tokens=prompt_tokens):
            return
        await self._wait_for_engine(request, reply_to, now, owner)

    async def _through_door(self, request: CallRequest, reply_to: str, now: float, owner: str) -> bool:
        """True when the call may be routed now; else it waits at the door (or was refused)."""
        assert self.door is not None and self._nc is not None
        try:
            if self.door.submit(request, reply_to, now, owner):
                return True
        except DoorFull as full:
            error = CallError(
                call_id=request.call_id, program_id=request.program_id, code=ErrorCode.RATE_LIMITED, message=str(full)
            )
            await self._reject(error, reply_to)
            return False
        await self._open_door()
        if request.ack and self.door.holds(request.program_id):
            # taken: it waits at the door (no engine yet), so the caller does not resubmit (one let in at
            # once was routed: its engine says so, and the caller is not woken before the engine works)
            accepted = CallAccepted(call_id=request.call_id, engine_id="", attempt=request.attempt)
            await self._nc.publish(reply_to, encode(accepted))
            self.log.debug("call waits at the door", call_id=request.call_id, program_id=request.program_id)
        return False

    async def _open_door(self) -> None:
        """Route the calls of the programs the door lets in now."""
        assert self.door is not None
        for held, wait_s in self.door.release(time.time()):
            self.log.info(
                "program let in", call_id=held.request.call_id, program_id=held.request.program_id,
                door_wait_s=round(wait_s, 3),
            )
            await self._dispatch_or_wait(
                held.request, held.reply_to, held.received_at, held.owner, door_wait_s=wait_s
            )

    async def _dispatch_or_wait(
        self, request: CallRequest, reply_to: str, now: float, owner: str, door_wait_s: float = 0.0
    ) -> None:
        if not await self._dispatch(request, reply_to, now, owner, door_wait_s):
            await self._wait_for_engine(request, reply_to, now, owner, door_wait_s)

    async def _wait_for_engine(
        self, request: CallRequest, reply_to: str, now: float, owner: str, door_wait_s: float = 0.0
    ) -> None:
        """No engine is live: the call waits for one (``no_engine`` after a while)."""
        self.log.info("no live engine: call waits", call_id=request.call_id, program_id=request.program_id)
        error = CallError(
            call_id=request.call_id,
            program_id=request.program_id,
            code=ErrorCode.NO_ENGINE,
            message=f"no engine was available within {self.config.no_engine_wait_s:g} s; try again later",
        )
        self.core.hold(request.call_id, self.core.tenant_of(request, owner), call_tokens(request))
        self._park(
            lambda: self._dispatch(request, reply_to, now, owner, door_wait_s),
            time.time() + self.config.no_engine_wait_s,
            error,
            reply_to,
            request.call_id,
        )

    async def _reject(self, error: CallError, reply_to: str) -> None:
        self.metrics.errors.labels(error.code).inc()
        self._throttle.log(
            self.log,
            "call rejected",
            key=f"rejected {error.code}",
            call_id=error.call_id,
            program_id=error.program_id,
            code=error.code,
            reason=error.message[:300],
        )
        if not reply_to:
            self._throttle.log(self.log, "rejected call had no reply subject", call_id=error.call_id)
        elif self._nc is not None:
            await self._nc.publish(reply_to, encode(error))

    async def _dispatch(
        self,
        request: CallRequest,
        reply_to: str,
        submitted: float,
        owner: str = "",
        door_wait_s: float = 0.0,
        prompt_tokens: int | None = None,
    ) -> bool:
        # the engine acknowledges the call (when the request asked) once it has it: a stamped call
        # lost on the way (the engine was reconnecting) then goes unacknowledged, and is resubmitted
        stamped = self.core.stamp(request, reply_to, submitted, owner)
        prefer = request.prefer_engine if request.attempt else ""
        return await self._send(stamped, door_wait_s, prefer, prompt_tokens) is not None

    async def _send(
        self, stamped: StampedCall, door_wait_s: float = 0.0, prefer: str = "", prompt_tokens: int | None = None
    ) -> str | None:
        """Route a stamped call to a live engine and announce it; None when no engine is live.
        ``prompt_tokens``: :func:`estimate_prompt_tokens` of the call, when already known."""
        assert self._nc is not None
        now = time.time()
        if prompt_tokens is None:
            prompt_tokens = estimate_prompt_tokens(stamped)
        engine_id = self.core.route(stamped, now, prefer, prompt_tokens)
        if engine_id is None:
            return None
        self.core.on_routed(stamped, engine_id, call_tokens(stamped, prompt_tokens))
        self.metrics.on_routed(engine_id)
        if self.door is not None:
            self.door.started(stamped.program_id)
        subject = self._engine_subjects.get(engine_id)
        if subject is None:
            if len(self._engine_subjects) >= 4096:  # engines come and go: keep the live ones' at most
                self._engine_subjects.clear()
            subject = self._engine_subjects[engine_id] = self.subjects.engine_calls(engine_id)
        await self._nc.publish(subject, encode(stamped))
        await self._nc.publish(
            self.subjects.call_dispatched_for(stamped.program_id),  # the program's slot: its tracker shard
            encode(
                CallDispatched(
                    call_id=stamped.call_id,
                    program_id=stamped.program_id,
                    engine_id=engine_id,
                    priority=stamped.priority,
                    parents=stamped.parents,
                    dispatched_at=now,
                    owner=stamped.owner,
                    door_wait_s=door_wait_s,
                    tenant=stamped.tenant,
                )
            ),
        )
        self.log.debug(
            "call dispatched", program_id=stamped.program_id, call_id=stamped.call_id, engine_id=engine_id,
            priority=stamped.priority,
        )
        return engine_id

    async def _on_completed(self, msg: Msg) -> None:
        event = decode_or_drop(msg.data, CallCompleted, self.log, self._throttle, "call-completed event")
        if event is None:
            return
        self.core.on_completed(event.call_id, event.engine_id, event.attempt)

    async def _on_handback(self, msg: Msg) -> None:
        """A draining engine could not finish a call: route it, with its tokens so far, elsewhere."""
        call = decode_or_drop(msg.data, StampedCall, self.log, self._throttle, "handed-back call")
        if call is None:
            return
        self.log.info(
            "call handed back", call_id=call.call_id, program_id=call.program_id, resume=len(call.resume_token_ids)
        )
        if await self._send(call) is not None:
            return

        async def send() -> bool:
            return await self._send(call) is not None

        error = CallError(
            call_id=call.call_id,
            program_id=call.program_id,
            code=ErrorCode.NO_ENGINE,
            message=(
                f"the call's engine stopped and no other engine was available within {self.config.no_engine_wait_s:g} s"
            ),
            attempt=call.attempt,
        )
        self.core.hold(call.call_id, call.tenant, call_tokens(call))
        self._park(send, time.time() + self.config.no_engine_wait_s, error, call.reply_to, call.call_id)

    async def wait_for_engines(self, n: int, timeout_s: float) -> None:
        """Return once at least ``n`` engines are live in this scheduler's view (woken by their
        heartbeats); TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (live := len(self.core.live_engines(time.time()))) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the scheduler saw {live} of {n} engines live within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._engine_seen.wait(), timeout=min(left, 0.5))

    async def _watch_engines(self) -> None:
        """Every 0.1 s: calls past their deadline, engines that stopped heartbeating. A round that
        fails (a publish refused while reconnecting) is logged and the next one goes on."""
        while True:
            await asyncio.sleep(0.1)
            try:
                await self._watch_once()
            except Exception as exc:
                self._throttle.log(self.log, "engine watchdog round failed", error=str(exc) or type(exc).__name__)

    async def _watch_once(self) -> None:
        assert self._nc is not None
        now = time.time()
        for engine_id, routed in self.core.expired(now):
            self._throttle.log(self.log, "call deadline exceeded", call_id=routed.call_id, engine_id=engine_id)
            error = CallError(
                call_id=routed.call_id,
                program_id=routed.program_id,
                code=ErrorCode.DEADLINE_EXCEEDED,
                message=f"the call did not finish within its deadline ({self.config.call_deadline_s:g} s at most)",
                attempt=routed.attempt,
            )
            await self._nc.publish(routed.reply_to, encode(error))
            abort = CallAbort(
                call_id=routed.call_id, reason="deadline exceeded", engine_id=engine_id, attempt=routed.attempt
            )
            await self._nc.publish(self.subjects.call_abort, encode(abort))
        for engine_id, orphans in self.core.dead_engines(now):
            self._throttle.log(self.log, "engine stopped heartbeating", engine_id=engine_id, calls=len(orphans))
            if self.door is not None:
                self.door.forget_engine(engine_id)
            for routed in orphans:
                retry = CallRetry(
                    call_id=routed.call_id,
                    attempt=routed.attempt,
                    reason=f"engine {engine_id} stopped responding; resubmit to resume the call",
                )
                await self._nc.publish(routed.reply_to, encode(retry))
                abort = CallAbort(
                    call_id=routed.call_id, reason="engine presumed dead", engine_id=engine_id, attempt=routed.attempt
                )
                await self._nc.publish(self.subjects.call_abort, encode(abort))

    def _park(
        self, attempt: Callable[[], Awaitable[bool]], deadline: float, error: CallError, reply_to: str, call_id: str
    ) -> None:
        """Retry ``attempt`` whenever an engine heartbeats, until it succeeds or ``deadline`` passes;
        then the caller gets ``error``. Runs as a task, so the subscription keeps serving. The call
        was held in its tenant's bounds (:meth:`SchedulerCore.hold`); it is let go either way."""

        async def wait() -> None:
            try:
                while (left := deadline - time.time()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._engine_seen.wait(), timeout=min(left, 0.5))
                    if await attempt():
                        return
                await self._reject(error, reply_to)
            finally:
                self.core.unhold(call_id)

        task = asyncio.create_task(wait())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)
