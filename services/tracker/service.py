"""The program-tracker service: a thin NATS shell around :class:`ProcessTable`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from autellix.proto import (
    CallCompleted,
    CallDispatched,
    EngineHeartbeat,
    ErrorCode,
    ProgramEnd,
    ProgramEndReply,
    ProgramService,
    ProgramTable,
    Subjects,
    TrackerShard,
    decode,
    encode,
)
from autellix.proto.limits import explain
from autellix.services.inbound import decode_or_drop
from autellix.services.lifecycle import Health
from autellix.services.log_throttle import LogThrottle
from autellix.services.logs import get_logger
from autellix.services.nats_config import config_for_log
from autellix.services.nats_conn import connect

from .completions import JETSTREAM_ERRORS, stream_name, subscribe_completions
from .config import TrackerConfig
from .engine_liveness import EngineLiveness
from .metrics import TrackerMetrics
from .process_table import ProcessTable
from .store import ProgramStore

#: ``code`` of a ``program.end`` reply for a program the tracker does not know
UNKNOWN_PROGRAM = "unknown_program"
#: program.end from an authenticated user that does not own the program
NOT_OWNER = "not_owner"


class TrackerService:
    name = "tracker"

    def __init__(self, config: TrackerConfig) -> None:
        self.config = config
        self.subjects = Subjects(config.nats.root)
        self.table = ProcessTable(idle_ttl_s=config.idle_ttl_s, active_call_max_s=config.active_call_max_s)
        #: the programs this tracker owns (all of them unless trackers are sharded)
        self.shard = TrackerShard(config.shard_index, config.shards)
        self.store = ProgramStore(self.table, config.nats.root, replicas=config.kv_replicas, owns=self.shard.owns)
        self.log = get_logger("tracker", shard=f"{self.shard.index}/{self.shard.count}")
        self._nc: NATS | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.metrics = TrackerMetrics(config.metrics_port, programs=lambda: len(self.table))
        self.health = Health(self.name)
        self.engines = EngineLiveness()
        self._throttle = LogThrottle()

    async def start(self) -> None:
        self.log.info("starting", config=config_for_log(self.config))
        nc = self._nc = await connect(self.config.nats, "autellix-tracker", on_closed=self._on_closed)
        if self.config.persist:
            restored = await self.store.open(nc)
            self.log.info(
                "process table loaded", programs=restored, bucket=self.store.bucket, persisted=self.store.enabled
            )
        s = self.subjects
        queue = self.shard.queue
        await self._subscribe_completions(nc)
        for subject in self._owned(s.call_dispatched):
            await nc.subscribe(subject, queue=queue, cb=self._on_dispatched)
        # program ends and table requests reach every shard: the owner answers, the others stay silent
        await nc.subscribe(s.program_end, queue=queue, cb=self._on_end)
        await nc.subscribe(f"{s.program_end}.*", queue=queue, cb=self._on_end)
        await nc.subscribe(s.tracker_table, queue=queue, cb=self._on_table)
        await nc.subscribe(s.engine_heartbeat, cb=self._on_heartbeat)
        await nc.flush()
        self._gc_task = asyncio.create_task(self._every(self.config.gc_interval_s, self._collect_idle))
        self._flush_task = asyncio.create_task(self._every(self.config.flush_interval_s, self._flush))
        self.metrics.endpoint.start()
        self.log.info("ready", root=self.config.nats.root)

    async def stop(self) -> None:
        # The loops end on their own at the stop event: cancelling one in the middle of a JetStream
        # write could leave it waiting for ever (seen), so cancellation is only the fallback.
        self._stopping.set()
        tasks = [t for t in (self._gc_task, self._flush_task) if t is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=10)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2)
        if self._nc is not None and not self._nc.is_closed:
            await self.store.flush()
            await self._nc.drain()
        self.metrics.endpoint.stop()
        self.log.info("stopped", programs=len(self.table))

    async def _subscribe_completions(self, nc: NATS) -> None:
        """Completed events through the durable JetStream consumer when the table is persisted (so a
        restarted tracker applies what it missed), else a plain subscription."""
        if self.store.enabled:
            try:
                await subscribe_completions(
                    nc, self.subjects, self._on_completed_durable, self.config.kv_replicas, self.shard
                )
                self.log.info("completed events: durable consumer", stream=stream_name(self.subjects.root))
                return
            except JETSTREAM_ERRORS as exc:
                self.log.warning("no durable consumer for completed events: a plain subscription", error=str(exc))
        for subject in self._owned(self.subjects.call_completed):
            await nc.subscribe(subject, queue=self.shard.queue, cb=self._on_completed_plain)

    def _owned(self, event_subject: str) -> list[str]:
        """The subjects of an event family this shard reads: its programs' slots, and (shard 0) the
        unslotted subject older publishers use, whose events for other shards it forwards."""
        if self.shard.count == 1:
            return [event_subject, self.subjects.any_slot(event_subject)]
        slots = [f"{event_subject}.{slot}" for slot in self.shard.slots()]
        return [event_subject, *slots] if self.shard.index == 0 else slots

    async def _foreign(self, msg: Msg, program_id: str, slotted: str, durable: bool = False) -> bool:
        """Whether the event belongs to another shard; if it came on the unslotted subject (an older
        publisher), it is forwarded to its program's slot first."""
        if self.shard.owns(program_id):
            return False
        assert self._nc is not None
        if msg.subject.count(".") == slotted.count(".") - 1:  # the unslotted subject
            msg_id = (msg.headers or {}).get("Nats-Msg-Id")
            headers = {"Nats-Msg-Id": f"{msg_id}:forwarded"} if msg_id else None
            if durable:  # acknowledged by the stream before the original is acknowledged
                await self._nc.jetstream().publish(slotted, msg.data, headers=headers)
            else:
                await self._nc.publish(slotted, msg.data, headers=headers)
        else:
            self._throttle.log(
                self.log,
                "an event of another shard's program dropped (trackers with different shard counts?)",
                subject=msg.subject,
            )
        return True

    async def _on_completed_plain(self, msg: Msg) -> None:
        await self._on_completed(msg, durable=False)

    async def _on_completed_durable(self, msg: Msg) -> None:
        """Apply now; acknowledge once the program's record holding it is written to the bucket. A
        tracker that crashes before that leaves the event unacknowledged, so the next one applies it
        on top of the record it loads, and a call already in that record is not counted again."""
        program_id = await self._on_completed(msg, durable=True)
        if program_id is None:
            await self._ack(msg)  # unreadable, or another shard's (forwarded): never useful here again
        else:
            self.store.hold_ack(program_id, lambda: self._ack(msg))

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except JETSTREAM_ERRORS as exc:
            self._throttle.log(self.log, "completed event not acknowledged (it will be redelivered)", error=str(exc))

    def _on_closed(self) -> None:
        if not self._stopping.is_set():
            self.health.fail("the NATS connection closed")

    async def _publish(self, subject: str, message: msgspec.Struct) -> None:
        assert self._nc is not None
        await self._nc.publish(subject, encode(message))

    async def _publish_ended(self, update: ProgramService) -> None:
        await self._publish(self.subjects.program_service, update)  # schedulers forget the program
        await self._publish(self.subjects.program_ended, update)  # engines free its contexts first

    async def _on_dispatched(self, msg: Msg) -> None:
        event = decode_or_drop(msg.data, CallDispatched, self.log, self._throttle, "call-dispatched event")
        if event is None:
            return
        if await self._foreign(msg, event.program_id, self.subjects.call_dispatched_for(event.program_id)):
            return
        self.table.on_dispatched(event, time.time())
        self.store.mark(event.program_id)

    async def _on_heartbeat(self, msg: Msg) -> None:
        heartbeat = decode_or_drop(msg.data, EngineHeartbeat, self.log, self._throttle, "heartbeat")
        if heartbeat is not None:
            self.engines.on_heartbeat(heartbeat, time.time())

    async def _on_completed(self, msg: Msg, durable: bool) -> str | None:
        """Apply a completed event; returns its program id (None for an unreadable event, or one of
        another shard's programs)."""
        event = decode_or_drop(msg.data, CallCompleted, self.log, self._throttle, "call-completed event")
        if event is None:
            return None
        if await self._foreign(msg, event.program_id, self.subjects.call_completed_for(event.program_id), durable):
            return None
        update = self.table.on_completed(event, time.time())
        self.store.mark(event.program_id)
        if update is None:
            return event.program_id
        self.log.debug(
            "program service updated",
            program_id=event.program_id,
            call_id=event.call_id,
            program_service_s=round(update.program_service_s, 6),
            critical_path_s=round(update.critical_path_s, 6),
        )
        await self._publish(self.subjects.program_service, update)
        return event.program_id

    async def _on_end(self, msg: Msg) -> None:
        """End a program. Replies with a :class:`ProgramEndReply`: ok with the program's final row,
        or not ok for a program the tracker does not know (never started, already ended or
        forgotten), another user's program or a malformed request; a request without a reply
        subject still ends the program."""

        async def respond(reply: ProgramEndReply) -> None:
            if msg.reply:
                await msg.respond(encode(reply))

        try:
            request = decode(msg.data, ProgramEnd)
        except msgspec.MsgspecError as exc:
            code = ErrorCode.BAD_FIELD if isinstance(exc, msgspec.ValidationError) else ErrorCode.BAD_JSON
            detail = explain(exc) if isinstance(exc, msgspec.DecodeError) else str(exc)
            if self.shard.index == 0:  # one answer, whatever the shard count
                await respond(ProgramEndReply(ok=False, code=code, error=f"bad request: {detail}"))
            return
        if not self.shard.owns(request.program_id):
            return  # its shard answers
        sender = self.subjects.sender(msg.subject, self.subjects.program_end)
        owner = self.table.owner(request.program_id)
        if sender and owner and sender != owner:  # an authenticated user ends only its own programs
            await respond(ProgramEndReply(ok=False, code=NOT_OWNER, error="the program belongs to another user"))
            return
        ended = self.table.end(request.program_id, time.time())
        if ended is None:
            unknown = f"unknown program {request.program_id[:80]!r}"
            await respond(ProgramEndReply(ok=False, code=UNKNOWN_PROGRAM, error=unknown))
            return
        summary, update = ended
        self.store.mark_deleted(request.program_id)
        self.metrics.on_ended(summary)
        self.log.info("program ended", program_id=request.program_id, program_service_s=summary.program_service_s)
        await self._publish_ended(update)
        await respond(ProgramEndReply(ok=True, program=summary))

    async def _on_table(self, msg: Msg) -> None:
        if not msg.reply:
            return
        table = ProgramTable(programs=self.table.summaries(), shard=self.shard.index, shards=self.shard.count)
        await msg.respond(encode(table))

    async def _every(self, interval_s: float, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` every ``interval_s`` until the service stops."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=interval_s)
            if self._stopping.is_set():
                return
            try:
                await work()
            except Exception:
                self._throttle.log(
                    self.log, "periodic tracker work failed; will retry", level="exception", work=work.__name__
                )

    async def _flush(self) -> None:
        await self.store.flush()

    async def _collect_idle(self) -> None:
        for engine_id in self.engines.gone(time.time()):
            changed = self.table.engine_gone(engine_id)
            for program_id in changed:
                self.store.mark(program_id)
            if changed:
                self.log.info("engine gone: its active calls dropped", engine_id=engine_id, programs=len(changed))
        for update in self.table.expire(time.time()):
            self.log.info("idle program forgotten", program_id=update.program_id)
            self.store.mark_deleted(update.program_id)
            self.metrics.on_expired(update)
            await self._publish_ended(update)
