"""The engine service: a thin NATS shell around :class:`EngineCore` and a model backend.

The model step runs in one worker thread, so heartbeats, new calls and aborts flow while it
computes. Everything that touches the core happens on the event loop between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from autellix.engine.backend import CacheStats, ModelBackend, PrefixCache
from autellix.engine.core import (
    CoreEvent,
    EngineCore,
    FinishEvent,
    TokenEvent,
    execute_plan,
)
from autellix.engine.factory import make_backend
from autellix.policy.door import SpillMeter
from autellix.proto import (
    CallAbort,
    CallAccepted,
    CallChunk,
    CallError,
    EngineHeartbeat,
    ErrorCode,
    FinishReason,
    ProgramService,
    StampedCall,
    Subjects,
    encode,
)
from autellix.services.inbound import decode_or_drop
from autellix.services.lifecycle import Health
from autellix.services.log_throttle import LogThrottle
from autellix.services.logs import get_logger
from autellix.services.nats_config import config_for_log
from autellix.services.nats_conn import connect

from .call_record import CallOutcome, InFlight, core_call
from .completions_out import CompletionOutbox
from .config import EngineConfig
from .metrics import EngineMetrics
from .recent_replies import RecentReplies

#: step-loop iterations failing in a row before the loop (and the service) gives up
MAX_STEP_FAILURES = 5


class EngineService:
    name = "engine"

    def __init__(self, config: EngineConfig, backend: ModelBackend | None = None) -> None:
        self.config = config
        self.subjects = Subjects(config.nats.root)
        self.log = get_logger("engine", engine_id=config.engine_id)
        self.backend = backend
        self.core: EngineCore | None = None
        self._nc: NATS | None = None
        self._calls_sub: Subscription | None = None
        self._inflight: dict[str, InFlight] = {}
        #: aborts that arrived mid-step: call id -> the newest attempt they apply to
        self._pending_aborts: dict[str, int] = {}
        #: pending aborts whose caller is not to be told (it already moved on to a newer attempt)
        self._silent_aborts: set[str] = set()
        #: newer attempts of calls held here that arrived mid-step: accepted after the step
        self._deferred: list[StampedCall] = []
        #: programs the tracker says ended, to tell the backend's prefix cache between steps
        self._ended_programs: list[str] = []
        #: the prefix cache's figures, read between steps (a heartbeat during a step sends the last)
        self._cache_stats = CacheStats()
        self._cache_stats_due = True
        self._stepping = False
        self._step_started = 0.0  # monotonic start of the step now running
        #: seconds spent in model steps, and the tier's spill share over them (the door's spill gate)
        self._busy_s = 0.0
        self._spill = SpillMeter()
        self._wake = asyncio.Event()
        #: set to heartbeat at once (the connection is back: schedulers route here only after one)
        self._beat_now = asyncio.Event()
        #: finals and errors of the last seconds, sent again after a reconnect (a dying node may have lost them)
        self._replies = RecentReplies()
        self._resends: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()  # set whenever no call is in flight
        self._stopping = False
        self._state = "up"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{config.engine_id}-step")
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = EngineMetrics(config.metrics_port)
        self._outbox: CompletionOutbox | None = None
        self.health = Health(self.name)
        self._throttle = LogThrottle()
        #: step-loop iterations in a row that raised; the loop gives up (and the service fails) after a few
        self._step_failures = 0
        #: policies of stamps that differ from this engine's, each logged once
        self._foreign_policies: set[str] = set()

    @property
    def stop_timeout_s(self) -> float:
        """The lifecycle's budget for :meth:`stop`: the drain and a grace for the hand-backs."""
        return self.config.drain_timeout_s + 10.0

    @property
    def engine_id(self) -> str:
        return self.config.engine_id

    async def start(self) -> None:
        cfg = self.config
        self.log.info("starting", config=config_for_log(cfg))
        if self.backend is None:
            t0 = time.perf_counter()
            self.backend = await asyncio.to_thread(make_backend, cfg.backend)
            self.log.info("model loaded", model=self.backend.model_name, load_s=round(time.perf_counter() - t0, 2))
        self.core = EngineCore(self.backend, cfg.core_config)
        nc = self._nc = await connect(
            cfg.nats,
            f"autellix-{cfg.engine_id}",
            on_closed=self._on_closed,
            on_reconnected=self._on_reconnected,
            on_disconnected=lambda: self._replies.disconnected(time.time()),
        )
        self._outbox = CompletionOutbox(nc, self.subjects, self.log)
        self._calls_sub = await nc.subscribe(self.subjects.engine_calls(cfg.engine_id), cb=self._on_call)
        await nc.subscribe(self.subjects.call_abort, cb=self._on_abort)
        await nc.subscribe(f"{self.subjects.call_abort}.*", cb=self._on_abort)
        # ended programs leave the working set, and their contexts go first from the prefix cache
        # only programs that ended (not one update per call: at R calls/s every engine would read R/s)
        await nc.subscribe(self.subjects.program_ended, cb=self._on_program_service)
        await nc.flush()
        self.metrics.endpoint.start()
        await self._heartbeat()  # announce ourselves at once
        self._tasks = [asyncio.create_task(self._step_loop()), asyncio.create_task(self._heartbeat_loop())]
        for task in self._tasks:
            task.add_done_callback(self._on_task_done)
        self.log.info("ready", backend=self.backend.name, model=self.backend.model_name)

    async def stop(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._executor.shutdown(wait=False)
            return
        assert self.core is not None
        self._state = "draining"
        if self._calls_sub is not None:
            await self._calls_sub.unsubscribe()  # stop taking work
        await self._heartbeat()
        self.log.info("draining", calls=len(self._inflight), timeout_s=self.config.drain_timeout_s)
        if self._inflight and self.health.ok:  # a dead step loop finishes nothing: hand back at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=self.config.drain_timeout_s)
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # a loop's own failure is already reported
        for call_id in list(self._inflight):
            await self._hand_back(call_id)
        self._state = "down"
        await self._heartbeat()
        if self._outbox is not None:
            await self._outbox.drain()
        await self._nc.drain()
        self._executor.shutdown(wait=self.health.ok)  # a stuck step's thread is not waited for
        self.metrics.endpoint.stop()
        self.log.info("stopped")

    # -- inputs -------------------------------------------------------------------------------
    async def _on_call(self, msg: Msg) -> None:
        assert self.core is not None and self.backend is not None
        call = decode_or_drop(msg.data, StampedCall, self.log, self._throttle, "stamped call")
        if call is None:
            return
        await self._accept(call)

    async def _accept(self, call: StampedCall) -> None:
        assert self.core is not None and self.backend is not None
        if call.policy != self.core.config.policy and call.policy not in self._foreign_policies:
            # a scheduler that does not read the heartbeat's policy (an older one): served, said once
            self._foreign_policies.add(call.policy)
            self.log.warning(
                "call stamped under another policy; served by this engine's",
                stamp_policy=call.policy,
                policy=self.core.config.policy,
                scheduler_id=call.scheduler_id,
            )
        with structlog.contextvars.bound_contextvars(program_id=call.program_id, call_id=call.call_id):
            held = self._inflight.get(call.call_id)
            if held is not None:
                if call.attempt <= held.call.attempt:
                    self.log.info("duplicate call ignored", attempt=call.attempt)
                    return
                if call.owner != held.call.owner:
                    problem = "another caller's call with this call_id runs here; choose another call_id"
                    await self._error(call, ErrorCode.BAD_FIELD, problem)
                    return
                if await self._adopt(held, call):
                    return
                # a newer attempt of a call held here (its caller gave up on us): the newer one wins
                if self._stepping:
                    self._pending_aborts[call.call_id] = held.call.attempt
                    self._silent_aborts.add(call.call_id)
                    self._deferred.append(call)
                    return
                replaced = self.core.abort(call.call_id)
                if replaced is not None:
                    await self._completed(replaced, FinishReason.ABORT)
                self._inflight.pop(call.call_id, None)
            if len(self._inflight) >= self.config.backend.max_batch + self.config.max_waiting:
                problem = (
                    f"engine {self.engine_id} already holds {len(self._inflight)} calls, its limit;"
                    " try again later"
                )
                await self._reject(call, ErrorCode.RATE_LIMITED, problem)
                return
            if call.max_tokens < 1:  # a stamped call straight from the wire, not from a scheduler
                problem = f"max_tokens must be at least 1, got {call.max_tokens}"
                await self._reject(call, ErrorCode.BAD_MAX_TOKENS, problem)
                return
            if len(call.resume_token_ids) >= call.max_tokens:
                await self._final_without_running(call)
                return
            try:
                if call.messages:
                    messages = [{"role": m.role, "content": m.content} for m in call.messages]
                    prompt_ids = self.backend.encode_chat(messages)
                else:
                    prompt_ids = self.backend.encode_prompt(call.prompt or "")
            except Exception as exc:  # a template or tokenizer that rejects the input
                await self._reject(call, ErrorCode.BAD_FIELD, f"the prompt could not be encoded: {exc}")
                return
            problem = self.core.validate(len(prompt_ids), call.max_tokens)
            if problem is None and not prompt_ids:
                problem = "the prompt encodes to no tokens"
            if problem is not None:
                await self._reject(call, ErrorCode.PROMPT_TOO_LONG, problem)
                return
            spec = core_call(call, prompt_ids)
            self.core.add(spec, time.time())
            self._inflight[call.call_id] = InFlight(call)
            self._drained.clear()
            self.log.debug("call queued", priority=call.priority, prompt_tokens=len(prompt_ids))
            if call.ack:
                assert self._nc is not None
                accepted = CallAccepted(
                    call_id=call.call_id, engine_id=self.engine_id, attempt=call.attempt, priority=call.priority
                )
                await self._nc.publish(call.reply_to, encode(accepted))
        self._wake.set()

    async def _adopt(self, flight: InFlight, call: StampedCall) -> bool:
        """A newer attempt of a call still running here (its caller lost replies, say while the broker
        restarted): carry on with the same run under the new attempt, resending in one chunk what
        the caller lacks after its ``resume_token_ids``. Nothing is recomputed or counted twice.
        False when its tokens do not match what was sent here (the caller resumes elsewhere)."""
        assert self._nc is not None
        have = len(call.resume_token_ids)
        sent = flight.sent_all()
        offsets = {offset for offset, _ in flight.texts} | {len(flight.call.resume_token_ids), len(sent)}
        if have > len(sent) or have not in offsets or sent[:have] != list(call.resume_token_ids):
            return False
        replay = "".join(text for offset, text in flight.texts if offset >= have)
        flight.call = call
        flight.sent_ids = sent[have:]
        flight.texts = [(offset, text) for offset, text in flight.texts if offset >= have]
        flight.chunks = 0
        self._pending_aborts.pop(call.call_id, None)  # aborts of the older attempt no longer apply
        self._silent_aborts.discard(call.call_id)
        self.log.info("newer attempt adopted", attempt=call.attempt, resent=len(sent) - have)
        if call.ack:
            accepted = CallAccepted(
                call_id=call.call_id, engine_id=self.engine_id, attempt=call.attempt, priority=flight.call.priority
            )
            await self._nc.publish(call.reply_to, encode(accepted))
        if len(sent) > have:
            chunk = CallChunk(
                call_id=call.call_id,
                seq=flight.chunks,
                text=replay,
                token_ids=sent[have:],
                attempt=call.attempt,
                engine_id=self.engine_id,
                offset=have,
            )
            flight.chunks += 1
            await self._nc.publish(call.reply_to, encode(chunk))
        return True

    async def _on_abort(self, msg: Msg) -> None:
        abort = decode_or_drop(msg.data, CallAbort, self.log, self._throttle, "abort")
        if abort is None:
            return
        flight = self._inflight.get(abort.call_id)
        if flight is None or abort.engine_id not in ("", self.engine_id):
            return
        if abort.attempt is not None and abort.attempt < flight.call.attempt:
            return  # meant for an older attempt: the caller resubmitted, and this one is the newer
        sender = self.subjects.sender(msg.subject, self.subjects.call_abort)
        if sender and sender != flight.call.owner:  # an authenticated user aborts only its own calls
            self._throttle.log(self.log, "abort of another user's call refused", call_id=abort.call_id, by=sender)
            return
        attempt = max(flight.call.attempt, self._pending_aborts.get(abort.call_id, -1))
        self._pending_aborts[abort.call_id] = attempt
        if abort.engine_id:  # the scheduler gave up on this engine and told the caller to resubmit
            self._silent_aborts.add(abort.call_id)
        if not self._stepping:
            await self._apply_aborts()

    async def _on_program_service(self, msg: Msg) -> None:
        update = decode_or_drop(msg.data, ProgramService, self.log, self._throttle, "program update")
        if update is None:
            return
        if update.ended:
            self._ended_programs.append(update.program_id)
            if not self._stepping:
                self._apply_program_ends()

    def _apply_program_ends(self) -> None:
        """Tell the core (and so the prefix cache) which programs ended; between steps only."""
        if not self._ended_programs or self.core is None:
            return
        ended, self._ended_programs = self._ended_programs, []
        for program_id in ended:
            self.core.end_program(program_id)
        self.log.debug("programs ended", programs=len(ended))

    async def _apply_aborts(self) -> None:
        """Apply aborts (each only to the attempts it was meant for), then deferred newer attempts."""
        assert self.core is not None
        while self._pending_aborts:
            call_id, attempt = self._pending_aborts.popitem()
            silent = call_id in self._silent_aborts
            self._silent_aborts.discard(call_id)
            flight = self._inflight.get(call_id)
            if flight is None or flight.call.attempt > attempt:
                continue
            event = self.core.abort(call_id)
            if event is None:
                continue
            self.log.info("call aborted", call_id=call_id, told_caller=not silent)
            if silent:
                await self._completed(event)
            else:  # the documented end of an aborted call: a final with finish_reason "abort"
                await self._finish(flight, event)
        deferred, self._deferred = self._deferred, []
        for call in deferred:
            await self._accept(call)

    # -- the step loop --------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        """Plan, run and publish steps until stopped. One failing iteration (a publish that raised,
        a bug tripped by one call) is logged and the loop goes on; a few in a row end the loop and
        fail the service (:meth:`_on_task_done`), so it is restarted rather than left up and idle."""
        while not self._stopping:
            try:
                await self._step_once()
                self._step_failures = 0
            except Exception:
                self._step_failures += 1
                self._throttle.log(self.log, "engine step failed", level="exception", failures=self._step_failures)
                if self._step_failures >= MAX_STEP_FAILURES:
                    raise
                await asyncio.sleep(0.01 * self._step_failures)

    async def _step_once(self) -> None:
        assert self.core is not None and self.backend is not None
        plan = self.core.schedule(time.time())
        if plan is None:
            self._wake.clear()
            await self._wake.wait()
            return
        for p in plan.preemptions:
            self.log.info("call preempted", call_id=p.call_id, mode=p.mode, reason=p.reason, kv_tokens=p.kv_tokens)
        self.metrics.on_preemptions(plan.preemptions)
        self._stepping = True
        self._step_started = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, execute_plan, self.backend, plan)
        except Exception:
            self.log.exception("model step failed; failing the calls in it")
            self._stepping = False
            touched = [w.seq_id for w in plan.batch.work] + plan.swap_out + plan.swap_in + plan.drop
            for call_id in dict.fromkeys(touched):
                event = self.core.abort(call_id)
                if event is not None:
                    await self._fail(call_id, ErrorCode.INTERNAL, "the engine failed while running the call")
                    await self._completed(event)
            return
        finally:
            self._stepping = False
            self._busy_s += time.monotonic() - self._step_started
        await self._publish_events(self.core.update(plan, result, time.time()))
        self._apply_program_ends()
        if self._cache_stats_due:
            self._read_cache_stats()
        await self._apply_aborts()
        await asyncio.sleep(0)  # let submissions and heartbeats in between steps

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """The step and heartbeat loops end only when the service stops; otherwise it is broken."""
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        self.health.fail(f"an engine loop ended: {exc!r}" if exc else "an engine loop ended")

    def _on_closed(self) -> None:
        if not self._stopping and self._state != "down":
            self.health.fail("the NATS connection closed")

    async def _publish_events(self, events: list[CoreEvent]) -> None:
        """Send each call's output. A call whose output cannot be sent (too large for the broker, say)
        fails alone with ``internal``; the other calls of the step, and the step loop, go on."""
        assert self._nc is not None
        for event in events:
            flight = self._inflight.get(event.call_id)
            if flight is None:
                continue
            try:
                if isinstance(event, TokenEvent):
                    flight.pending_ids.extend(event.token_ids)
                    if flight.call.stream and event.text:
                        await self._chunk(flight, event.text)
                elif isinstance(event, FinishEvent):
                    await self._finish(flight, event)
            except Exception as exc:
                if self._nc.is_closed:
                    raise  # nothing can be sent: the service fails (its connection closed)
                self._throttle.log(
                    self.log, "call failed: its output could not be sent", call_id=event.call_id, error=repr(exc)[:300]
                )
                await self._drop_unsendable(event)

    async def _drop_unsendable(self, event: CoreEvent) -> None:
        assert self.core is not None
        finished = self.core.abort(event.call_id)  # None: the core had finished it already
        if finished is None and isinstance(event, FinishEvent):
            finished = event
        await self._fail(event.call_id, ErrorCode.INTERNAL, "the engine could not send the call's output")
        if finished is not None:
            await self._completed(finished)

    async def _chunk(self, flight: InFlight, text: str) -> None:
        """Send text with the token ids it came from (including any held back until now)."""
        assert self._nc is not None
        chunk = CallChunk(
            call_id=flight.call.call_id,
            seq=flight.chunks,
            text=text,
            token_ids=flight.pending_ids,
            attempt=flight.call.attempt,
            engine_id=self.engine_id,
            offset=len(flight.call.resume_token_ids) + len(flight.sent_ids),
        )
        flight.chunks += 1
        flight.texts.append((chunk.offset, text))
        flight.sent_ids.extend(flight.pending_ids)
        flight.pending_ids = []
        await self._nc.publish(flight.call.reply_to, encode(chunk))

    async def _hand_back(self, call_id: str) -> None:
        """Give an unfinished call back to the schedulers, to resume on another engine after the
        tokens its caller already has."""
        assert self._nc is not None and self.core is not None
        flight = self._inflight.get(call_id)
        event = self.core.abort(call_id)
        if flight is None or event is None:
            return
        call = flight.call
        handed = msgspec.structs.replace(
            call, resume_token_ids=list(call.resume_token_ids) + flight.sent_ids, attempt=call.attempt + 1
        )
        await self._nc.publish(self.subjects.call_handback, encode(handed))
        self.log.info("call handed back", program_id=call.program_id, call_id=call_id, resume=len(flight.sent_ids))
        await self._completed(event, FinishReason.HANDBACK)

    async def _final_without_running(self, call: StampedCall) -> None:
        """A resubmitted call whose caller already holds all its tokens: only the final is missing."""
        assert self._nc is not None and self.backend is not None
        outcome = CallOutcome.of(
            call, self.engine_id, FinishReason.LENGTH, time.time(), output_tokens=len(call.resume_token_ids)
        )
        await self._end_reply(call.reply_to, encode(outcome.final(self.backend.decode(call.resume_token_ids))))

    async def _finish(self, flight: InFlight, event: FinishEvent) -> None:
        assert self._nc is not None
        state = event.state
        call = flight.call
        if call.stream and (len(event.text) > state.emitted_chars or flight.pending_ids):
            await self._chunk(flight, event.text[state.emitted_chars :])  # text held back at the end
        outcome = CallOutcome.measured(call, state, self.engine_id, event.finish_reason, time.time())
        await self._end_reply(call.reply_to, encode(outcome.final(event.text)))
        await self._completed(event, outcome=outcome)

    async def _end_reply(self, reply_to: str, data: bytes) -> None:
        """Send a call's last reply (final or error), kept to be sent again after a reconnect."""
        assert self._nc is not None
        self._replies.sent(time.time(), reply_to, data)
        await self._nc.publish(reply_to, data)

    def _on_reconnected(self) -> None:
        self._beat_now.set()
        replay = self._replies.reconnected(time.time())
        if replay:
            self.log.info("call endings sent again after a reconnect", replies=len(replay))
            task = asyncio.get_running_loop().create_task(self._send_again(replay))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)

    async def _send_again(self, replay: list[tuple[str, bytes]]) -> None:
        assert self._nc is not None
        for subject, data in replay:
            try:
                await self._nc.publish(subject, data)
            except Exception as exc:  # disconnected again: the next reconnect sends them again
                self._throttle.log(self.log, "reply not sent again", error=str(exc)[:200])
                return

    async def _completed(
        self, event: FinishEvent, finish_reason: str | None = None, outcome: CallOutcome | None = None
    ) -> None:
        """Publish the call-completed event and log the canonical line for the call. ``outcome``:
        the figures its final was sent with; else measured now, ``finish_reason`` over the core's."""
        assert self._nc is not None
        flight = self._inflight.pop(event.call_id, None)
        if flight is None:
            return
        if not self._inflight:
            self._drained.set()
        state, call = event.state, flight.call
        if outcome is None:
            reason = finish_reason or event.finish_reason
            outcome = CallOutcome.measured(call, state, self.engine_id, reason, time.time())
        done = outcome.completed()
        assert self._outbox is not None
        await self._outbox.send(done)
        self.metrics.on_completed(done, state, done.completed_at)
        self.log.info(
            "call finished",
            program_id=call.program_id,
            call_id=call.call_id,
            finish_reason=done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            output_tokens=done.output_tokens,
            queue_wait_s=round(done.queue_wait_s, 4),
            service_s=round(done.service_s, 4),
            priority=round(call.priority, 4),
            preemptions=state.preemptions,
        )

    async def _error(self, call: StampedCall, code: str, message: str) -> None:
        assert self._nc is not None
        error = CallError(
            call_id=call.call_id, program_id=call.program_id, code=code, message=message, attempt=call.attempt
        )
        await self._end_reply(call.reply_to, encode(error))

    async def _reject(self, call: StampedCall, code: str, message: str) -> None:
        """Refuse a call before it runs: the caller gets the error, and a completed event with
        finish_reason "rejected" releases the call's place among its program's active calls."""
        self._throttle.log(self.log, "call rejected", key=f"rejected {code}", call_id=call.call_id, code=code,
                           reason=message[:300])
        await self._error(call, code, message)
        assert self._outbox is not None
        await self._outbox.send(CallOutcome.rejected(call, self.engine_id, time.time()).completed())

    async def _fail(self, call_id: str, code: str, message: str) -> None:
        flight = self._inflight.get(call_id)
        if flight is not None:
            await self._error(flight.call, code, message)

    # -- heartbeats -----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        assert self._nc is not None and self.backend is not None and self.core is not None
        load = self.core.load()
        if self._stepping:
            self._cache_stats_due = True  # read after this step, for the next heartbeat
        else:
            self._read_cache_stats()
        cache = self._cache_stats
        hb = EngineHeartbeat(
            engine_id=self.engine_id,
            backend=self.backend.name,
            model=self.backend.model_name,
            state=self._state,  # type: ignore[arg-type]
            running=load.running,
            waiting=load.waiting,
            swapped=load.swapped,
            kv_tokens_used=load.kv_tokens_used,
            kv_tokens_free=load.kv_tokens_free,
            kv_tokens_queued=load.kv_tokens_queued,
            swap_pool_used_bytes=load.swap_pool_used_bytes,
            max_context=self.backend.max_context,
            interval_s=self.config.heartbeat_s,
            sent_at=time.time(),
            kv_tokens_capacity=self.core.kv_capacity_tokens,
            kv_tokens_retained=cache.retained_tokens,
            kv_tokens_idle_contexts=load.idle_context_tokens,
            kv_tokens_tiered=cache.tiered_tokens,
            prompt_tokens_total=cache.prompt_tokens,
            prefix_hit_tokens_total=cache.hit_tokens,
            prefix_hit_rate=cache.hit_rate,
            calls_limit=self.config.backend.max_batch + self.config.max_waiting,
            kv_tokens_tier_capacity=cache.tier_capacity_tokens,
            tier_spill_share=self._spill.observe(self._busy_s, cache.tier_in_s),
            policy=self.core.config.policy,
        )
        await self._nc.publish(self.subjects.engine_heartbeat, encode(hb))
        self.metrics.on_heartbeat(hb)

    def _read_cache_stats(self) -> None:
        self._cache_stats_due = False
        if isinstance(self.backend, PrefixCache):
            self._cache_stats = self.backend.cache_stats()

    async def _heartbeat_loop(self) -> None:
        """Heartbeats say the engine takes work; one whose step loop died sends none, so the
        schedulers stop routing to it and tell its callers to resubmit."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), timeout=self.config.heartbeat_s)
            self._beat_now.clear()
            if self._stepping and (running := time.monotonic() - self._step_started) > self.config.step_stuck_s:
                self.health.fail(f"a model step has run for {running:.0f} s (limit {self.config.step_stuck_s:g} s)")
            if not self.health.ok:
                return
            try:
                await self._heartbeat()
            except Exception as exc:  # reconnecting with a full buffer: the next one may pass
                self._throttle.log(self.log, "heartbeat not sent", error=str(exc) or type(exc).__name__)
