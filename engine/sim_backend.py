"""The ``sim`` backend: no model. Step times come from the cost model; tokens are placeholders.

Used to run the whole mesh at scale on a CPU. Text is "tokenised" one token per whitespace-
separated word; generated tokens decode to ``" tok"`` each. The backend never emits an
end-of-sequence token, so every call runs to ``max_tokens``. ``time_scale`` multiplies every
modelled duration (0 makes steps instantaneous, 1 is real time on the modelled GPU). A sampled
token's id encodes its position, so a resumed or recomputed sequence can be checked for exactness.

**Prefix cache** (:class:`autellix.engine.backend.PrefixCache`; on by default, as in the simulator,
:mod:`autellix.sim.engine_model`): ``release`` retains what a sequence was fed as an entry of its
work's ``prefix_key`` (the engine fills in the program id) in the KV the resident sequences leave free
of ``kv_capacity_tokens``. ``attach_prefix`` gives a newly admitted sequence the longest common prefix
with one of its program's entries, so an agent call that re-sends its history prefills only its new
input when its context parent (or a sibling holding the same history) ran here. Generated tokens are
retained as the text they decode to (``" tok"``), so a prompt that quotes an earlier answer matches
it. At least one prompt token is always computed. As in the simulator, a running sequence holds its
own KV beside the entry it started from (no block sharing is modelled).

**Memory** (:mod:`autellix.engine.sim_context_store`): ``retention="lru"`` evicts the least recently
used entry first (the simulator's ``lru``); ``"program"`` evicts entries another entry contains first,
then ended programs' (:meth:`end_prefix`), then the least recently used. With ``tier_tokens > 0`` an
evicted entry worth keeping (``lru``: any; ``program``: a live program's, not contained) moves to a CPU
tier of that many tokens instead of being lost; a later call whose longest prefix is there swaps it
back in when ``cost.swap_time`` of the entry is less than prefilling the tokens it adds over the
device hit, else prefills them. The copy back in is charged to the next step (one contiguous copy:
the next call waits for it); the copy out overlaps the steps (a DMA on its own stream, as vLLM's CPU
offloading does) and is only counted, as in the simulator.

**Virtual time** (``clock=VirtualClock()``): nothing sleeps; every modelled duration (a step, a
swap) advances the clock and is reported as the elapsed time, so a driver that reads the clock
(:meth:`autellix.engine.core.EngineCore.step`) sees the modelled GPU's timeline. ``time_scale`` does
not apply.

**Pacing** (``pace=True``, off by default): while sequences stay resident from one step to the
next, the time the engine spent between two steps (its own scheduling, bookkeeping and
publishing) is taken out of the next step's sleep, so that back-to-back steps take their modelled
time times ``time_scale`` of wall time, not that plus the host's overhead. Used by the live
benchmark to run the modelled GPU faster than real time on a slow CPU; when the overhead exceeds a
step's scaled time the engine falls behind and the step takes the overhead.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Sequence
from typing import cast

from .backend import CacheStats, StepBatch, StepOutput, SwapStats
from .cost_model import CostModel, llama31_8b_h100
from .sim_context_store import ContextStore, Retention, common_prefix

__all__ = ["SimBackend", "VirtualClock", "common_prefix"]

#: Token ids below this are "words" of the prompt; generated tokens use ids from here on.
_GENERATED = 50_000


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _GENERATED


#: word -> its token id, for the words seen lately: a CRC per word was most of tokenising a prompt
_WORD_IDS: dict[str, int] = {}
_MAX_WORD_IDS = 1 << 16


def _word_ids(words: list[str]) -> list[int]:
    ids = list(map(_WORD_IDS.get, words))
    if None in ids:
        if len(_WORD_IDS) > _MAX_WORD_IDS:
            _WORD_IDS.clear()
        for i, word in enumerate(words):
            if ids[i] is None:
                ids[i] = _WORD_IDS[word] = _word_id(word)
    return cast(list[int], ids)  # every None was filled in


#: what a generated token is as prompt text (it decodes to " tok")
_TOK_ID = _word_id("tok")


def _as_text(token_ids: Sequence[int]) -> list[int]:
    """Token ids as the content they match: a generated token is the word it decodes to."""
    return [_TOK_ID if t >= _GENERATED else t for t in token_ids]


class VirtualClock:
    """Modelled time for a :class:`SimBackend` that does not sleep: the backend advances it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += max(seconds, 0.0)
        return max(seconds, 0.0)


class SimBackend:
    name = "sim"

    def __init__(
        self,
        cost: CostModel | None = None,
        time_scale: float = 1.0,
        prefix_cache: bool = True,
        pace: bool = False,
        kv_capacity_tokens: int | None = None,
        clock: VirtualClock | None = None,
        swap_pool_bytes: int | None = None,
        retention: Retention = "lru",
        tier_tokens: int = 0,
    ) -> None:
        self.cost = cost or llama31_8b_h100()
        self.time_scale = time_scale
        self.clock = clock
        #: the preemption swap pool (CPU); None: unbounded, as the simulator models it
        self.swap_pool_capacity_bytes = sys.maxsize if swap_pool_bytes is None else swap_pool_bytes
        self.prefix_cache = prefix_cache
        self.pace = pace
        #: retained entries live in the KV that resident sequences leave free out of this budget
        self.kv_capacity_tokens = kv_capacity_tokens if kv_capacity_tokens is not None else self.cost.kv_capacity_tokens
        if tier_tokens < 0:
            raise ValueError(f"tier_tokens must be >= 0, got {tier_tokens}")
        self.tier_tokens = tier_tokens
        self.model_name = f"sim:{self.cost.name}"
        self.max_context = self.cost.max_context
        self.eos_token_ids: frozenset[int] = frozenset()
        self._kv: dict[str, int] = {}
        self._swapped: dict[str, int] = {}
        # per live sequence: what it was fed (as text), its key, whether its last work sampled
        self._fed: dict[str, list[int]] = {}
        self._key: dict[str, str] = {}
        self._sampled: dict[str, bool] = {}
        self._counted: set[str] = set()
        self.device = ContextStore(retention)
        self.tier = ContextStore(retention) if tier_tokens else None
        #: tier swap-ins not yet charged: the next step pays them
        self._pending_s = 0.0
        self._last_end: float | None = None
        self.stats = CacheStats()
        self.stat_steps = 0
        #: modelled time of tier copies in (charged) and out (overlapped, not charged)
        self.stat_tier_s = 0.0
        self.stat_tier_out_s = 0.0

    # -- text ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return _word_ids(prompt.split())

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids.append(1)  # a role marker, as a chat template would add
            ids.extend(self.encode_prompt(m["content"]))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(" tok" if t >= _GENERATED else " w" for t in token_ids)

    # -- execution ---------------------------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        """The forward pass's modelled time (tier transfers owed are added by ``run``)."""
        prefill = decode = context = 0
        for w in batch.work:
            n = len(w.token_ids)
            if n == 1 and w.start_pos > 0:
                decode += 1
            else:
                prefill += n
            context += w.start_pos + n
        return self.cost.step_time(prefill, decode, context)

    def run(self, batch: StepBatch) -> StepOutput:
        started = time.perf_counter()
        resident = bool(self._kv)
        if self.prefix_cache:
            fed_all, keys, sampled = self._fed, self._key, self._sampled
            for w in batch.work:
                fed = fed_all.get(w.seq_id)
                if fed is None:  # never attached (a backend user without the engine core)
                    fed = fed_all[w.seq_id] = []
                    if w.prefix_key is not None:
                        keys[w.seq_id] = w.prefix_key
                del fed[w.start_pos :]
                fed.extend(_as_text(w.token_ids))
                sampled[w.seq_id] = w.sample
        modelled = self.step_time(batch) + self._pending_s
        self._pending_s = 0.0
        if self.clock is not None:
            elapsed = self.clock.advance(modelled)
        else:
            elapsed = self._wait(modelled * self.time_scale, started, resident)
        out: dict[str, int] = {}
        for w in batch.work:
            end = w.start_pos + len(w.token_ids)
            self._kv[w.seq_id] = end
            if w.sample:
                out[w.seq_id] = _GENERATED + end % 1000
        self.stat_steps += 1
        if self.prefix_cache:
            self._trim()
        return StepOutput(next_tokens=out, elapsed_s=elapsed)

    def _wait(self, seconds: float, started: float, resident: bool) -> float:
        """Sleep for the step's scaled time; with pacing, less the overhead since the last step.
        Returns the step's duration (with pacing: from the previous step's end)."""
        start = started
        if self.pace and resident and self._last_end is not None and self._last_end < started:
            start = self._last_end  # the engine was busy in between: its overhead counts as step time
        end = start + max(seconds, 0.0)
        now = time.perf_counter()
        if end > now:
            time.sleep(end - now)
            self._last_end = end
        else:  # behind: no debt is carried into the next step
            self._last_end = now = time.perf_counter()
        return (self._last_end - start) if self.pace else (time.perf_counter() - started)

    def release(self, seq_id: str) -> None:
        """The sequence finished: free its KV and retain what it was fed."""
        self._kv.pop(seq_id, None)
        self._swapped.pop(seq_id, None)
        self._counted.discard(seq_id)
        if self.prefix_cache:
            fed = self._fed.get(seq_id)
            key = self._key.get(seq_id)
            sampled = self._sampled.get(seq_id, False)
            self._forget(seq_id)
            if fed and key is not None:
                if sampled:
                    fed.append(_TOK_ID)  # the last sampled token, never fed back
                self.device.put(seq_id, key, fed)
                self._trim()

    def _sleep(self, seconds: float) -> float:
        """Spend a modelled duration (unscaled): on the virtual clock, or asleep for its scaled time."""
        if self.clock is not None:
            return self.clock.advance(seconds)
        seconds *= self.time_scale
        if seconds > 0:
            time.sleep(seconds)
        return seconds

    def swap_out(self, seq_id: str) -> SwapStats:
        tokens = self._kv.pop(seq_id, 0)
        self._swapped[seq_id] = tokens
        elapsed = self._sleep(self.cost.swap_time(tokens))
        return SwapStats(bytes=tokens * self.cost.kv_bytes_per_token, elapsed_s=elapsed)

    def swap_in(self, seq_id: str) -> SwapStats:
        tokens = self._swapped.pop(seq_id, 0)
        self._kv[seq_id] = tokens
        elapsed = self._sleep(self.cost.swap_time(tokens))
        return SwapStats(bytes=tokens * self.cost.kv_bytes_per_token, elapsed_s=elapsed)

    def drop(self, seq_id: str) -> None:
        """Discard the sequence's KV (recomputed later, after a new ``attach_prefix``); not retained."""
        self._kv.pop(seq_id, None)
        self._swapped.pop(seq_id, None)
        self._forget(seq_id)

    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token

    def kv_tokens_used(self) -> int:
        return sum(self._kv.values())

    def kv_tokens_capacity(self) -> int:
        return self.kv_capacity_tokens

    def swap_pool_bytes_used(self) -> int:
        return sum(self._swapped.values()) * self.cost.kv_bytes_per_token

    # -- prefix cache ------------------------------------------------------------------------
    def attach_prefix(self, seq_id: str, token_ids: Sequence[int], prefix_key: str | None) -> int:
        stats = self.stats
        first = seq_id not in self._counted
        if first:
            self._counted.add(seq_id)
            stats.prompt_tokens += len(token_ids)
        if not self.prefix_cache or prefix_key is None or not token_ids:
            return 0
        ids = _as_text(token_ids)
        limit = len(ids) - 1  # the last prompt token is always computed
        self.device.revive_program(prefix_key)
        if self.tier is not None:
            self.tier.revive_program(prefix_key)
        key, hit = self.device.longest(prefix_key, ids)
        hit = min(hit, limit)
        if key is not None:
            self.device.touch(key)
        tier = self.tier
        if tier is not None and len(tier):
            tkey, thit = tier.longest(prefix_key, ids)
            thit = min(thit, limit)
            if tkey is not None and thit > hit:
                size = len(tier.tokens_of(tkey))
                swap = self.cost.swap_time(size)
                if swap < self.cost.recompute_time(thit - hit):
                    self._pending_s += swap
                    self.stat_tier_s += swap
                    program_id, tokens = tier.remove(tkey)
                    self.device.put(tkey, program_id, tokens)  # back in device KV: siblings hit it there
                    if first:
                        stats.tier_hit_tokens += thit
                    hit = thit
        if first:
            stats.hit_tokens += hit
        self._kv[seq_id] = hit
        self._fed[seq_id] = ids[:hit]
        self._key[seq_id] = prefix_key
        self._sampled[seq_id] = False
        self._trim()
        return hit

    def end_prefix(self, prefix_key: str) -> None:
        self.device.end_program(prefix_key)
        if self.tier is not None:
            self.tier.end_program(prefix_key)

    def cache_stats(self) -> CacheStats:
        s = self.stats
        return CacheStats(
            prompt_tokens=s.prompt_tokens,
            hit_tokens=s.hit_tokens,
            tier_hit_tokens=s.tier_hit_tokens,
            retained_tokens=self.device.tokens,
            tiered_tokens=self.tier.tokens if self.tier is not None else 0,
            evictions=s.evictions,
            tier_capacity_tokens=self.tier_tokens,
            tier_in_s=self.stat_tier_s,
        )

    def _forget(self, seq_id: str) -> None:
        self._fed.pop(seq_id, None)
        self._key.pop(seq_id, None)
        self._sampled.pop(seq_id, None)

    def _trim(self) -> None:
        """Evict retained entries until they fit in what resident sequences leave free."""
        device, tier = self.device, self.tier
        free = self.kv_capacity_tokens - sum(self._kv.values())
        while device.tokens > free:
            key = device.victim()
            if key is None:
                return
            kept = device.is_kept(key)
            program_id, tokens = device.remove(key)
            if not kept or tier is None:
                self.stats.evictions += 1
                continue
            self.stat_tier_out_s += self.cost.swap_time(len(tokens))
            tier.put(key, program_id, tokens)
            while tier.tokens > self.tier_tokens:
                victim = tier.victim()
                if victim is None:
                    break
                tier.remove(victim)
                self.stats.evictions += 1
