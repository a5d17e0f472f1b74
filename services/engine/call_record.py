"""One call as the engine service holds it: the stamped call, the core's record built from it, and
the figures its end is reported with.

The stamped call is turned into the core's :class:`CoreCall` in one place (:func:`core_call`; the
core makes the call's queue entry from that), and a finished call is measured once
(:class:`CallOutcome`): the caller's ``final`` and the tracker's ``completed`` event are two views
of the same :class:`CallFigures`, built by one method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from autellix.engine.core import CallState, CoreCall
from autellix.proto import CallCompleted, CallFigures, CallFinal, FinishReason, StampedCall

_Ended = TypeVar("_Ended", CallFinal, CallCompleted)


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
    """A call's end on this engine, measured once: its :class:`CallFigures` (what the caller's final
    and the completed event share) and what only one of the two carries."""

    call: StampedCall
    figures: CallFigures
    #: Unix seconds
    completed_at: float
    ttft_s: float = 0.0
    total_s: float = 0.0

    @classmethod
    def of(
        cls,
        call: StampedCall,
        engine_id: str,
        finish_reason: str,
        now: float,
        *,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        ttft_s: float = 0.0,
        total_s: float = 0.0,
        **figures: Any,
    ) -> CallOutcome:
        """``call``'s end on ``engine_id``, with the other measured :class:`CallFigures` fields in ``figures``."""
        measured = CallFigures(
            call_id=call.call_id,
            program_id=call.program_id,
            engine_id=engine_id,
            finish_reason=finish_reason,
            priority=call.priority,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            **figures,
        )
        return cls(call, measured, now, ttft_s, total_s)

    @classmethod
    def measured(
        cls, call: StampedCall, state: CallState, engine_id: str, finish_reason: str, now: float
    ) -> CallOutcome:
        """The figures the core kept for a call that ran (or waited) here."""
        return cls.of(
            call,
            engine_id,
            finish_reason,
            now,
            ttft_s=(state.first_token_at - state.arrived_at) if state.first_token_at else 0.0,
            total_s=now - state.arrived_at,
            prompt_tokens=len(state.spec.prompt_ids),
            output_tokens=len(state.output_ids),
            queue_wait_s=max(0.0, state.queue_wait_s),
            service_s=max(0.0, state.service_s),
            preemptions=state.preemptions,
            swap_bytes=state.swap_bytes,
            swap_s=max(0.0, state.swap_s),
            recomputed_tokens=state.recomputed_tokens,
        )

    @classmethod
    def rejected(cls, call: StampedCall, engine_id: str, now: float) -> CallOutcome:
        """A call refused before it ran: nothing measured, its place among its program's calls released."""
        return cls.of(call, engine_id, FinishReason.REJECTED, now)

    def final(self, text: str) -> CallFinal:
        """The caller's last message (finish_reason stop, length or abort here)."""
        return self._message(CallFinal, text=text, ttft_s=self.ttft_s, total_s=self.total_s)

    def completed(self) -> CallCompleted:
        """The event the tracker (and the schedulers) count the call's service from."""
        return self._message(CallCompleted, parents=self.call.parents, completed_at=self.completed_at)

    def _message(self, kind: type[_Ended], **own: Any) -> _Ended:
        """The one builder of both: the shared figures, the attempt, and ``own`` fields of ``kind``."""
        return kind(**msgspec.structs.asdict(self.figures), attempt=self.call.attempt, **own)
