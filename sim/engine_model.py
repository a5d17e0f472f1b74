"""One simulated engine: continuous batching under a KV budget, chunked prefill, swap preemption.

The engine holds every call routed to it in its policy's queue (:mod:`autellix.policy.variants`),
running or waiting, and advances in *segments* of steps whose time comes from the shared
:class:`autellix.engine.cost_model.CostModel`:

- **KV**: a running call holds its whole prompt from admission (the cached prefix included) plus
  one token per generated token but the last (the next step writes it); the sum over running
  calls never exceeds the KV budget.
  Admission leaves a watermark (1% of the budget by default) for decode growth; when growth would
  overflow the budget the lowest call in queue order is swapped out (every policy, FCFS included:
  that is what vLLM does under KV pressure, swap instead of recompute here).
- **batch**: at most ``max_batch`` running calls; a step decodes one token for every call past its
  prefill and spends the rest of ``max_batched_tokens`` on prefill chunks, oldest admission first.
  The step that finishes a call's prefill also samples its first token.
- **scheduling points** every ``schedule_every`` steps (and whenever the engine is idle): the
  running calls are charged their service, the beta rule is applied, and, under a preemptive
  policy, waiting calls ahead in queue order displace running calls behind them (lowest first),
  each displaced call's KV swapped to CPU as one contiguous transfer at the cost model's rate and
  swapped back in when it is readmitted, so it resumes where it stopped. Between scheduling points
  waiting calls are admitted when they fit, in queue order, stopping at the first that does not.
- **prefix cache**: a finished call's prompt + output stays cached (in the KV the running calls
  leave free; :mod:`autellix.sim.context_pool`). A new call prefills only past the longest cached
  prefix of its prompt, as an engine matching cached blocks by content does: its context parent's
  context when that call (or any call whose context extends it, a sibling's say) is cached here, else
  the nearest ancestor's along the context chain whose context is, else nothing.
- **memory** (``SimEngineConfig.retain``, ``tier_tokens``): the cache evicts least recently used first
  (``lru``), or in the shared retention order (contained entries, then ended programs' contexts, then
  LRU). With a CPU tier, a context evicted from GPU KV whose program is still active (and that no
  other entry contains) is copied to a CPU pool of ``tier_tokens`` (the copy out overlaps the steps
  and is only counted); a later call whose longest cached prefix is there swaps it back in, its
  swap-in time charged to the next step, when that is cheaper than prefilling the tokens it adds over
  the GPU hit.
- **service** of a call is the time the engine spent on steps while the call was in the batch.

A segment is a single step when any call is prefilling, else a run of ``k`` pure decode steps with
a closed-form duration (step ``j`` reads ``kv0 + j * n`` context tokens): it ends at the next
completion, scheduling point (only when calls wait), or KV-growth limit. A call routed here in the
middle of a run cuts it at the next step boundary when it would fit.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from autellix.engine.cost_model import CostModel
from autellix.policy.balancer import EngineLoad
from autellix.policy.variants import CallQueue
from autellix.sim.context_pool import ContextPool
from autellix.sim.workload import CallSpec

QUEUED, PREFILL, DECODE, PAUSED, DONE = range(5)

#: the simulator's default scheduling interval (steps between scheduling points). The engine's own
#: default is 4 (``engine.core.CoreConfig.schedule_every``); the simulator keeps 8 because every
#: recorded simulator figure (bench/SIM_RESULTS.md) was made with it, and the live runs compared with
#: the simulator pass it to their engines (bench/live.py, bench/core_replay.py). Same name, same
#: meaning; pass ``--schedule-every`` to either to match the other.
SIM_SCHEDULE_EVERY = 8


@dataclass(frozen=True, slots=True)
class SimEngineConfig:
    cost: CostModel
    schedule_every: int = SIM_SCHEDULE_EVERY
    watermark: float = 0.01
    prefix_cache: bool = True
    #: evict in the retention order (contained, ended programs, LRU) instead of LRU
    retain: bool = False
    #: CPU pool for evicted contexts of active programs, in tokens; 0 = no tier
    tier_tokens: int = 0
    #: the door's retained figure also counts the latest context of programs with a call in flight
    #: (this model keeps that cached copy beside the running call's own KV; an engine that shares
    #: blocks would not)
    count_busy_contexts: bool = True

    def __post_init__(self) -> None:
        if self.schedule_every < 1:
            raise ValueError(f"schedule_every must be >= 1, got {self.schedule_every}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.tier_tokens < 0:
            raise ValueError(f"tier_tokens must be >= 0, got {self.tier_tokens}")


@dataclass(slots=True, eq=False)
class SimCall:
    """A call's run-time state. ``generated`` is exact except while decoding (see engine)."""

    key: str
    program: Any
    program_id: str
    spec: CallSpec
    prompt_tokens: int
    output_tokens: int
    #: the call whose context (prompt + output) this prompt extends, None when it extends none or
    #: the history was truncated to fit; a cache hit saves that call's context, or an ancestor's
    history: SimCall | None = None
    submit_s: float = 0.0
    engine: int = -1
    state: int = QUEUED
    prefilled: int = 0
    generated: int = 0
    gen_base: int = 0
    step_base: int = 0
    kv_contrib: int = 0
    epoch: int = 0
    busy_base: float = 0.0
    service_s: float = 0.0
    charged_s: float = 0.0
    queue_wait_s: float = 0.0
    waiting_since: float = 0.0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    cached_tokens: int = 0
    preemptions: int = 0
    admissions: int = 0
    completions: int = 0


class SimEngine:
    def __init__(self, index: int, config: SimEngineConfig, queue: CallQueue, preemptive: bool) -> None:
        cost = config.cost
        self.index = index
        self.config = config
        self.cost = cost
        self.queue = queue
        self.preemptive = preemptive
        self.kv_capacity_tokens = cost.kv_capacity_tokens
        self.admit_limit = int(cost.kv_capacity_tokens * (1.0 - config.watermark))
        self.calls: dict[str, SimCall] = {}
        self.running: dict[str, SimCall] = {}
        self.prefilling: dict[str, SimCall] = {}
        self.n_decode = 0
        self.kv_fixed = 0
        self.step_count = 0
        self.busy_s = 0.0
        self.steps_since_sched = 0
        self.queued_tokens = 0
        self._finish: list[tuple[int, int, str, int]] = []
        self._extra_s = 0.0
        #: cached contexts in GPU KV, and (with a tier) in the CPU pool
        self.cache = ContextPool(config.retain)
        self.tier = ContextPool(config.retain) if config.tier_tokens else None
        #: program id -> its calls queued or running here; -> its latest finished call's context
        self._inflight: dict[str, int] = {}
        self._latest: dict[str, int] = {}
        #: sum of the latest contexts of the active programs with no call here (see retained_tokens)
        self.idle_context_tokens = 0
        # current segment
        self.busy = False
        self.version = 0
        self.seg_start = 0.0
        self.seg_end = 0.0
        self.seg_steps = 0
        self._seg_chunks: list[tuple[SimCall, int]] = []
        self._seg_multi = False
        self._seg_extra = 0.0
        self._seg_lin = 0.0
        self._seg_quad = 0.0
        self._seg_since_sched = 0
        # counters
        self.stat_steps = 0
        self.stat_preemptions = 0
        self.stat_swap_s = 0.0
        self.stat_prefill_tokens = 0
        self.stat_prompt_tokens = 0
        self.stat_cache_hit_tokens = 0
        self.stat_evicted_active_tokens = 0
        self.stat_tier_out_tokens = 0
        self.stat_tier_in_tokens = 0
        self.stat_tier_s = 0.0
        self.stat_tier_out_s = 0.0

    # --- views --------------------------------------------------------------------------------
    @property
    def kv_used(self) -> int:
        return self.kv_fixed + self.n_decode * self.step_count

    def load(self) -> EngineLoad:
        return EngineLoad(str(self.index), self.kv_used, self.queued_tokens)

    def retained_tokens(self) -> int:
        """The KV active programs between calls will want back: for each active program whose
        latest call finished here and that has no call queued or running here, that call's context
        (its next call extends it), whether it is still cached, in the tier or was evicted. Not the
        cache's contents: the cache fills free KV with anything, stale branches of a tree search
        included, and would look full at any load."""
        return self.idle_context_tokens

    def _idle_change(self, program_id: str, inflight: int, latest: int | None) -> None:
        """Set a program's in-flight count (and latest context), keeping idle_context_tokens."""
        count_busy = self.config.count_busy_contexts
        before = self._latest.get(program_id, 0) if count_busy or not self._inflight.get(program_id) else 0
        if inflight:
            self._inflight[program_id] = inflight
        else:
            self._inflight.pop(program_id, None)
        if latest is not None:
            self._latest[program_id] = latest
        after = self._latest.get(program_id, 0) if count_busy or not inflight else 0
        self.idle_context_tokens += after - before

    def end_program(self, program_id: str) -> None:
        """The program's last call finished: its contexts go first when KV is needed."""
        self._idle_change(program_id, self._inflight.get(program_id, 0), 0)
        self._latest.pop(program_id, None)
        self.cache.end_program(program_id)
        if self.tier is not None:
            self.tier.end_program(program_id)

    @staticmethod
    def _need(c: SimCall) -> int:
        """KV a (re)admitted call holds: its prompt, plus its generated tokens but the last (whose
        KV the next step writes)."""
        return c.prompt_tokens + max(c.generated - 1, 0)

    def _fits(self, need: int) -> bool:
        return len(self.running) < self.cost.max_batch and self.kv_used + need <= self.admit_limit

    # --- arrivals -----------------------------------------------------------------------------
    def enqueue(
        self, c: SimCall, priority: float, now: float, program_wait_s: float, program_service_s: float
    ) -> float | None:
        """Accept a call. Returns a new segment end when the running segment was cut short."""
        if c.prompt_tokens + c.output_tokens > self.admit_limit:
            raise ValueError(
                f"call {c.key} needs {c.prompt_tokens + c.output_tokens} KV tokens; "
                f"the engine admits at most {self.admit_limit}"
            )
        c.engine = self.index
        c.state = QUEUED
        self._idle_change(c.program_id, self._inflight.get(c.program_id, 0) + 1, None)
        c.waiting_since = now
        self.calls[c.key] = c
        self.queue.add(c.key, priority, now, program_wait_s=program_wait_s, program_service_s=program_service_s)
        self.queued_tokens += self._need(c)
        if self.busy and self._seg_multi and now < self.seg_end:
            if self._fits(self._need(c)):
                return self._cut(now, at_sched_point=False)
            if self.preemptive:
                return self._cut(now, at_sched_point=True)
        return None

    def _cut(self, now: float, at_sched_point: bool) -> float | None:
        """End the running decode run at the first step boundary at or after ``now`` (with
        ``at_sched_point``: the first scheduling point at or after it)."""
        dt = now - self.seg_start - self._seg_extra
        a, b = self._seg_quad, self._seg_lin
        if dt <= 0:
            j = 1
        elif a > 0:
            j = max(1, math.ceil((-b + math.sqrt(b * b + 4.0 * a * dt)) / (2.0 * a) - 1e-9))
        else:
            j = max(1, math.ceil(dt / b - 1e-9))
        while j > 1 and a * (j - 1) ** 2 + b * (j - 1) >= dt:
            j -= 1
        while a * j * j + b * j < dt and j < self.seg_steps:
            j += 1
        if at_sched_point:
            every = self.config.schedule_every
            first = max(1, every - self._seg_since_sched)
            if j > first:
                j = first + math.ceil((j - first) / every) * every
            else:
                j = first
        if j >= self.seg_steps:
            return None
        self.seg_steps = j
        self.seg_end = self.seg_start + self._seg_extra + a * j * j + b * j
        self.version += 1
        return self.seg_end

    # --- segment end --------------------------------------------------------------------------
    def on_step_end(self, now: float) -> list[SimCall]:
        """Apply the segment that ends at ``now``; returns the calls that completed."""
        self.busy = False
        k = self.seg_steps
        self.step_count += k
        self.steps_since_sched += k
        self.stat_steps += k
        self.busy_s += self.seg_end - self.seg_start
        done: list[SimCall] = []
        for c, t in self._seg_chunks:
            c.prefilled += t
            if c.prefilled < c.prompt_tokens:
                continue
            del self.prefilling[c.key]
            self.kv_fixed -= c.kv_contrib
            c.generated = 1
            if c.first_token_s < 0:
                c.first_token_s = now
            if c.generated >= c.output_tokens:
                c.kv_contrib = 0
                self._finish_call(c, now, decoding=False)
                done.append(c)
            else:
                self._start_decode(c)
        self._seg_chunks = []
        heap = self._finish
        while heap and heap[0][0] <= self.step_count:
            _, _, key, epoch = heapq.heappop(heap)
            c = self.calls.get(key)
            if c is None or c.epoch != epoch or c.state != DECODE:
                continue
            c.generated = c.output_tokens
            self._finish_call(c, now, decoding=True)
            done.append(c)
        return done

    def _start_decode(self, c: SimCall) -> None:
        c.state = DECODE
        c.gen_base = c.generated
        c.step_base = self.step_count
        c.kv_contrib = c.prompt_tokens + c.generated - 1 - self.step_count
        self.kv_fixed += c.kv_contrib
        self.n_decode += 1
        c.epoch += 1
        finish = self.step_count + c.output_tokens - c.generated
        heapq.heappush(self._finish, (finish, c.admissions, c.key, c.epoch))

    def _finish_call(self, c: SimCall, now: float, decoding: bool) -> None:
        if decoding:
            self.n_decode -= 1
            self.kv_fixed -= c.kv_contrib
        c.kv_contrib = 0
        c.service_s += self.busy_s - c.busy_base
        c.state = DONE
        c.finish_s = now
        c.completions += 1
        del self.running[c.key]
        del self.calls[c.key]
        self.queue.remove(c.key)
        self._idle_change(c.program_id, self._inflight[c.program_id] - 1, c.prompt_tokens + c.output_tokens)
        if self.config.prefix_cache:
            self._cache_put(c)

    # --- planning -----------------------------------------------------------------------------
    def plan(self, now: float) -> float | None:
        """Schedule at ``now`` and start the next segment; returns its end, or None when idle."""
        sched = self.steps_since_sched >= self.config.schedule_every or not self.running
        if sched:
            self.steps_since_sched = 0
            if self.preemptive:
                self._charge_running()
            self.queue.promote_starved(now)
        if self.queue.waiting_count():
            self._fill(now, preempt=sched and self.preemptive)
        # make room for the next step's KV growth
        while self.n_decode and self.kv_used + self.n_decode > self.kv_capacity_tokens:
            self._preempt(self._lowest_running(), now)
        if not self.running:
            self.busy = False
            return None
        return self._start_segment(now)

    def _charge_running(self) -> None:
        busy = self.busy_s
        for c in self.running.values():
            total = c.service_s + busy - c.busy_base
            delta = total - c.charged_s
            if delta > 0:
                self.queue.charge(c.key, delta)
                c.charged_s = total

    def _lowest_running(self) -> SimCall:
        key = self.queue.sort_key
        return self.running[max(self.running, key=key)]

    def _fill(self, now: float, preempt: bool) -> None:
        """Admit waiting calls in queue order; with ``preempt``, displace running calls behind."""
        q = self.queue
        victims: list[tuple[tuple[float, int], str]] | None = None
        while True:
            key = next(q.order_waiting(), None)
            if key is None:
                return
            c = self.calls[key]
            need = self._need(c)
            if not self._fits(need):
                if not preempt:
                    return
                ck = q.sort_key(key)
                if victims is None:
                    victims = sorted(((q.sort_key(k), k) for k in self.running), reverse=True)
                while not self._fits(need) and victims and victims[0][0] > ck:
                    _, vk = victims.pop(0)
                    self._preempt(self.running[vk], now)
                if not self._fits(need):
                    return
            self._admit(c, now)

    def _admit(self, c: SimCall, now: float) -> None:
        self.queue.started(c.key, now)
        c.queue_wait_s += now - c.waiting_since
        self.queued_tokens -= self._need(c)
        c.admissions += 1
        if c.state == QUEUED:
            hit = self._cache_hit(c)
            c.prefilled = c.cached_tokens = hit
            self.stat_cache_hit_tokens += hit
            self.stat_prompt_tokens += c.prompt_tokens
        else:  # PAUSED: swap the KV back in
            swap = self.cost.swap_time(c.prefilled + max(c.generated - 1, 0))
            self._extra_s += swap
            self.stat_swap_s += swap
        self.running[c.key] = c
        c.busy_base = self.busy_s
        if c.prefilled < c.prompt_tokens:
            c.state = PREFILL
            c.kv_contrib = c.prompt_tokens
            self.kv_fixed += c.kv_contrib
            self.prefilling[c.key] = c
        else:
            self._start_decode(c)
        self._cache_trim()

    def _preempt(self, c: SimCall, now: float) -> None:
        if c.state == DECODE:
            c.generated = c.gen_base + self.step_count - c.step_base
            self.n_decode -= 1
            c.epoch += 1
        else:
            del self.prefilling[c.key]
        self.kv_fixed -= c.kv_contrib
        c.kv_contrib = 0
        swap = self.cost.swap_time(c.prefilled + max(c.generated - 1, 0))
        self._extra_s += swap
        self.stat_swap_s += swap
        self.stat_preemptions += 1
        c.preemptions += 1
        c.service_s += self.busy_s - c.busy_base
        del self.running[c.key]
        c.state = PAUSED
        delta = c.service_s - c.charged_s
        if delta > 0:
            self.queue.charge(c.key, delta)
            c.charged_s = c.service_s
        self.queue.stopped(c.key, now)
        c.waiting_since = now
        self.queued_tokens += self._need(c)

    def _start_segment(self, now: float) -> float:
        cost = self.cost
        extra, self._extra_s = self._extra_s, 0.0
        n = self.n_decode
        kv0 = self.kv_used
        self.busy = True
        self.version += 1
        self.seg_start = now
        self._seg_extra = extra
        self._seg_since_sched = self.steps_since_sched
        if self.prefilling:
            budget = cost.max_batched_tokens - n
            chunks = []
            total = 0
            for c in self.prefilling.values():
                if budget <= 0:
                    break
                t = min(c.prompt_tokens - c.prefilled, budget)
                chunks.append((c, t))
                budget -= t
                total += t
            self._seg_chunks = chunks
            self._seg_multi = False
            self.seg_steps = 1
            self.stat_prefill_tokens += total
            self.seg_end = now + extra + cost.step_time(total, n, kv0)
            return self.seg_end
        heap = self._finish
        while heap:
            _, _, key, epoch = heap[0]
            c = self.calls.get(key)
            if c is not None and c.epoch == epoch and c.state == DECODE:
                break
            heapq.heappop(heap)
        k = heap[0][0] - self.step_count
        if self.preemptive and self.queue.waiting_count():
            k = min(k, max(1, self.config.schedule_every - self.steps_since_sched))
        k = max(1, min(k, (self.kv_capacity_tokens - kv0) // n))
        a = cost.kv_read_s_per_token * n / 2.0
        b = cost.base_s + cost.decode_s_per_seq * n + cost.kv_read_s_per_token * kv0 - a
        self._seg_multi = True
        self._seg_quad, self._seg_lin = a, b
        self.seg_steps = k
        self.seg_end = now + extra + a * k * k + b * k
        return self.seg_end

    # --- prefix cache -------------------------------------------------------------------------
    def _cache_put(self, c: SimCall) -> None:
        """Cache ``c``'s context; it covers its own context and every ancestor's on its chain."""
        self.cache.put(c, c.prompt_tokens + c.output_tokens)
        self._cache_trim()

    def _cache_hit(self, c: SimCall) -> int:
        """Prompt tokens of ``c`` the cache saves: the nearest covered ancestor's context, in GPU KV
        or (when swapping it in beats prefilling the difference) in the CPU tier."""
        hit = 0
        a = c.history
        while a is not None:
            if self.cache.covers(a.key):
                if a.key in self.cache:
                    self.cache.touch(a.key)
                hit = min(a.prompt_tokens + a.output_tokens, c.prompt_tokens - 1)
                break
            a = a.history
        tier = self.tier
        if tier is None or not len(tier):
            return hit
        b = c.history
        while b is not None and b is not a:
            if tier.covers(b.key):
                break
            b = b.history
        if b is None or b is a:
            return hit
        tokens = b.prompt_tokens + b.output_tokens
        tier_hit = min(tokens, c.prompt_tokens - 1)
        swap = self.cost.swap_time(tokens)
        if tier_hit <= hit or swap >= self.cost.recompute_time(tier_hit - hit):
            return hit
        self._extra_s += swap
        self.stat_tier_s += swap
        self.stat_tier_in_tokens += tokens
        if b.key in tier:
            moved, t = tier.remove(b.key)
            self.cache.put(moved, t)  # back in GPU KV: the call's siblings hit it there
        return tier_hit

    def _cache_trim(self) -> None:
        cache, tier = self.cache, self.tier
        free = self.kv_capacity_tokens - self.kv_used
        while cache.tokens > free:
            key = cache.victim()
            if key is None:
                break
            kept = cache.is_kept(key)
            c, tokens = cache.remove(key)
            if not kept:
                continue
            self.stat_evicted_active_tokens += tokens
            if tier is not None:
                # the copy out overlaps the steps (a DMA on its own stream, as vLLM's CPU offloading
                # does): counted, not charged; the copy back in is on the next call's critical path
                self.stat_tier_out_s += self.cost.swap_time(tokens)
                self.stat_tier_out_tokens += tokens
                tier.put(c, tokens)
                limit = self.config.tier_tokens
                while tier.tokens > limit:
                    victim = tier.victim()
                    if victim is None:
                        break
                    tier.remove(victim)

    # --- checks -------------------------------------------------------------------------------
    def audit(self) -> None:
        """Recompute KV and batch from scratch and check the invariants (tests only; O(n))."""
        kv = 0
        decoding = 0
        for c in self.running.values():
            if c.state == PREFILL:
                kv += c.prompt_tokens
            elif c.state == DECODE:
                kv += c.prompt_tokens + c.gen_base - 1 + self.step_count - c.step_base
                decoding += 1
            else:
                raise AssertionError(f"call {c.key} is running in state {c.state}")
        if kv != self.kv_used or decoding != self.n_decode:
            raise AssertionError(f"engine {self.index}: KV {kv} != {self.kv_used} or {decoding} != {self.n_decode}")
        if self.kv_used > self.kv_capacity_tokens:
            raise AssertionError(f"engine {self.index}: KV {self.kv_used} over budget {self.kv_capacity_tokens}")
        if len(self.running) > self.cost.max_batch:
            raise AssertionError(f"engine {self.index}: batch {len(self.running)} over {self.cost.max_batch}")
