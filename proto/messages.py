"""The wire contract: one msgspec Struct per message.

Wire evolution rule: only add fields, always with defaults. Times are in seconds; absolute times are
Unix epoch seconds (``*_at``), durations end in ``_s``. IDs are strings.
"""

from __future__ import annotations

import operator
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from .limits import (
    MAX_MESSAGES,
    Attempt,
    Count,
    Epoch,
    Id,
    Name,
    Parents,
    Priority,
    ReplySubject,
    RequiredToken,
    ResumeTokens,
    Seconds,
    Text,
    Token,
)


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One chat message."""

    role: Name
    content: Text


Messages = Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)]


# ---------------------------------------------------------------------------------------------
# client -> scheduler (JSON, hand-publishable)
# ---------------------------------------------------------------------------------------------
class CallParams(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller asks of one call: shared by :class:`CallRequest` and :class:`StampedCall`.

    Both inherit these fields, so each stays one flat JSON object and a scheduler stamps a request
    without copying its fields by hand (:meth:`StampedCall.stamp`)."""

    program_id: Id = ""
    call_id: Id = ""
    messages: Messages = []
    prompt: Text | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    #: sampling seed (temperature > 0): the same seed gives the same tokens; None: unseeded
    seed: int | None = None
    ignore_eos: bool = False
    # None: the client does not say (ATLAS uses its one-scalar approximation); []: a root call;
    # [ids]: the calls of the same program this call depends on (exact critical path).
    parents: Parents | None = None
    stream: bool = True
    reply_to: ReplySubject = ""
    submitted_at: Epoch = 0.0
    # Resubmission after a "retry" reply (or a hand-back): the tokens already received (the call
    # continues after them) and the attempt number (replies of older attempts are to be ignored).
    resume_token_ids: ResumeTokens = []
    attempt: Attempt = 0


class CallRequest(CallParams, frozen=True, kw_only=True):
    """A call submission, published as JSON on ``<root>.call.submit``.

    ``program_id`` is required; everything else has a default. Either ``messages`` (chat, goes
    through the model's chat template) or ``prompt`` (raw text) must be given.
    """

    # Ask the scheduler for an "accepted" reply once the call is routed (the Python client does,
    # and resubmits when none comes: a scheduler died). Off by default so `nats req` sees one reply.
    ack: bool = False
    # The tenant the call is accounted to, set by the gateway from the caller's API key ("" = none).
    # Honoured from the gateway's identity (and without auth) only: anyone else's tenant is itself.
    tenant: Id = ""
    # Seconds the call may take once routed before it fails with "deadline_exceeded"; 0 (or more
    # than the deployment's deadline): the deployment's.
    deadline_s: Seconds = 0.0
    #: on a resubmission after lost replies: the engine that ran the previous attempt; a scheduler
    #: routes there while it is live, and that engine carries on with the same run
    prefer_engine: Token = ""


# ---------------------------------------------------------------------------------------------
# engine -> caller (on the reply subject; JSON; tagged by "type")
# ---------------------------------------------------------------------------------------------
class CallAccepted(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="accepted"):
    """Sent only when the request asked (``ack``): by the engine once it has queued the call, with
    the priority the scheduler stamped; or by a scheduler with ``engine_id`` "" when the call waits
    at its door (an engine sends its own once the call is routed)."""

    call_id: str
    engine_id: str
    attempt: int = 0
    priority: float = 0.0


class CallChunk(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="chunk"):
    """Tokens produced for one call in one engine step (or a few)."""

    call_id: str
    seq: int
    text: str
    token_ids: list[int] = []
    attempt: int = 0
    engine_id: str = ""
    #: position of the chunk's first token id among the call's output tokens (resumed ones
    #: included): the caller drops a repeat and resubmits after a gap; -1 from older engines
    offset: int = -1


class CallRetry(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="retry"):
    """The engine holding the call died: resubmit it with the same ``call_id``, ``attempt`` + 1
    and ``resume_token_ids`` = every token id received so far; the stream continues after them."""

    call_id: str
    attempt: int
    reason: str


class CallFigures(msgspec.Struct, frozen=True, kw_only=True):
    """A call's end on one engine, measured once: the figures its caller's ``final`` and the tracker's
    ``completed`` event share. Both inherit them, so each stays one flat JSON object, and the engine
    builds both from one record (services/engine/call_record.py)."""

    call_id: Id
    program_id: Id
    engine_id: RequiredToken
    service_s: Seconds = 0.0
    queue_wait_s: Seconds = 0.0
    prompt_tokens: Count
    output_tokens: Count
    #: a :class:`FinishReason`
    finish_reason: Name
    priority: Priority = 0.0
    preemptions: Count = 0
    swap_bytes: Count = 0
    swap_s: Seconds = 0.0
    recomputed_tokens: Count = 0


class CallFinal(CallFigures, frozen=True, kw_only=True, tag_field="type", tag="final"):
    """The last message of a successful call: its figures (:class:`CallFigures`) and its text."""

    #: "handback" is in the contract (:class:`FinishReason`) though an engine ends a handed-back
    #: call with no final: the call resumes elsewhere and that engine sends the final
    finish_reason: Literal["stop", "length", "abort", "handback"]  # pyright: ignore[reportIncompatibleVariableOverride]
    text: str
    ttft_s: float = 0.0
    total_s: float = 0.0
    attempt: int = 0


class CallError(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="error"):
    """The last message of a failed call: a stable ``code`` and a sentence for people."""

    call_id: str
    code: str
    message: str
    program_id: str = ""
    attempt: int = 0


CallReply = CallAccepted | CallChunk | CallRetry | CallFinal | CallError


class ErrorCode(StrEnum):
    """Stable error codes sent in :class:`CallError` (each member is its string value)."""

    BAD_JSON = "bad_json"
    BAD_FIELD = "bad_field"
    MISSING_PROGRAM_ID = "missing_program_id"
    BAD_MAX_TOKENS = "bad_max_tokens"
    EMPTY_MESSAGES = "empty_messages"
    PROMPT_TOO_LONG = "prompt_too_long"
    NO_ENGINE = "no_engine"
    ENGINE_STOPPED = "engine_stopped"
    ABORTED = "aborted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


# ---------------------------------------------------------------------------------------------
# scheduler -> engine
# ---------------------------------------------------------------------------------------------
class StampedCall(CallParams, frozen=True, kw_only=True):
    """A validated call with its program-level priority, routed to one engine.

    The caller's fields come from :class:`CallParams` (ids and reply subject required here); the
    rest is the scheduler's stamp."""

    # required here (msgspec allows a required field to override a defaulted one under kw_only)
    call_id: Id  # pyright: ignore[reportGeneralTypeIssues]
    program_id: Id  # pyright: ignore[reportGeneralTypeIssues]
    reply_to: ReplySubject  # pyright: ignore[reportGeneralTypeIssues]
    priority: Priority = 0.0
    #: the policy the priority was computed under; an engine serving another policy refuses the call
    policy: Name = "plas"
    stamped_at: Epoch = 0.0
    scheduler_id: Name = ""
    # The program's figures when stamped, for the engine's anti-starvation rule.
    program_service_s: Seconds = 0.0
    program_wait_s: Seconds = 0.0
    # When the call fails with "deadline_exceeded" (Unix seconds; 0: none). Kept across hand-backs.
    deadline_at: Epoch = 0.0
    # The authenticated user that submitted the call ("" without auth): only it may abort the call.
    owner: Id = ""
    #: the caller asked for an "accepted" reply: the engine sends it once the call is queued
    ack: bool = False
    #: the tenant the scheduler accounts the call to (services/scheduler/tenant_limits.py)
    tenant: Id = ""

    @classmethod
    def stamp(cls, request: CallParams, **stamp: Any) -> StampedCall:
        """The request's call fields (:class:`CallParams`), with ``stamp`` set over them."""
        fields = dict(zip(CallParams.__struct_fields__, _call_params(request), strict=True))
        fields.update(stamp)
        return cls(**fields)


#: the :class:`CallParams` fields of a call, as a tuple (one C call, not a getattr per field)
_call_params = operator.attrgetter(*CallParams.__struct_fields__)


class CallAbort(msgspec.Struct, frozen=True, kw_only=True):
    call_id: Id
    reason: Name = "client"
    #: only this engine drops the call ("" = whichever holds it)
    engine_id: Token = ""
    #: only this attempt and older ones are dropped (None = every attempt): a scheduler's abort of
    #: an attempt it gave up on never drops the newer attempt the caller resubmitted meanwhile
    attempt: Attempt | None = None


# ---------------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------------
class CallDispatched(msgspec.Struct, frozen=True, kw_only=True):
    call_id: Id
    program_id: Id
    engine_id: RequiredToken
    priority: Priority
    parents: Parents | None = None
    dispatched_at: Epoch = 0.0
    #: the authenticated user that submitted the call ("" without auth): the program's owner
    owner: Id = ""
    # seconds the call waited at the schedulers' door before it was routed (its program's first calls)
    door_wait_s: Seconds = 0.0
    #: the tenant the call is accounted to (services/scheduler/tenant_limits.py; "" = none)
    tenant: Id = ""


class FinishReason(StrEnum):
    """``finish_reason`` of a completed event (:class:`CallCompleted`). A caller's ``final`` carries
    only the first three; the other two end a call on one engine without a final."""

    #: the model ended the answer (end of sequence)
    STOP = "stop"
    #: ``max_tokens`` reached
    LENGTH = "length"
    #: aborted by its caller, or replaced by a newer attempt
    ABORT = "abort"
    #: a draining engine handed the call back mid-way: its service counts when it completes elsewhere
    HANDBACK = "handback"
    #: refused before it ran: only releases the call's place among its program's active calls
    REJECTED = "rejected"


#: ``finish_reason`` of a completed event for a call an engine refused before running it
REJECTED = FinishReason.REJECTED


class CallCompleted(CallFigures, frozen=True, kw_only=True):
    """Published by the engine when a call finishes (successfully, aborted or failed): its figures
    (:class:`CallFigures`) and what the tracker and the schedulers count them by."""

    # required here (msgspec keeps an overridden field in its place, so the JSON is unchanged)
    service_s: Seconds  # pyright: ignore[reportGeneralTypeIssues]
    queue_wait_s: Seconds  # pyright: ignore[reportGeneralTypeIssues]
    parents: Parents | None = None
    completed_at: Epoch = 0.0
    #: the attempt that finished here (None from older engines): a scheduler forgets the call's
    #: routing only up to this attempt, never a newer one routed to the same engine
    attempt: Attempt | None = None


def completed_message_id(event: CallCompleted) -> str:
    """The ``Nats-Msg-Id`` header engines publish a completed event with: JetStream keeps one event
    per engine, call, attempt and outcome within its duplicate window (services/tracker/completions.py).
    Two attempts of one call can end on one engine with the same outcome (an attempt replaced by the
    caller's resubmission, then the resubmission aborted), and each one's service counts."""
    attempt = f":{event.attempt}" if event.attempt else ""
    return f"{event.engine_id}:{event.call_id}{attempt}:{event.finish_reason}"

class EngineHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    engine_id: RequiredToken
    backend: Name
    model: Name
    state: Literal["up", "draining", "down"] = "up"
    running: Count = 0
    waiting: Count = 0
    swapped: Count = 0
    kv_tokens_used: Count = 0
    kv_tokens_free: Count = 0
    kv_tokens_queued: Count = 0
    swap_pool_used_bytes: Count = 0
    max_context: Count = 0
    interval_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 1.0
    sent_at: Epoch = 0.0
    # Program-aware KV memory (0 from older engines; the retained, tiered and hit figures also from
    # backends without a prefix cache): the KV the engine admits at most (running calls)
    kv_tokens_capacity: Count = 0
    # KV held in device memory by retained contexts of finished calls
    kv_tokens_retained: Count = 0
    # for each active program between calls (none queued or running here), the context of its latest
    # call that finished here, wherever that KV is now (its next call extends it): with the running
    # and queued KV, the working set the schedulers' door compares with the capacity
    kv_tokens_idle_contexts: Count = 0
    # KV held in the CPU tier
    kv_tokens_tiered: Count = 0
    # cumulative prompt tokens of calls admitted, and those served from retained KV instead of
    # prefilled (the hit rate is their ratio; prefix_hit_rate is it, for readers of one heartbeat)
    prompt_tokens_total: Count = 0
    prefix_hit_tokens_total: Count = 0
    prefix_hit_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    # the calls (running, waiting, swapped) the engine holds at most; more are shed with
    # "rate_limited", so schedulers route elsewhere while others have room (0: no limit said)
    calls_limit: Count = 0
    # the CPU tier's size (0: none), and the share of the engine's recent busy time spent copying
    # contexts back in from it (policy/door.py SpillMeter; the schedulers' door reads both)
    kv_tokens_tier_capacity: Count = 0
    tier_spill_share: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    #: the policy of the engine's local queues (fcfs | mlfq | plas | atlas); schedulers of another
    #: policy route nothing here ("" from older engines: taken by every scheduler)
    policy: Name = ""


def same_figure(message: msgspec.Struct, name: str, alias: str) -> None:
    """Fill a figure sent under one of its two names into the other: a message says both (older
    readers read the alias), and one that says either (an older sender's) reads the same."""
    value, aliased = getattr(message, name), getattr(message, alias)
    if aliased and not value:
        msgspec.structs.force_setattr(message, name, aliased)
    elif value != aliased:
        msgspec.structs.force_setattr(message, alias, value)


class ProgramService(msgspec.Struct, frozen=True, kw_only=True):
    """The tracker's figures for one program, published after every update.

    ``program_service_s`` and ``program_wait_s`` are the program's totals; ``service_s`` and
    ``waiting_s`` are their older names, always sent with the same values and accepted alone."""

    program_id: Id
    service_s: Seconds = 0.0
    critical_path_s: Seconds = 0.0
    waiting_s: Seconds = 0.0
    calls_completed: Count = 0
    # The call whose completion caused this update and its critical-path finish
    # (its priority + its own service), for exact ATLAS stamps of its children.
    call_id: Id = ""
    call_path_s: Seconds = 0.0
    ended: bool = False
    updated_at: Epoch = 0.0
    #: the program's owner ("" without auth)
    owner: Id = ""
    #: the program's tenant (from its first call): schedulers account service per tenant ("": the owner)
    tenant: Id = ""
    #: the service its calls received, in total (``service_s`` is the older name)
    program_service_s: Seconds = 0.0
    #: the time its calls waited, in engine queues and at the schedulers' door (``waiting_s``)
    program_wait_s: Seconds = 0.0

    def __post_init__(self) -> None:
        same_figure(self, "program_service_s", "service_s")
        same_figure(self, "program_wait_s", "waiting_s")


class ProgramEnd(msgspec.Struct, frozen=True, kw_only=True):
    program_id: Id = ""


class ProgramSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the tracker's process table (reply to program end and table requests).

    ``program_service_s`` and ``program_wait_s`` are the program's totals; ``service_s`` and
    ``waiting_s`` are their older names, always sent with the same values and accepted alone."""

    program_id: str
    service_s: float = 0.0
    critical_path_s: float
    waiting_s: float = 0.0
    calls_completed: int
    active_calls: int
    engines: list[str]
    first_seen_at: float
    last_activity_at: float
    ended: bool = False
    # of program_wait_s, the time its calls waited at the schedulers' door for engine memory
    door_wait_s: float = 0.0
    program_service_s: float = 0.0
    program_wait_s: float = 0.0

    def __post_init__(self) -> None:
        same_figure(self, "program_service_s", "service_s")
        same_figure(self, "program_wait_s", "waiting_s")


class ProgramEndReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The tracker's reply on ``<root>.program.end``: ``{"ok": true, "program": {...}}`` with the
    program's final row, or ``{"ok": false, "code": ..., "error": ...}`` (a stable code and a
    sentence) for a program it does not know, another user's program or a malformed request."""

    ok: bool
    program: ProgramSummary | None = None
    code: str = ""
    error: str = ""


class ProgramTable(msgspec.Struct, frozen=True, kw_only=True):
    programs: list[ProgramSummary]
    #: the tracker shard that answered, of how many (each holds its own programs; a client asks all)
    shard: int = 0
    shards: int = 1
