"""The ``hf`` backend's prefix cache: finished sequences' KV kept in their slots, found by content, tiered to CPU.

- **Retain.** When a call finishes, its sequence's slot is not freed: it becomes an *entry* (the
  tokens it was fed and their KV) owned by its program. Entries live in the KV budget that running
  sequences leave free: before a step, a swap-in or a hit needs room, entries are evicted in
  :class:`autellix.policy.retention.RetentionIndex` order (contained entries, then ended programs',
  then least recently used).
- **Match.** Entries are paths in a :class:`PrefixTree` over token ids, so a prompt finds the
  longest prefix any entry holds, whichever program left it (a shared system prompt hits across
  programs). A hit gives the new sequence the first ``m`` tokens' KV: when ``m`` is the whole entry
  the sequence *takes over* the entry's slot (no copy: the multi-turn chat case, where turn k+1
  re-sends turn k's history); otherwise the ``m`` tokens are copied into a fresh slot and the entry
  stays. Running sequences are sources too (copied from their slot between steps): when a
  tree-search node's children arrive together, the first takes the parent's entry over and the
  others copy the history from it.
- **One copy of a common prefix.** An entry whose tokens another entry extends is *contained*: it
  goes first, since every lookup that would hit it hits the longer one too.
- **CPU tier.** A live entry (not contained, program not ended) that must leave the device moves
  to a CPU pool in one contiguous copy (the preemption swap's layout); a later hit copies it back
  instead of recomputing. The tier evicts in the same order when full; contained and ended
  entries are discarded rather than tiered.

All copies happen in :meth:`RetainedKV.attach` (between steps, under the backend's lock): on CPU a
copy is a memcpy of ``m * kv_bytes_per_token`` bytes, orders of magnitude cheaper than the prefill
it saves, so deferring it to ``run`` would buy nothing but pinned-entry bookkeeping.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..policy.retention import RetentionIndex
from .backend import CacheStats
from .hf_kv import CpuPool, KVStore, Region, Seq, Slab
from .hf_prefix_tree import PrefixTree, common_prefix

#: the CPU tier's default size, in multiples of the device KV budget ...
DEFAULT_TIER_SCALE = 4
#: ... and at most this share of the machine's physical memory
DEFAULT_TIER_MEMORY_SHARE = 1 / 8
#: how entries are evicted: ``program`` (contained, then ended programs', then LRU) or plain ``lru``
RETENTIONS = ("program", "lru")


def default_tier_tokens(kv_capacity_tokens: int, bytes_per_token: int) -> int:
    """A few times the device budget, bounded by a share of physical memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 16 << 30
    return int(min(DEFAULT_TIER_SCALE * kv_capacity_tokens, physical * DEFAULT_TIER_MEMORY_SHARE // bytes_per_token))


@dataclass(slots=True)
class Entry:
    """A retained context: in a device slot (``slab``/``slot``) or in the CPU tier (``region``)."""

    program: str
    tokens: list[int]
    slab: Slab | None = None
    slot: int = -1
    region: Region | None = None


class RetainedKV:
    """Retained entries of one :class:`KVStore`: lookup, hits, eviction and the CPU tier."""

    def __init__(self, kv: KVStore, *, enabled: bool = True, tier_tokens: int = 0, retention: str = "program") -> None:
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {', '.join(RETENTIONS)}, got {retention!r}")
        self.kv = kv
        self.enabled = enabled
        #: ``lru`` ignores containment and ended programs (the baseline the program-aware order beats)
        self.program_aware = retention == "program"
        self.tree: PrefixTree[int] = PrefixTree()
        self.entries: dict[int, Entry] = {}
        self.index: RetentionIndex[int] = RetentionIndex()
        self.tier_index: RetentionIndex[int] = RetentionIndex()
        with torch.inference_mode():
            self.tier = CpuPool(kv.region_elems(tier_tokens) * kv.itemsize if enabled else 0, kv.dtype, pin=kv.cuda)
        self.tier_tokens = tier_tokens if enabled else 0
        self._keys = itertools.count()
        self.stats = CacheStats()

    # -- accounting ----------------------------------------------------------------------------
    def device_tokens(self) -> int:
        return self.index.tokens

    def cache_stats(self) -> CacheStats:
        return self.stats.held(self.index.tokens, self.tier_index.tokens, self.tier_tokens)

    def _index_of(self, entry: Entry) -> RetentionIndex[int]:
        return self.index if entry.slab is not None else self.tier_index

    def _recheck(self, keys: list[int]) -> None:
        if not self.program_aware:
            return
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                self._index_of(entry).set_contained(key, self.tree.contained(key))

    # -- retain --------------------------------------------------------------------------------
    def retain(self, seq: Seq) -> None:
        """A finished sequence (already out of the store's table): keep its slot as an entry, or free it."""
        kv = self.kv
        n = seq.length
        if not self.enabled or seq.slab is None or n == 0:
            kv.free_slot(seq)
            return
        tokens = seq.tokens[:n]
        same = self.tree.find(tokens)
        if same is not None:
            if self.entries[same].slab is not None:  # an identical context is on the device already
                self.index.touch(same)
                kv.free_slot(seq)
                return
            self._discard(same, evicted=False)  # the device copy replaces the tiered one
        key = next(self._keys)
        program = seq.prefix_key or ""
        entry = Entry(program, tokens, seq.slab, seq.slot)
        kv.resident_tokens -= n  # the slot leaves the running sequences for the retained ones
        seq.slab, seq.slot, seq.length = None, -1, 0
        self.entries[key] = entry
        affected = self.tree.insert(key, tokens)
        self.tier_index.revive_program(program)
        self.index.add(key, program, n, contained=self.program_aware and self.tree.contained(key))
        self._recheck(affected)

    def end_program(self, program: str) -> None:
        if not self.program_aware:
            return
        self.index.end_program(program)
        self.tier_index.end_program(program)

    # -- hits ----------------------------------------------------------------------------------
    def attach(self, seq_id: str, token_ids: Sequence[int], prefix_key: str | None) -> int:
        """Give a new sequence the longest retained prefix of ``token_ids`` (at most all but the last)."""
        kv = self.kv
        self.stats.prompt_tokens += len(token_ids)
        kv.forget(seq_id)  # it holds no KV by contract; never leave a stale slot behind
        if not self.enabled or len(token_ids) < 2:
            return 0
        query = list(token_ids[:-1])
        m, node = self.tree.match(query)
        source, running_m = self._running_source(query, m)
        if source is not None:
            return self._copy_from_running(seq_id, source, query[:running_m], prefix_key)
        if m == 0:
            return 0
        key = self.tree.pick(node, prefer=lambda k: self.entries[k].slab is not None)
        assert key is not None
        entry = self.entries[key]
        seq = Seq(tokens=query[:m], prefix_key=prefix_key)
        if entry.slab is not None and m == len(entry.tokens):
            # the whole entry: the sequence takes over its slot, no copy
            self._forget_entry(key)
            seq.slab, seq.slot, seq.length = entry.slab, entry.slot, m
            kv.resident_tokens += m
        else:
            if not self._make_room(m, pinned=key):
                return 0
            kv.place(seq, min(m + 1, kv.max_context))
            assert seq.slab is not None
            dst = seq.slab.kv[:, :, seq.slot, :, :m]
            if entry.slab is not None:
                dst.copy_(entry.slab.kv[:, :, entry.slot, :, :m])
                self.index.touch(key)
            else:
                assert entry.region is not None
                view = kv.region_view(self.tier, entry.region.offset, entry.region.length)
                t0 = time.perf_counter()
                dst.copy_(view[:, :, :, :m], non_blocking=kv.cuda)
                kv.sync()
                self.stats.tier_in_s += time.perf_counter() - t0
                self.stats.tier_hit_tokens += m
                if m == len(entry.tokens):
                    self._discard(key, evicted=False)  # swapped back in whole: the tier copy goes
                else:
                    self.tier_index.touch(key)
            seq.length = m
            kv.resident_tokens += m
        kv.seqs[seq_id] = seq
        self.stats.hit_tokens += m
        return m

    def _running_source(self, query: list[int], beat: int) -> tuple[Seq | None, int]:
        """A resident running sequence that holds more than ``beat`` tokens of ``query``, if any.

        Running sequences are sources too: when a tree-search node's children arrive together, the
        first takes over the parent's entry and the others copy the history from it."""
        best: Seq | None = None
        for seq in self.kv.seqs.values():
            if seq.slab is None or seq.length <= beat or not seq.tokens or seq.tokens[0] != query[0]:
                continue
            m = common_prefix(query, seq.tokens[: seq.length])
            if m > beat:
                best, beat = seq, m
        return best, beat

    def _copy_from_running(self, seq_id: str, source: Seq, tokens: list[int], prefix_key: str | None) -> int:
        kv = self.kv
        m = len(tokens)
        if not self._make_room(m, pinned=None):
            return 0
        seq = Seq(tokens=tokens, prefix_key=prefix_key)
        kv.place(seq, min(m + 1, kv.max_context))
        assert seq.slab is not None and source.slab is not None
        seq.slab.kv[:, :, seq.slot, :, :m].copy_(source.slab.kv[:, :, source.slot, :, :m])
        seq.length = m
        kv.resident_tokens += m
        kv.seqs[seq_id] = seq
        self.stats.hit_tokens += m
        return m

    # -- room ----------------------------------------------------------------------------------
    def make_room(self, extra: int) -> bool:
        """Evict retained entries until the running sequences can grow by ``extra`` tokens."""
        return self._make_room(extra, pinned=None)

    def _make_room(self, extra: int, pinned: int | None) -> bool:
        kv = self.kv
        budget = kv.kv_capacity_tokens
        while kv.resident_tokens + self.index.tokens + extra > budget:
            victim = next((k for k in self.index if k != pinned), None)
            if victim is None:
                break
            self._evict_device(victim, pinned)
        return kv.resident_tokens + self.index.tokens + extra <= budget

    def _evict_device(self, key: int, pinned: int | None = None) -> None:
        """Move a live entry to the CPU tier, or discard it (contained, ended, or no tier room).

        ``pinned`` (the source of a hit being served) is never pushed out of the tier to make room."""
        entry = self.entries[key]
        live = not self.program_aware or (not self.tree.contained(key) and not self.index.is_ended(entry.program))
        n = len(entry.tokens)
        size = self.kv.region_elems(n)
        if live and size <= self.tier.capacity:
            offset = self.tier.allocate(size)
            while offset is None:
                victim = next((k for k in self.tier_index if k != pinned), None)
                if victim is None:
                    break
                self._discard(victim)
                offset = self.tier.allocate(size)
            if offset is not None:
                assert entry.slab is not None
                view = self.kv.region_view(self.tier, offset, n)
                view.copy_(entry.slab.kv[:, :, entry.slot, :, :n], non_blocking=self.kv.cuda)
                self.kv.sync()
                self.kv.release_slot(entry.slab, entry.slot)
                entry.slab, entry.slot, entry.region = None, -1, Region(offset, n)
                self.index.remove(key)
                self.tier_index.add(key, entry.program, n, contained=self.program_aware and self.tree.contained(key))
                return
        self._discard(key)

    def _forget_entry(self, key: int) -> Entry:
        """Take an entry out of the tree and its index (its slot or region is the caller's)."""
        entry = self.entries.pop(key)
        self._index_of(entry).remove(key)
        self._recheck(self.tree.remove(key))
        return entry

    def _discard(self, key: int, evicted: bool = True) -> None:
        entry = self._forget_entry(key)
        if entry.slab is not None:
            self.kv.release_slot(entry.slab, entry.slot)
        if entry.region is not None:
            self.tier.release(entry.region.offset, self.kv.region_elems(entry.region.length))
        if evicted:
            self.stats.evictions += 1
