"""The interface every model backend implements. Model execution only: no NATS, no asyncio.

The engine core (``engine/core.py``) decides *what* runs in each step; a backend only executes a
:class:`StepBatch` and keeps each sequence's KV cache. ``run`` is called from one worker thread at a
time; every other method is called from the event-loop thread *between* steps, never concurrently
with ``run``.

A sequence's life: ``run`` with its prompt tokens (prefill, possibly in chunks), then one token per
step (decode). ``release`` frees its KV. ``swap_out``/``swap_in`` move its KV to CPU memory and back
(preemption); ``drop`` discards it so the next ``run`` must recompute it from all its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a step.

    ``token_ids`` are appended to the sequence's KV cache at positions ``start_pos`` onward (the
    prompt, a chunk of it, or the last sampled token). When ``sample`` is true the backend samples
    the next token after the last of them.
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    sample: bool = True
    temperature: float = 0.0
    seed: int | None = None
    #: sequences with the same key may share cached prefixes (the engine fills in the program id)
    prefix_key: str | None = None


@dataclass(slots=True)
class StepBatch:
    work: list[SeqWork]

    @property
    def num_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.work)


@dataclass(slots=True)
class StepOutput:
    """Sampled token per sequence that asked for one, and the step's wall time in seconds."""

    next_tokens: dict[str, int]
    elapsed_s: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class SwapStats:
    bytes: int
    elapsed_s: float


@runtime_checkable
class ModelBackend(Protocol):
    name: str
    model_name: str
    #: Longest sequence (prompt + output) the model accepts.
    max_context: int
    #: Token ids that end a sequence unless the caller asked to ignore end-of-sequence.
    eos_token_ids: frozenset[int]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def run(self, batch: StepBatch) -> StepOutput: ...

    def release(self, seq_id: str) -> None: ...

    def swap_out(self, seq_id: str) -> SwapStats: ...

    def swap_in(self, seq_id: str) -> SwapStats: ...

    def drop(self, seq_id: str) -> None: ...

    def kv_bytes_per_token(self) -> int: ...
