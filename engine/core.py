"""The engine's batching core: which calls run in each step, and what their results mean.

Pure and synchronous (no NATS, no asyncio, no clocks: ``now`` is passed in). The engine service
calls ``schedule`` -> runs the returned :class:`StepBatch` on the backend in a worker thread ->
``update``, and adds or aborts calls between steps. Tests and benchmarks drive it the same way.

Continuous batching: calls join the running batch as soon as a slot and KV room are free and leave
it the step they finish. Waiting calls are admitted in priority order (lower stamped priority first,
then arrival). Prompts are prefilled in chunks within a per-step token budget.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from .backend import ModelBackend, SeqWork, StepBatch, StepOutput
from .detokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_batch: int = 32
    #: tokens per step across the batch (decode tokens + prefill chunks)
    max_batched_tokens: int = 2048
    #: KV tokens the engine may hold (a call reserves prompt + max_tokens on admission)
    kv_capacity_tokens: int = 65_536


class CallPhase(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class CallSpec:
    """What the core needs to know about a call."""

    call_id: str
    program_id: str
    prompt_ids: list[int]
    max_tokens: int
    priority: float = 0.0
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(slots=True)
class CallState:
    spec: CallSpec
    arrived_at: float
    seq: int
    phase: CallPhase = CallPhase.WAITING
    output_ids: list[int] = field(default_factory=list)
    kv_len: int = 0  # tokens already in the backend's KV for this call
    reserved: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    service_s: float = 0.0
    emitted_chars: int = 0
    detok: IncrementalDetokenizer | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.spec.prompt_ids + self.output_ids

    @property
    def queue_wait_s(self) -> float:
        return 0.0 if self.admitted_at is None else self.admitted_at - self.arrived_at


@dataclass(frozen=True, slots=True)
class TokenEvent:
    call_id: str
    token_ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class FinishEvent:
    call_id: str
    finish_reason: str  # "stop" | "length" | "abort"
    state: CallState
    text: str


CoreEvent = TokenEvent | FinishEvent


@dataclass(frozen=True, slots=True)
class CoreLoad:
    running: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_free: int
    kv_tokens_queued: int


class EngineCore:
    def __init__(self, backend: ModelBackend, config: CoreConfig | None = None) -> None:
        self.backend = backend
        self.config = config or CoreConfig()
        self._calls: dict[str, CallState] = {}
        self._waiting: list[tuple[float, int, str]] = []  # heap of (priority, seq, call_id)
        self._running: list[str] = []
        self._seq = itertools.count()
        self._reserved = 0

    # -- admission ---------------------------------------------------------------------------
    def validate(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a call can never run here, as a sentence; None when it can."""
        ctx = self.backend.max_context
        if prompt_len + max_tokens > ctx:
            return (
                f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_len + max_tokens}, beyond the model's context of {ctx} tokens"
            )
        if prompt_len + max_tokens > self.config.kv_capacity_tokens:
            return (
                f"the call needs {prompt_len + max_tokens} KV tokens, more than this engine's "
                f"KV capacity of {self.config.kv_capacity_tokens}"
            )
        return None

    def add(self, spec: CallSpec, now: float) -> None:
        if spec.call_id in self._calls:
            raise ValueError(f"call {spec.call_id!r} is already on this engine")
        if not spec.prompt_ids:
            raise ValueError("a call needs at least one prompt token")
        state = CallState(spec=spec, arrived_at=now, seq=next(self._seq))
        state.detok = IncrementalDetokenizer(self.backend.decode)
        self._calls[spec.call_id] = state
        heapq.heappush(self._waiting, (spec.priority, state.seq, spec.call_id))

    def abort(self, call_id: str) -> FinishEvent | None:
        """Drop a call wherever it is; frees its KV now. None if the call is not here."""
        state = self._calls.get(call_id)
        if state is None or state.phase is CallPhase.FINISHED:
            return None
        return self._finish(state, "abort")

    def has(self, call_id: str) -> bool:
        return call_id in self._calls

    @property
    def idle(self) -> bool:
        return not self._calls

    def load(self) -> CoreLoad:
        queued = sum(
            len(self._calls[cid].spec.prompt_ids) + self._calls[cid].spec.max_tokens
            for _, _, cid in self._waiting
            if cid in self._calls
        )
        used = sum(self._calls[cid].kv_len for cid in self._running)
        return CoreLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_tokens_used=used,
            kv_tokens_free=self.config.kv_capacity_tokens - self._reserved,
            kv_tokens_queued=queued,
        )

    # -- the step ----------------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        cfg = self.config
        while self._waiting and len(self._running) < cfg.max_batch:
            _, _, call_id = self._waiting[0]
            state = self._calls.get(call_id)
            if state is None or state.phase is not CallPhase.WAITING:
                heapq.heappop(self._waiting)  # aborted while waiting
                continue
            need = len(state.spec.prompt_ids) + state.spec.max_tokens
            if self._reserved + need > cfg.kv_capacity_tokens:
                break  # strict priority order: do not let a smaller, lower-priority call jump it
            heapq.heappop(self._waiting)
            state.phase = CallPhase.RUNNING
            state.admitted_at = now
            state.reserved = need
            self._reserved += need
            self._running.append(call_id)

    def schedule(self, now: float) -> StepBatch | None:
        """Admit what fits and build the next step; None when there is nothing to run."""
        self._admit(now)
        budget = self.config.max_batched_tokens
        work: list[SeqWork] = []
        # decode tokens first (one each), then prefill chunks with the rest of the budget
        prefilling: list[CallState] = []
        for call_id in self._running:
            state = self._calls[call_id]
            ids_len = len(state.spec.prompt_ids) + len(state.output_ids)
            if state.kv_len == ids_len - 1 and state.output_ids:
                work.append(self._work(state, state.output_ids[-1:], sample=True))
                budget -= 1
            else:
                prefilling.append(state)
        for state in prefilling:
            if budget <= 0:
                break
            pending = state.all_ids[state.kv_len :]
            chunk = pending[:budget]
            work.append(self._work(state, chunk, sample=len(chunk) == len(pending)))
            budget -= len(chunk)
        return StepBatch(work=work) if work else None

    def _work(self, state: CallState, token_ids: list[int], sample: bool) -> SeqWork:
        spec = state.spec
        return SeqWork(
            seq_id=spec.call_id,
            token_ids=token_ids,
            start_pos=state.kv_len,
            sample=sample,
            temperature=spec.temperature,
            seed=spec.seed,
        )

    def update(self, batch: StepBatch, output: StepOutput, now: float) -> list[CoreEvent]:
        """Apply a step's results; returns token and finish events in batch order."""
        events: list[CoreEvent] = []
        eos = self.backend.eos_token_ids
        for work in batch.work:
            state = self._calls.get(work.seq_id)
            if state is None or state.phase is not CallPhase.RUNNING:
                continue  # aborted while the step ran
            state.kv_len = work.start_pos + len(work.token_ids)
            state.service_s += output.elapsed_s
            token = output.next_tokens.get(work.seq_id)
            if token is None:
                continue
            state.output_ids.append(token)
            if state.first_token_at is None:
                state.first_token_at = now
            stop = token in eos and not state.spec.ignore_eos
            if stop:
                state.output_ids.pop()  # the EOS token is not part of the answer
            elif state.detok is not None:
                text = state.detok.push(state.output_ids)
                state.emitted_chars += len(text)
                events.append(TokenEvent(work.seq_id, [token], text))
            if stop:
                events.append(self._finish(state, "stop"))
            elif len(state.output_ids) >= state.spec.max_tokens:
                events.append(self._finish(state, "length"))
        return events

    def _finish(self, state: CallState, reason: str) -> FinishEvent:
        call_id = state.spec.call_id
        if state.phase is CallPhase.RUNNING:
            self._running.remove(call_id)
            self._reserved -= state.reserved
            state.reserved = 0
            self.backend.release(call_id)
        state.phase = CallPhase.FINISHED
        del self._calls[call_id]
        text = self.backend.decode(state.output_ids)
        return FinishEvent(call_id=call_id, finish_reason=reason, state=state, text=text)

    def call_ids(self) -> Sequence[str]:
        return list(self._calls)
