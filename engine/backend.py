"""The interface every model backend implements. Model execution only: no NATS, no asyncio.

The engine core (``engine/core.py``) decides *what* runs in each step; a backend only executes a
:class:`StepBatch` and keeps each sequence's KV cache. ``run`` is called from one worker thread at a
time; every other method is called from the event-loop thread *between* steps, never concurrently
with ``run``.

A sequence's life: ``run`` with its prompt tokens (prefill, possibly in chunks), then one token per
step (decode). ``release`` frees its KV. ``swap_out``/``swap_in`` move its KV to CPU memory and back
(preemption); ``drop`` discards it so the next ``run`` must recompute it from all its tokens.

Optional capabilities are declared as protocols of their own (:class:`SwapPool`,
:class:`KVCapacity`, :class:`PrefixCache`) and tested with ``isinstance``, never probed with
``getattr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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


@runtime_checkable
class SwapPool(Protocol):
    """Optional capability: preempted sequences' KV goes to a CPU pool of bounded size.

    The core swaps a displaced call out only while the pool has room for it, and recomputes it
    otherwise. A backend without the capability is taken to have an unbounded pool; one with a
    capacity of 0 always recomputes."""

    swap_pool_capacity_bytes: int

    def swap_pool_bytes_used(self) -> int: ...


@runtime_checkable
class KVCapacity(Protocol):
    """Optional capability: the backend knows how many KV tokens it can hold at once; the core
    admits no more than that (or its own configured capacity, whichever is smaller)."""

    def kv_tokens_capacity(self) -> int: ...


@dataclass(slots=True)
class CacheStats:
    """What a :class:`PrefixCache` holds now and has saved so far (counters are cumulative)."""

    #: prompt tokens of the sequences that asked for a prefix (``attach_prefix`` calls)
    prompt_tokens: int = 0
    #: of those, tokens served from retained KV instead of being prefilled (both tiers)
    hit_tokens: int = 0
    #: of the hits, tokens swapped back in from the CPU tier
    tier_hit_tokens: int = 0
    #: KV tokens retained in device memory now (finished sequences' contexts)
    retained_tokens: int = 0
    #: KV tokens retained in the CPU tier now
    tiered_tokens: int = 0
    #: retained entries evicted for good (not moved to the CPU tier)
    evictions: int = 0
    #: the CPU tier's size in tokens (0: none)
    tier_capacity_tokens: int = 0
    #: seconds spent copying contexts back in from the CPU tier (cumulative)
    tier_in_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def held(
        self, retained_tokens: int, tiered_tokens: int, tier_capacity_tokens: int, tier_in_s: float | None = None
    ) -> CacheStats:
        """These cumulative counters with what the cache holds now (``tier_in_s``: where the cache
        keeps that figure itself)."""
        tier_in_s = self.tier_in_s if tier_in_s is None else tier_in_s
        return replace(
            self,
            retained_tokens=retained_tokens,
            tiered_tokens=tiered_tokens,
            tier_capacity_tokens=tier_capacity_tokens,
            tier_in_s=tier_in_s,
        )


@runtime_checkable
class PrefixCache(Protocol):
    """Optional capability: the backend keeps finished sequences' KV and reuses it by content.

    - ``release(seq_id)`` *retains* the sequence's KV (the tokens it was fed) as an entry owned by
      its work's ``prefix_key`` (the engine sets it to the program id) instead of freeing it;
      ``drop`` never retains. Retained KV lives in what running sequences leave free of the KV
      budget and is evicted in :class:`autellix.policy.retention.RetentionIndex` order (contained
      entries, then ended programs', then least recently used); a backend with a CPU tier moves an
      evicted live entry there instead of discarding it.
    - ``attach_prefix`` is called by the engine core between steps, when a call that holds no KV
      is admitted (its first admission, or after its KV was dropped). It gives ``seq_id`` the
      longest retained prefix of ``token_ids`` (at most ``len(token_ids) - 1`` tokens: the last
      prompt token is always computed, so a token can be sampled) and returns how many tokens the
      sequence now holds; the core then prefills only the rest. It must be cheap: a backend may
      defer the copy or swap-in to its next ``run``, keeping the source entry pinned until then.
    - ``end_prefix(prefix_key)``: the program ended (the tracker said so); its entries go first.
    """

    def attach_prefix(self, seq_id: str, token_ids: Sequence[int], prefix_key: str | None) -> int: ...

    def end_prefix(self, prefix_key: str) -> None: ...

    def cache_stats(self) -> CacheStats: ...
