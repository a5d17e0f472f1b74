"""One call record: the request and the stamped call share their fields (the wire is unchanged), the
engine builds its state from the stamped call in one place, and a call's final and completed event
come from one set of figures."""

from __future__ import annotations

import json

import msgspec
import pytest

from autellix.engine.core import CoreCall, CoreConfig, EngineCore, FinishEvent
from autellix.engine.sim_backend import SimBackend
from autellix.proto import (
    REJECTED,
    CallCompleted,
    CallError,
    CallFigures,
    CallFinal,
    CallParams,
    CallReply,
    CallRequest,
    ErrorCode,
    FinishReason,
    Message,
    ProgramEndReply,
    ProgramSummary,
    StampedCall,
    decode,
    encode,
)
from autellix.proto.messages import completed_message_id
from autellix.services.engine.call_record import CallOutcome, core_call
from autellix.services.scheduler.core import SchedulerCore

# The JSON these messages had before CallParams existed (encoded by the code of commit afdc2e8), with
# the fields added since at the end (additive: prefer_engine; a stamped call's ack and tenant).
REQUEST_JSON = (
    b'{"program_id":"p1","call_id":"c1","messages":[{"role":"user","content":"hi"}],"prompt":null,'
    b'"max_tokens":7,"temperature":0.5,"seed":3,"ignore_eos":true,"parents":["c0"],"stream":false,'
    b'"reply_to":"_INBOX.x","submitted_at":12.5,"resume_token_ids":[4,5],"attempt":2,"ack":true,'
    b'"tenant":"t","deadline_s":9.0,"prefer_engine":""}'
)
DEFAULT_REQUEST_JSON = (
    b'{"program_id":"","call_id":"","messages":[],"prompt":null,"max_tokens":128,"temperature":0.0,'
    b'"seed":null,"ignore_eos":false,"parents":null,"stream":true,"reply_to":"","submitted_at":0.0,'
    b'"resume_token_ids":[],"attempt":0,"ack":false,"tenant":"","deadline_s":0.0,"prefer_engine":""}'
)
STAMPED_JSON = (
    b'{"call_id":"c1","program_id":"p1","reply_to":"_INBOX.x","messages":[{"role":"user","content":"hi"}],'
    b'"prompt":null,"max_tokens":7,"temperature":0.5,"seed":3,"ignore_eos":true,"parents":["c0"],'
    b'"stream":false,"priority":1.5,"policy":"atlas","submitted_at":12.5,"stamped_at":13.0,'
    b'"scheduler_id":"s1","resume_token_ids":[4,5],"attempt":2,"program_service_s":2.0,'
    b'"program_wait_s":0.25,"deadline_at":20.0,"owner":"alice","ack":false,"tenant":""}'
)

PARAMS = dict(
    program_id="p1",
    call_id="c1",
    messages=[Message(role="user", content="hi")],
    max_tokens=7,
    temperature=0.5,
    seed=3,
    ignore_eos=True,
    parents=["c0"],
    stream=False,
    reply_to="_INBOX.x",
    submitted_at=12.5,
    resume_token_ids=[4, 5],
    attempt=2,
)


def test_request_json_is_byte_for_byte_unchanged() -> None:
    request = CallRequest(**PARAMS, ack=True, tenant="t", deadline_s=9.0)  # type: ignore[arg-type]
    assert encode(request) == REQUEST_JSON
    assert encode(CallRequest()) == DEFAULT_REQUEST_JSON
    assert decode(REQUEST_JSON, CallRequest) == request


def test_stamped_json_has_the_same_keys_and_values() -> None:
    stamped = StampedCall(
        **PARAMS,  # type: ignore[arg-type]
        priority=1.5,
        policy="atlas",
        stamped_at=13.0,
        scheduler_id="s1",
        program_service_s=2.0,
        program_wait_s=0.25,
        deadline_at=20.0,
        owner="alice",
    )
    # the field order follows the shared base now; no reader depends on the order of JSON keys
    assert json.loads(encode(stamped)) == json.loads(STAMPED_JSON)
    assert decode(STAMPED_JSON, StampedCall) == stamped


def test_stamped_call_still_requires_its_ids_and_reply_subject() -> None:
    for missing in ("call_id", "program_id", "reply_to"):
        raw = json.loads(STAMPED_JSON)
        del raw[missing]
        with pytest.raises(msgspec.ValidationError, match=missing):
            decode(json.dumps(raw).encode(), StampedCall)
    assert issubclass(CallRequest, CallParams) and issubclass(StampedCall, CallParams)


def _non_default_params() -> dict[str, object]:
    """A value for every field of CallParams that differs from its default."""
    values: dict[str, object] = {**PARAMS, "prompt": "raw"}
    assert set(values) == set(CallParams.__struct_fields__), "a new call field: give it a sample value here"
    defaults = CallParams()
    for name, value in values.items():
        assert value != getattr(defaults, name), name
    return values


def test_the_scheduler_carries_every_call_field_into_the_stamp() -> None:
    request = CallRequest(**_non_default_params(), deadline_s=5.0)  # type: ignore[arg-type]
    core = SchedulerCore(policy="atlas", scheduler_id="s9")
    stamped = core.stamp(request, request.reply_to, now=100.0, owner="bob")
    for name in CallParams.__struct_fields__:
        assert getattr(stamped, name) == getattr(request, name), name
    assert (stamped.policy, stamped.scheduler_id, stamped.owner) == ("atlas", "s9", "bob")
    assert stamped.stamped_at == 100.0 and stamped.deadline_at == 105.0
    # the scheduler's own choices win over the request's
    fresh = core.stamp(msgspec.structs.replace(request, submitted_at=0.0), "_INBOX.nats", now=50.0)
    assert fresh.reply_to == "_INBOX.nats" and fresh.submitted_at == 50.0


def _stamped(**over: object) -> StampedCall:
    return StampedCall.stamp(
        CallRequest(**_non_default_params()),  # type: ignore[arg-type]
        priority=0.75,
        program_wait_s=1.25,
        program_service_s=2.5,
        **over,
    )


def test_the_engine_builds_its_core_call_from_the_stamp() -> None:
    call = _stamped()
    spec = core_call(call, [1, 2, 3])
    assert spec == CoreCall(
        call_id="c1",
        program_id="p1",
        prompt_ids=[1, 2, 3],
        max_tokens=7,
        priority=0.75,
        temperature=0.5,
        ignore_eos=True,
        seed=3,
        program_wait_s=1.25,
        program_service_s=2.5,
        resume_ids=[4, 5],
    )
    spec.resume_ids.append(9)
    assert call.resume_token_ids == [4, 5], "the core's list is its own"


def _finished_call() -> tuple[StampedCall, FinishEvent]:
    backend = SimBackend()
    core = EngineCore(backend, CoreConfig(max_batch=4))
    call = _stamped(resume_token_ids=[], max_tokens=3)
    core.add(core_call(call, backend.encode_prompt("a b c d")), 10.0)
    t = 10.0
    while True:
        t += 0.5
        outcome = core.step(t)
        assert outcome is not None
        finished = [e for e in outcome.events if isinstance(e, FinishEvent)]
        if finished:
            return call, finished[0]


def test_final_and_completed_come_from_one_set_of_figures() -> None:
    call, event = _finished_call()
    outcome = CallOutcome.measured(call, event.state, "e1", event.finish_reason, 13.0)
    final, done = outcome.final(event.text), outcome.completed()
    assert final.finish_reason == done.finish_reason == "length"
    assert final.output_tokens == done.output_tokens == 3
    assert final.prompt_tokens == done.prompt_tokens == len(event.state.spec.prompt_ids) > 0
    shared = ("call_id", "program_id", "engine_id", "priority", "queue_wait_s", "service_s", "preemptions",
              "swap_bytes", "swap_s", "recomputed_tokens")
    for name in shared:
        assert getattr(final, name) == getattr(done, name), name
    assert done.service_s > 0 and final.total_s == pytest.approx(3.0)
    assert final.ttft_s > 0 and final.attempt == call.attempt and done.parents == call.parents
    assert done.completed_at == 13.0


def test_finish_reasons_include_handback_and_rejected() -> None:
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "handback", "rejected"]
    call, event = _finished_call()
    handed = CallOutcome.measured(call, event.state, "e1", FinishReason.HANDBACK, 1.0).completed()
    assert json.loads(encode(handed))["finish_reason"] == "handback"
    assert completed_message_id(handed) == f"e1:c1:{call.attempt}:handback" and call.attempt > 0
    rejected = CallOutcome.rejected(call, "e2", 5.0).completed()
    assert rejected.finish_reason == REJECTED == "rejected"
    assert (rejected.service_s, rejected.output_tokens, rejected.completed_at) == (0.0, 0, 5.0)
    assert completed_message_id(rejected) == f"e2:c1:{call.attempt}:rejected"


# A final and a completed event as engines sent them before CallFigures existed (encoded by the code
# of commit 9cc255e): the shared base changes the order of their keys, never a key or a value.
FINAL_JSON = (
    b'{"type":"final","call_id":"c1","program_id":"p1","text":"hello","finish_reason":"length",'
    b'"prompt_tokens":5,"output_tokens":3,"engine_id":"e1","priority":2.5,"queue_wait_s":0.25,'
    b'"service_s":1.5,"ttft_s":0.75,"total_s":3.0,"preemptions":1,"swap_bytes":4096,"swap_s":0.125,'
    b'"recomputed_tokens":7,"attempt":2}'
)
COMPLETED_JSON = (
    b'{"call_id":"c1","program_id":"p1","engine_id":"e1","service_s":1.5,"queue_wait_s":0.25,'
    b'"prompt_tokens":5,"output_tokens":3,"finish_reason":"length","priority":2.5,"parents":["c0"],'
    b'"preemptions":1,"swap_bytes":4096,"swap_s":0.125,"recomputed_tokens":7,"completed_at":13.0,"attempt":2}'
)


def test_final_and_completed_keep_their_json_through_the_shared_figures() -> None:
    call = msgspec.structs.replace(_stamped(), priority=2.5, attempt=2, parents=["c0"])
    outcome = CallOutcome.of(
        call, "e1", FinishReason.LENGTH, 13.0, prompt_tokens=5, output_tokens=3, ttft_s=0.75, total_s=3.0,
        queue_wait_s=0.25, service_s=1.5, preemptions=1, swap_bytes=4096, swap_s=0.125, recomputed_tokens=7,
    )
    for message, old in ((outcome.final("hello"), FINAL_JSON), (outcome.completed(), COMPLETED_JSON)):
        new = json.loads(encode(message))
        assert new == json.loads(old), type(message).__name__
        assert decode(old, type(message)) == message  # what older engines send still decodes the same
    # the base holds every key the two share but the attempt (an int in a final, None from older
    # engines in a completed event)
    both = set(json.loads(FINAL_JSON)) & set(json.loads(COMPLETED_JSON))
    assert set(CallFigures.__struct_fields__) == both - {"attempt"}


def test_the_shared_figures_keep_each_message_s_required_fields() -> None:
    required = {"service_s", "queue_wait_s"}
    for name in required:
        missing = json.dumps({k: v for k, v in json.loads(COMPLETED_JSON).items() if k != name}).encode()
        with pytest.raises(msgspec.ValidationError, match=name):
            decode(missing, CallCompleted)
    for name in ("prompt_tokens", "output_tokens", "engine_id", "text", "finish_reason"):
        missing = json.dumps({k: v for k, v in json.loads(FINAL_JSON).items() if k != name}).encode()
        with pytest.raises(msgspec.ValidationError, match=name):
            decode(missing, CallReply)
    # a final need not carry the two figures only the completed event requires
    lean = json.dumps({k: v for k, v in json.loads(FINAL_JSON).items() if k not in required}).encode()
    assert decode(lean, CallReply) == msgspec.structs.replace(decode(FINAL_JSON, CallFinal), service_s=0.0,
                                                               queue_wait_s=0.0)


def test_a_final_s_finish_reasons_are_the_contract_s_but_rejected() -> None:
    final = json.loads(FINAL_JSON)
    for reason in FinishReason:
        data = json.dumps({**final, "finish_reason": reason.value}).encode()
        if reason is FinishReason.REJECTED:  # a refused call's caller gets an error, never a final
            with pytest.raises(msgspec.ValidationError):
                decode(data, CallReply)
        else:
            reply = decode(data, CallReply)
            assert isinstance(reply, CallFinal) and reply.finish_reason == reason


def test_error_codes_are_a_str_enum_with_unchanged_values() -> None:
    assert {c.name: c.value for c in ErrorCode} == {
        "BAD_JSON": "bad_json",
        "BAD_FIELD": "bad_field",
        "MISSING_PROGRAM_ID": "missing_program_id",
        "BAD_MAX_TOKENS": "bad_max_tokens",
        "EMPTY_MESSAGES": "empty_messages",
        "PROMPT_TOO_LONG": "prompt_too_long",
        "NO_ENGINE": "no_engine",
        "ENGINE_STOPPED": "engine_stopped",
        "ABORTED": "aborted",
        "DEADLINE_EXCEEDED": "deadline_exceeded",
        "RATE_LIMITED": "rate_limited",
        "INTERNAL": "internal",
    }
    assert ErrorCode.RATE_LIMITED == "rate_limited" and f"{ErrorCode.NO_ENGINE}" == "no_engine"
    error = CallError(call_id="c", code=ErrorCode.BAD_JSON, message="m")
    assert json.loads(encode(error))["code"] == "bad_json"


def test_program_end_reply_keeps_its_json_keys() -> None:
    row = ProgramSummary(
        program_id="p",
        service_s=1.0,
        critical_path_s=1.0,
        waiting_s=0.5,
        calls_completed=2,
        active_calls=0,
        engines=["e1"],
        first_seen_at=1.0,
        last_activity_at=2.0,
    )
    ok = json.loads(encode(ProgramEndReply(ok=True, program=row)))
    assert list(ok) == ["ok", "program"] and ok["ok"] is True
    assert ok["program"] == json.loads(encode(row))
    unknown = ProgramEndReply(ok=False, code="unknown_program", error="unknown program 'p'")
    assert json.loads(encode(unknown)) == {"ok": False, "code": "unknown_program", "error": "unknown program 'p'"}
    assert decode(encode(unknown), ProgramEndReply) == unknown
    assert decode(b'{"ok": true, "program": ' + encode(row) + b"}", ProgramEndReply).program == row
