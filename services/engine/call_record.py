"""One call as the engine service holds it: the stamped call, the core's record built from it, and
the figures its end is reported with.

The stamped call is turned into the core's :class:`CoreCall` in one place (:func:`core_call`; the
core makes the call's queue entry from that), and a finished call is measured once
(:class:`CallOutcome`): the caller's ``final`` and the tracker's ``completed`` event are two views
of the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autellix.engine.core import CallState, CoreCall
from autellix.proto import CallCompleted, CallFinal, FinishReason, StampedCall


@dataclass(slots=True)
class InFlight:
    call: StampedCall
    chunks: int = 0
    #: token ids the caller has received (a hand-back resumes after them)
    sent_ids: list[int] = field(default_factory=list)
    #: tokens whose text the detokeniser still holds back
    pending_ids: list[int] = field(default_factory=list)
    #: (offset, text) of every chunk sent: a newer attempt of the call is answered from here
    texts: list[tuple[int, str]] = field(default_factory=list)

    def sent_all(self) -> list[int]:
        """Every output token id the caller was sent, from the call's first attempt on."""
        return list(self.call.resume_token_ids) + self.sent_ids


def core_call(call: StampedCall, prompt_ids: list[int]) -> CoreCall:
    """The core's record of a stamped call, with its prompt encoded."""
    return CoreCall(
        call_id=call.call_id,
        program_id=call.program_id,
        prompt_ids=prompt_ids,
        max_tokens=call.max_tokens,
        priority=call.priority,
        temperature=call.temperature,
        seed=call.seed,
        ignore_eos=call.ignore_eos,
        program_wait_s=call.program_wait_s,
        program_service_s=call.program_service_s,
        resume_ids=list(call.resume_token_ids),
    )


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """A call's end on this engine, measured once."""

    call: StampedCall
    engine_id: str
    finish_reason: str
    #: Unix seconds
    completed_at: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_wait_s: float = 0.0
    service_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    preemptions: int = 0
    swap_bytes: int = 0
    swap_s: float = 0.0
    recomputed_tokens: int = 0

    @classmethod
    def measured(
        cls, call: StampedCall, state: CallState, engine_id: str, finish_reason: str, now: float
    ) -> CallOutcome:
        """The figures the core kept for a call that ran (or waited) here."""
        return cls(
            call=call,
            engine_id=engine_id,
            finish_reason=finish_reason,
            completed_at=now,
            prompt_tokens=len(state.spec.prompt_ids),
            output_tokens=len(state.output_ids),
            queue_wait_s=max(0.0, state.queue_wait_s),
            service_s=max(0.0, state.service_s),
            ttft_s=(state.first_token_at - state.arrived_at) if state.first_token_at else 0.0,
            total_s=now - state.arrived_at,
            preemptions=state.preemptions,
            swap_bytes=state.swap_bytes,
            swap_s=max(0.0, state.swap_s),
            recomputed_tokens=state.recomputed_tokens,
        )

    @classmethod
    def rejected(cls, call: StampedCall, engine_id: str, now: float) -> CallOutcome:
        """A call refused before it ran: nothing measured, its place among its program's calls released."""
        return cls(call=call, engine_id=engine_id, finish_reason=FinishReason.REJECTED, completed_at=now)

    def final(self, text: str) -> CallFinal:
        """The caller's last message."""
        return CallFinal(
            call_id=self.call.call_id,
            program_id=self.call.program_id,
            text=text,
            finish_reason=self.finish_reason,  # type: ignore[arg-type]  # stop | length | abort here
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            engine_id=self.engine_id,
            priority=self.call.priority,
            queue_wait_s=self.queue_wait_s,
            service_s=self.service_s,
            ttft_s=self.ttft_s,
            total_s=self.total_s,
            preemptions=self.preemptions,
            swap_bytes=self.swap_bytes,
            swap_s=self.swap_s,
            recomputed_tokens=self.recomputed_tokens,
            attempt=self.call.attempt,
        )

    def completed(self) -> CallCompleted:
        """The event the tracker (and the schedulers) count the call's service from."""
        return CallCompleted(
            call_id=self.call.call_id,
            program_id=self.call.program_id,
            engine_id=self.engine_id,
            service_s=self.service_s,
            queue_wait_s=self.queue_wait_s,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            finish_reason=self.finish_reason,
            priority=self.call.priority,
            parents=self.call.parents,
            preemptions=self.preemptions,
            swap_bytes=self.swap_bytes,
            swap_s=self.swap_s,
            recomputed_tokens=self.recomputed_tokens,
            completed_at=self.completed_at,
            attempt=self.call.attempt,
        )
