"""The ``sim`` backend: no model. Step times come from the cost model; tokens are placeholders.

Used to run the whole mesh at scale on a CPU. Text is "tokenised" one token per whitespace-
separated word; generated tokens decode to ``" tok"`` each. The backend never emits an
end-of-sequence token, so every call runs to ``max_tokens``. ``time_scale`` multiplies every
modelled duration (0 makes steps instantaneous, 1 is real time on the modelled GPU).

**Prefix cache** (on by default, as in the simulator, :mod:`autellix.sim.engine_model`): when a
sequence is released its tokens stay cached, keyed by the work's ``prefix_key`` (the engine fills in
the program id), least recently used first out, in the KV the resident sequences leave free. A
prefill chunk is charged only for its positions past the longest common prefix with a cached
sequence of the same key, so an agent call that re-sends its history prefills only its new input
when its context parent ran on this engine. Generated tokens are cached as the text they decode
to (``" tok"``), so a prompt that quotes an earlier answer matches it. At least one prompt token is
always computed.

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
from collections import OrderedDict
from collections.abc import Sequence

from .backend import SeqWork, StepBatch, StepOutput, SwapStats
from .cost_model import CostModel, llama31_8b_h100

#: Token ids below this are "words" of the prompt; generated tokens use ids from here on.
_GENERATED = 50_000


def _word_id(word: str) -> int:
    return zlib.crc32(word.encode()) % _GENERATED


#: what a generated token is as prompt text (it decodes to " tok")
_TOK_ID = _word_id("tok")


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons, C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


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
        kv_budget_tokens: int | None = None,
        clock: VirtualClock | None = None,
        swap_pool_bytes: int | None = None,
    ) -> None:
        self.cost = cost or llama31_8b_h100()
        self.time_scale = time_scale
        self.clock = clock
        #: the preemption swap pool (CPU); None: unbounded, as the simulator models it
        self.swap_pool_capacity_bytes = sys.maxsize if swap_pool_bytes is None else swap_pool_bytes
        self.prefix_cache = prefix_cache
        self.pace = pace
        #: the cache lives in the KV that resident sequences leave free out of this budget
        self.kv_budget_tokens = kv_budget_tokens if kv_budget_tokens is not None else self.cost.kv_budget_tokens
        self.model_name = f"sim:{self.cost.name}"
        self.max_context = self.cost.max_context
        self.eos_token_ids: frozenset[int] = frozenset()
        self._kv: dict[str, int] = {}
        self._swapped: dict[str, int] = {}
        # prefix cache: tokens fed per live sequence (generated ones as _TOK_ID), its key, its hit
        self._fed: dict[str, list[int]] = {}
        self._sampled: dict[str, int] = {}
        self._key: dict[str, str] = {}
        self._hit: dict[str, int] = {}
        #: (prefix key, seq id) -> cached token ids, least recently used first
        self._cache: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}
        self._cache_tokens = 0
        self._last_end: float | None = None
        self.stat_prompt_tokens = 0
        self.stat_cache_hit_tokens = 0
        self.stat_steps = 0

    # -- text ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return [_word_id(w) for w in prompt.split()]

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
        prefill = decode = context = 0
        for w in batch.work:
            n = len(w.token_ids)
            if n == 1 and w.start_pos > 0:
                decode += 1
            else:
                prefill += n - self._cached_in(w)
            context += w.start_pos + n
        return self.cost.step_time(prefill, decode, context)

    def run(self, batch: StepBatch) -> StepOutput:
        started = time.perf_counter()
        resident = bool(self._kv)
        if self.prefix_cache:
            for w in batch.work:
                self._feed(w)
        if self.clock is not None:
            elapsed = self.clock.advance(self.step_time(batch))
        else:
            elapsed = self._wait(self.step_time(batch) * self.time_scale, started, resident)
        out: dict[str, int] = {}
        for w in batch.work:
            end = w.start_pos + len(w.token_ids)
            self._kv[w.seq_id] = end
            if w.sample:
                out[w.seq_id] = _GENERATED + end % 1000
                if self.prefix_cache:
                    self._sampled[w.seq_id] = self._sampled.get(w.seq_id, 0) + 1
        self.stat_steps += 1
        if self.prefix_cache:
            self._cache_trim()
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
        self._kv.pop(seq_id, None)
        self._swapped.pop(seq_id, None)
        if self.prefix_cache:
            self._cache_put(seq_id)

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
        self._kv.pop(seq_id, None)
        self._swapped.pop(seq_id, None)
        self._forget(seq_id)  # recomputed from scratch later: not a finished context to cache

    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token

    def kv_tokens_used(self) -> int:
        return sum(self._kv.values())

    def kv_tokens_capacity(self) -> int:
        return self.kv_budget_tokens

    def swap_pool_bytes_used(self) -> int:
        return sum(self._swapped.values()) * self.cost.kv_bytes_per_token

    # -- prefix cache ------------------------------------------------------------------------
    def _cached_in(self, w: SeqWork) -> int:
        """How many of ``w``'s prefill tokens the prefix cache saves (0 for a decode token)."""
        hit = self._hit.get(w.seq_id, 0)
        if not self.prefix_cache or hit <= w.start_pos or (len(w.token_ids) == 1 and w.start_pos > 0):
            return 0
        saved = min(hit, w.start_pos + len(w.token_ids)) - w.start_pos
        if saved >= len(w.token_ids) and w.sample:
            saved = len(w.token_ids) - 1  # the last prompt token is always computed
        return max(saved, 0)

    def _feed(self, w: SeqWork) -> None:
        """Record ``w``'s tokens; on a prefill chunk, find the longest cached common prefix."""
        fed = self._fed.get(w.seq_id)
        if fed is None or w.start_pos == 0:
            fed = self._fed[w.seq_id] = []
            self._hit[w.seq_id] = 0
            self._sampled[w.seq_id] = 0
            if w.prefix_key is not None:
                self._key[w.seq_id] = w.prefix_key
        del fed[w.start_pos :]
        fed.extend(_TOK_ID if t >= _GENERATED else t for t in w.token_ids)
        if len(w.token_ids) == 1 and w.start_pos > 0:
            return  # a decode token
        key = w.prefix_key
        hit = self._hit[w.seq_id]
        if key is not None and hit >= w.start_pos:  # still matching a cached sequence
            best, best_sid = hit, None
            for sid in self._by_key.get(key, ()):
                entry = self._cache[(key, sid)]
                if len(entry) > best and entry[:best] == fed[:best]:
                    common = _common_prefix(entry, fed)
                    if common > best:
                        best, best_sid = common, sid
            if best_sid is not None:
                self._hit[w.seq_id] = best
                self._cache.move_to_end((key, best_sid))
        if w.sample:  # the prompt's last chunk: count it once
            prompt = w.start_pos + len(w.token_ids)
            self.stat_prompt_tokens += prompt
            self.stat_cache_hit_tokens += min(self._hit[w.seq_id], prompt - 1)

    def _cache_put(self, seq_id: str) -> None:
        fed = self._fed.get(seq_id)
        key = self._key.get(seq_id)
        sampled = self._sampled.get(seq_id, 0)
        self._forget(seq_id)
        if fed is None or key is None or not fed:
            return
        entry = list(fed)
        if sampled:
            entry.append(_TOK_ID)  # the last sampled token, never fed back
        self._cache[(key, seq_id)] = entry
        self._by_key.setdefault(key, set()).add(seq_id)
        self._cache_tokens += len(entry)
        self._cache_trim()

    def _forget(self, seq_id: str) -> None:
        self._fed.pop(seq_id, None)
        self._sampled.pop(seq_id, None)
        self._key.pop(seq_id, None)
        self._hit.pop(seq_id, None)

    def _cache_trim(self) -> None:
        free = self.kv_budget_tokens - sum(self._kv.values())
        while self._cache_tokens > free and self._cache:
            (key, sid), entry = self._cache.popitem(last=False)
            self._cache_tokens -= len(entry)
            ids = self._by_key.get(key)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del self._by_key[key]

    def cache_stats(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.stat_prompt_tokens,
            "cache_hit_tokens": self.stat_cache_hit_tokens,
            "cached_tokens": self._cache_tokens,
            "steps": self.stat_steps,
        }
