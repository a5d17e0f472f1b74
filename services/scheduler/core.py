"""The scheduler's pure core: validate submissions, stamp priorities, pick an engine, and notice
dead engines.

Synchronous and clock-free (``now`` is passed in). It keeps the latest figures the tracker
published for each program, the latest heartbeat of each engine, and the calls this scheduler
routed that have not completed yet (so that when an engine stops heartbeating, their callers can be
told to resubmit).
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass

import msgspec

from autellix.policy.balancer import EngineLoad, make_balancer
from autellix.policy.program_account import ProgramAccount, priority_for
from autellix.policy.tenant_account import TenantAccounts
from autellix.policy.variants import SERVING_POLICIES
from autellix.proto import (
    CallError,
    CallParams,
    CallRequest,
    EngineHeartbeat,
    ErrorCode,
    ProgramService,
    StampedCall,
    decode,
)
from autellix.proto.limits import MAX_TEMPERATURE, check_shape, explain, is_id, is_subject

from .tenant_limits import DEFAULT_MAX_CALLS, DEFAULT_MAX_TOKENS, TenantLimits

POLICIES = SERVING_POLICIES


class RejectedCall(Exception):
    """A submission that cannot be served; carries the error to send back."""

    def __init__(self, error: CallError, reply_to: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reply_to = reply_to


@dataclass(slots=True)
class EngineView:
    heartbeat: EngineHeartbeat
    received_at: float
    #: KV tokens routed here since the last heartbeat (the heartbeat does not count them yet)
    pending_tokens: int = 0
    #: calls routed here since the last heartbeat
    pending_calls: int = 0
    #: heard from since this scheduler's connection last came back (only such engines get calls:
    #: one still reconnecting would miss them)
    confirmed: bool = True

    def full(self) -> bool:
        """Whether the engine would shed one more call (its heartbeat's limit, with what was routed since)."""
        hb = self.heartbeat
        held = hb.running + hb.waiting + hb.swapped + self.pending_calls
        return 0 < hb.calls_limit <= held

    def load_tokens(self) -> int:
        hb = self.heartbeat
        return hb.kv_tokens_used + hb.kv_tokens_queued + self.pending_tokens

    def as_load(self) -> EngineLoad:
        hb = self.heartbeat
        return EngineLoad(
            engine_id=hb.engine_id,
            kv_tokens_held=hb.kv_tokens_used,
            kv_tokens_queued=hb.kv_tokens_queued + self.pending_tokens,
        )


@dataclass(slots=True)
class Routed:
    """A call this scheduler routed, until its engine reports it completed."""

    call_id: str
    program_id: str
    reply_to: str
    attempt: int
    #: when the call fails with ``deadline_exceeded`` (0: never)
    deadline_at: float = 0.0
    #: the tenant it is accounted to, and its tokens there (:func:`call_tokens`)
    tenant: str = ""
    tokens: int = 0


def estimate_prompt_tokens(call: CallParams) -> int:
    """A cheap estimate (about 4 characters a token) for routing; engines count exactly."""
    chars = len(call.prompt or "")
    if call.messages:
        chars += sum(len(m.content) + 8 for m in call.messages)
    return max(1, chars // 4 + len(call.resume_token_ids))


def call_tokens(call: CallParams, prompt_tokens: int | None = None) -> int:
    """What a call may hold of an engine's KV: its estimated prompt and all it may generate.
    ``prompt_tokens``: :func:`estimate_prompt_tokens` of the call, when already known."""
    if prompt_tokens is None:
        prompt_tokens = estimate_prompt_tokens(call)
    return prompt_tokens + max(0, call.max_tokens)


class SchedulerCore:
    def __init__(
        self,
        policy: str = "plas",
        max_tokens_ceiling: int = 4096,
        engine_timeout_factor: float = 3.0,
        scheduler_id: str = "",
        balancer: str = "locality",
        call_deadline_s: float = 600.0,
        max_calls_per_program: int = 1024,
        tenant_half_life_s: float = 300.0,
        max_calls_per_tenant: int = DEFAULT_MAX_CALLS,
        max_tokens_per_tenant: int = DEFAULT_MAX_TOKENS,
        tenant_users: tuple[str, ...] = ("gateway",),
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.max_tokens_ceiling = max_tokens_ceiling
        self.engine_timeout_factor = engine_timeout_factor
        self.scheduler_id = scheduler_id or f"sched-{uuid.uuid4().hex[:8]}"
        self.programs: dict[str, ProgramAccount] = {}
        #: each program's total queue wait, as the tracker last published it
        self.program_wait_s: dict[str, float] = {}
        self.engines: dict[str, EngineView] = {}
        self.balancer = make_balancer(balancer)
        #: engine id -> call id -> the call, for calls routed here and not completed yet
        self.routed: dict[str, dict[str, Routed]] = {}
        #: how many calls ``routed`` holds, over all engines
        self._in_flight = 0
        if call_deadline_s <= 0:
            raise ValueError(f"the call deadline must be > 0 seconds, got {call_deadline_s}")
        self.call_deadline_s = call_deadline_s
        self.max_calls_per_program = max_calls_per_program
        #: program id -> calls routed here and not completed (the per-program limit)
        self.active_by_program: dict[str, int] = {}
        #: (deadline, engine id, call id) of routed calls, earliest first; stale entries skipped
        self._deadlines: list[tuple[float, str, str]] = []
        #: recent service per tenant (a program's owner): splitting work into programs gains nothing
        self.tenants = TenantAccounts(half_life_s=tenant_half_life_s)
        #: per-tenant bounds on calls and tokens in flight through this scheduler
        self.tenant_limits = TenantLimits(max_calls_per_tenant, max_tokens_per_tenant, tenant_users)
        #: call id -> (tenant, tokens) of calls waiting here for a live engine (counted in the bounds)
        self.held: dict[str, tuple[str, int]] = {}
        # Routing reads the live engines on every call: they are kept, sorted by engine id, until an
        # engine joins, leaves or changes state, or the first of them may have gone stale
        # (``_live_until``), and the balancer's candidates (engines with room) with them. A routed call
        # or an engine's next heartbeat updates its own entries in place: O(1), not O(engines).
        self._live: list[EngineView] | None = None
        self._live_at: dict[str, int] = {}
        self._live_until = 0.0
        self._candidates: list[EngineLoad] | None = None
        self._candidate_at: dict[str, int] = {}
        #: the candidates are every live engine, each full (then the chosen one sheds the call)
        self._all_full = False
        #: engines that serve another policy, with it: nothing is routed to them
        self.refused: dict[str, str] = {}

    # -- inputs from the tracker and engines ----------------------------------------------------
    def on_program_service(self, update: ProgramService) -> None:
        if tenant := update.tenant or update.owner:
            before = self.programs.get(update.program_id)
            grown = update.program_service_s - (before.service_s if before is not None else 0.0)
            self.tenants.charge(tenant, grown, update.updated_at)
        if update.ended:
            self.programs.pop(update.program_id, None)
            self.program_wait_s.pop(update.program_id, None)
            self.balancer.forget(update.program_id)
            return
        self.program_wait_s[update.program_id] = update.program_wait_s
        account = self.programs.get(update.program_id)
        if account is None:
            account = self.programs[update.program_id] = ProgramAccount(update.program_id)
        account.service_s = update.program_service_s
        account.critical_path_s = update.critical_path_s
        account.calls_completed = update.calls_completed
        if update.call_id:
            account.call_path_s[update.call_id] = update.call_path_s

    def on_heartbeat(self, hb: EngineHeartbeat, now: float) -> bool:
        """Take an engine's heartbeat. An engine whose local queues serve another policy than this
        scheduler's is refused: it is not among the engines calls are routed to (its queues would
        order the stamps by another rule). Returns True when such an engine is first heard (or
        changes its policy), for the shell to say so once."""
        if hb.state == "down":
            self._live = self._candidates = None
            self.engines.pop(hb.engine_id, None)
            self.refused.pop(hb.engine_id, None)
            self._forget_engine(hb.engine_id)
            return False
        if hb.policy and hb.policy != self.policy:
            self._live = self._candidates = None
            news = self.refused.get(hb.engine_id) != hb.policy
            self.refused[hb.engine_id] = hb.policy
            if self.engines.pop(hb.engine_id, None) is not None:
                self._forget_engine(hb.engine_id)  # it served our policy until now: restarted otherwise
            return news
        self.refused.pop(hb.engine_id, None)
        view = self.engines[hb.engine_id] = EngineView(heartbeat=hb, received_at=now)
        at = self._live_at.get(hb.engine_id) if self._live is not None and hb.state == "up" else None
        if at is None or self._live is None:  # joined, or not "up" (now or before): choose again
            self._live = self._candidates = None
            return False
        self._live[at] = view
        # the cache expires when its oldest heartbeat may have gone stale; this one, fresher, only
        # moves that earlier if its interval shrank
        self._live_until = min(self._live_until, now + self.engine_timeout_factor * max(hb.interval_s, 0.05))
        if self._candidates is not None:
            slot = self._candidate_at.get(hb.engine_id)
            if slot is None or view.full() or self._all_full:  # its room changed: the candidates are chosen again
                self._candidates = None
            else:
                self._candidates[slot] = view.as_load()
        return False

    def _fresh(self, view: EngineView, now: float) -> bool:
        return now - view.received_at <= self.engine_timeout_factor * max(view.heartbeat.interval_s, 0.05)

    def live_engines(self, now: float) -> list[EngineView]:
        """The engines heartbeating "up" and not stale, by engine id."""
        return list(self._live_views(now))

    def live_count(self, now: float) -> int:
        return len(self._live_views(now))

    def _live_views(self, now: float) -> list[EngineView]:
        if self._live is None or now > self._live_until:
            live = [
                v for v in self.engines.values() if self._fresh(v, now) and v.heartbeat.state == "up" and v.confirmed
            ]
            live.sort(key=lambda v: v.heartbeat.engine_id)
            self._live = live
            self._live_at = {v.heartbeat.engine_id: i for i, v in enumerate(live)}
            self._live_until = min(
                (v.received_at + self.engine_timeout_factor * max(v.heartbeat.interval_s, 0.05) for v in live),
                default=float("inf"),
            )
            self._candidates = None
        return self._live

    def on_reconnected(self, now: float) -> None:
        """This scheduler's connection came back after a break: an engine gets calls again once it
        heartbeats (it may still be reconnecting itself); each has a full timeout to do so before it
        counts as dead, from now."""
        for view in self.engines.values():
            view.confirmed = False
            view.received_at = now
        self._live = self._candidates = None

    def on_routed(self, call: StampedCall, engine_id: str, tokens: int | None = None) -> None:
        """``tokens``: :func:`call_tokens` of the call, when already known."""
        calls = self.routed.get(engine_id)
        if calls is None:
            calls = self.routed[engine_id] = {}
        previous = calls.get(call.call_id)
        if previous is not None:
            tokens = previous.tokens
        elif tokens is None:
            tokens = call_tokens(call)
        calls[call.call_id] = Routed(
            call.call_id, call.program_id, call.reply_to, call.attempt, call.deadline_at, call.tenant, tokens
        )
        if previous is None:
            self._in_flight += 1
            self.active_by_program[call.program_id] = self.active_by_program.get(call.program_id, 0) + 1
            self.tenant_limits.add(call.tenant, tokens)
        if call.deadline_at:
            heapq.heappush(self._deadlines, (call.deadline_at, engine_id, call.call_id))

    def expired(self, now: float) -> list[tuple[str, Routed]]:
        """Routed calls past their deadline, each with its engine; they are forgotten here."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, engine_id, call_id = heapq.heappop(self._deadlines)
            routed = self.routed.get(engine_id, {}).get(call_id)
            if routed is None or routed.deadline_at != deadline:
                continue  # completed, or routed again since
            del self.routed[engine_id][call_id]
            self._in_flight -= 1
            self._release(routed)
            out.append((engine_id, routed))
        return out

    def on_completed(self, call_id: str, engine_id: str, attempt: int | None = None) -> None:
        """``attempt``: the attempt that finished (None: whichever is routed there)."""
        calls = self.routed.get(engine_id)
        routed = calls.get(call_id) if calls is not None else None
        if calls is not None and routed is not None and (attempt is None or routed.attempt <= attempt):
            del calls[call_id]
            self._in_flight -= 1
            self._release(routed)
        self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Entries of completed calls wait for their deadline to be skipped: drop them in bulk (all of
        them once nothing is in flight), so the heap returns to its size after a burst."""
        in_flight = self._in_flight
        if not in_flight:
            self._deadlines.clear()
        elif len(self._deadlines) > 64 and len(self._deadlines) > 4 * in_flight:
            self._deadlines = [
                d for d in self._deadlines if (r := self.routed.get(d[1], {}).get(d[2])) and r.deadline_at == d[0]
            ]
            heapq.heapify(self._deadlines)

    def _release(self, routed: Routed) -> None:
        left = self.active_by_program.get(routed.program_id, 0) - 1
        if left > 0:
            self.active_by_program[routed.program_id] = left
        else:
            self.active_by_program.pop(routed.program_id, None)
        self.tenant_limits.remove(routed.tenant, routed.tokens)

    # -- per-tenant bounds ------------------------------------------------------------------------
    def tenant_of(self, request: CallRequest, owner: str) -> str:
        return self.tenant_limits.tenant_of(owner, request.tenant)

    def tenant_refusal(self, request: CallRequest, tenant: str, tokens: int | None = None) -> str | None:
        """Why the call would break its tenant's bounds (a new call only: a resubmission continues
        admitted work); None when it fits. ``tokens``: :func:`call_tokens` of the call, when known."""
        if request.attempt:
            return None
        return self.tenant_limits.refusal(tenant, call_tokens(request) if tokens is None else tokens)

    def hold(self, call_id: str, tenant: str, tokens: int) -> None:
        """A call waits here for a live engine: it counts in its tenant's bounds meanwhile."""
        if call_id not in self.held:
            self.held[call_id] = (tenant, tokens)
            self.tenant_limits.add(tenant, tokens)

    def unhold(self, call_id: str) -> None:
        if (held := self.held.pop(call_id, None)) is not None:
            self.tenant_limits.remove(*held)

    def _forget_engine(self, engine_id: str) -> list[Routed]:
        orphans = list(self.routed.pop(engine_id, {}).values())
        self._in_flight -= len(orphans)
        for routed in orphans:
            self._release(routed)
        self._compact_deadlines()
        return orphans

    def dead_engines(self, now: float) -> list[tuple[str, list[Routed]]]:
        """Engines whose heartbeats stopped, each with the calls routed there still in flight.

        They are forgotten: a later heartbeat brings an engine back as a new one."""
        dead = [eid for eid, view in self.engines.items() if not self._fresh(view, now)]
        out = []
        for engine_id in dead:
            del self.engines[engine_id]
            self._live = self._candidates = None
            orphans = self._forget_engine(engine_id)
            out.append((engine_id, orphans))
        return out

    # -- a submission ---------------------------------------------------------------------------
    def parse(self, data: bytes, reply: str) -> CallRequest:
        """Decode and validate a submission; raises :class:`RejectedCall` with the error to send.

        Every bound is checked here, before anything is used (:mod:`autellix.proto.limits`); a
        rejection keeps whatever call id, program id and reply subject were readable and valid."""
        try:
            request = decode(data, CallRequest)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raw = _raw_json(data)
            if raw is None:
                raise RejectedCall(
                    CallError(call_id="", code=ErrorCode.BAD_JSON, message=f"the request is not valid JSON: {exc}"),
                    reply,
                ) from None
            call_id, program_id, reply_to = _salvage_ids(raw)
            raise RejectedCall(
                CallError(
                    call_id=call_id,
                    program_id=program_id,
                    code=ErrorCode.BAD_FIELD,
                    message=f"invalid call request: {explain(exc)}",
                ),
                reply_to or reply,
            ) from None
        reply_to = request.reply_to or reply
        call_id = request.call_id or uuid.uuid4().hex

        def reject(code: str, message: str) -> RejectedCall:
            return RejectedCall(
                CallError(call_id=call_id, code=code, message=message, program_id=request.program_id),
                reply_to,
            )

        if not request.program_id:
            raise reject(ErrorCode.MISSING_PROGRAM_ID, "program_id is required: name the program this call belongs to")
        if request.max_tokens <= 0:
            raise reject(ErrorCode.BAD_MAX_TOKENS, f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.max_tokens > self.max_tokens_ceiling:
            raise reject(
                ErrorCode.BAD_MAX_TOKENS,
                f"max_tokens is {request.max_tokens}, above this deployment's ceiling of {self.max_tokens_ceiling}",
            )
        if not request.messages and not request.prompt:
            raise reject(ErrorCode.EMPTY_MESSAGES, "the call has no messages and no prompt: give at least one")
        if self.active_by_program.get(request.program_id, 0) >= self.max_calls_per_program and not request.attempt:
            raise reject(
                ErrorCode.RATE_LIMITED,
                f"program {request.program_id[:80]!r} already has {self.max_calls_per_program} calls in flight, its"
                " limit; wait for one to finish",
            )
        if not 0 <= request.temperature <= MAX_TEMPERATURE:
            raise reject(
                ErrorCode.BAD_FIELD, f"temperature must be within 0 .. {MAX_TEMPERATURE:g}, got {request.temperature}"
            )
        if request.call_id:
            return request
        return msgspec.structs.replace(request, call_id=call_id)

    def stamp(self, request: CallRequest, reply_to: str, now: float, owner: str = "") -> StampedCall:
        """``owner``: the authenticated user the submission came from (its subject says), "" without auth."""
        account = self.programs.get(request.program_id)
        # a tenant's new program starts at its tenant's recent service (policy/tenant_account.py), in
        # its priority and in the service its waits are weighed against: else the engine's
        # anti-starvation rule (wait / service >= beta) lifts a fresh program's call to the top at once
        tenant = self.tenant_of(request, owner)
        floor = self._tenant_floor(tenant, now)
        return StampedCall.stamp(
            request,
            reply_to=reply_to,
            submitted_at=request.submitted_at or now,
            priority=max(priority_for(self.policy, account, request.parents), floor),
            policy=self.policy,
            stamped_at=now,
            scheduler_id=self.scheduler_id,
            program_service_s=max(account.service_s if account is not None else 0.0, floor),
            program_wait_s=self.program_wait_s.get(request.program_id, 0.0),
            deadline_at=now + self.deadline_for(request),
            owner=owner,
            ack=request.ack,
            tenant=tenant,
        )

    def _tenant_floor(self, tenant: str, now: float) -> float:
        """The least a program of ``tenant`` is stamped at: its tenant's recent service while tenants
        compete, under the service-ordered policies (0 otherwise)."""
        if self.policy in ("plas", "atlas"):  # a tenant cannot split its way ahead
            return self.tenants.stamp(tenant, 0.0, now)
        return 0.0

    def deadline_for(self, request: CallRequest) -> float:
        """The call's own deadline when it asks for a shorter one than the deployment's."""
        if 0 < request.deadline_s < self.call_deadline_s:
            return request.deadline_s
        return self.call_deadline_s

    def route(self, call: CallParams, now: float, prefer: str = "", prompt_tokens: int | None = None) -> str | None:
        """A live engine for the call by the balancer (load in KV tokens held and queued, counting
        what this scheduler routed since each engine's last heartbeat); None when none is live.
        ``prefer``: the engine that ran the call's previous attempt, chosen while it is live with room.
        ``prompt_tokens``: :func:`estimate_prompt_tokens` of the call, when already known."""
        live = self._live_views(now)
        if not live:
            return None
        tokens = estimate_prompt_tokens(call) if prompt_tokens is None else prompt_tokens
        if prefer and prefer in self._live_at and not self.engines[prefer].full():
            view = self.engines[prefer]
            view.pending_tokens += tokens + call.max_tokens
            view.pending_calls += 1
            self._candidates = None  # its load changed: the candidates are chosen again
            return prefer
        loads = self._candidates
        if loads is None:
            # engines with room first; when every one is full, the chosen one sheds with rate_limited
            room = [v for v in live if not v.full()]
            self._all_full = not room
            loads = self._candidates = [v.as_load() for v in room or live]
            self._candidate_at = {load.engine_id: i for i, load in enumerate(loads)}
        engine_id = self.balancer.choose(call.program_id, tokens, loads)
        view = self.engines[engine_id]
        view.pending_tokens += tokens + call.max_tokens
        view.pending_calls += 1
        if view.full():
            self._candidates = None  # it has no room left: the candidates are chosen again
        else:
            loads[self._candidate_at[engine_id]] = view.as_load()
        return engine_id


def _raw_json(data: bytes) -> object | None:
    """The request as untyped JSON; None when it is not JSON at all, or too large or deep to read."""
    try:
        check_shape(data)
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None


def _salvage_ids(raw: object) -> tuple[str, str, str]:
    """call_id, program_id and reply_to from a request that failed validation, each only when it is
    readable and within its limits (an invalid reply_to is never used: the NATS reply subject is)."""
    if not isinstance(raw, dict):
        return "", "", ""
    call_id, program_id, reply_to = raw.get("call_id"), raw.get("program_id"), raw.get("reply_to")
    return (
        call_id if is_id(call_id) else "",  # type: ignore[return-value]
        program_id if is_id(program_id) else "",
        reply_to if isinstance(reply_to, str) and is_subject(reply_to) else "",
    )
