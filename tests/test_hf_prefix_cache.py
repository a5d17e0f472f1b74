"""The ``hf`` prefix cache's bookkeeping on a tiny KV store (no model): hits, takeover, copies,
eviction order and the CPU tier. Each position's KV is filled with its token id, so a hit is
checked by reading the values back."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from autellix.engine.hf_kv import KVStore  # noqa: E402
from autellix.engine.hf_prefix_cache import RetainedKV  # noqa: E402


@pytest.fixture(autouse=True)
def _inference_mode():  # type: ignore[no-untyped-def]
    """The backend calls the cache under ``torch.inference_mode`` (its KV tensors are inference tensors)."""
    with torch.inference_mode():
        yield


def store(capacity: int = 64, tier_tokens: int = 0, enabled: bool = True) -> tuple[KVStore, RetainedKV]:
    kv = KVStore(
        num_layers=2,
        num_kv_heads=1,
        head_dim=2,
        max_context=512,
        max_batch=4,
        kv_capacity_tokens=capacity,
        swap_pool_bytes=0,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    return kv, RetainedKV(kv, enabled=enabled, tier_tokens=tier_tokens)


def feed(kv: KVStore, seq_id: str, tokens: list[int], program: str) -> None:
    """What a step does to the store: room for the tokens, then their KV written (here: the ids)."""
    start = kv.seqs[seq_id].length if seq_id in kv.seqs else 0
    seq = kv.extend(seq_id, start, tokens[start:], program)
    assert seq.slab is not None
    values = torch.tensor(tokens[start:], dtype=torch.float32)
    seq.slab.kv[:, :, seq.slot, :, start : len(tokens)] = values[None, None, None, :, None]


def finish(kv: KVStore, cache: RetainedKV, seq_id: str) -> None:
    cache.retain(kv.seqs.pop(seq_id))


def held(kv: KVStore, seq_id: str) -> list[int]:
    seq = kv.seqs[seq_id]
    assert seq.slab is not None
    k = seq.slab.kv[:, :, seq.slot, :, : seq.length]
    assert bool((k == k[0, 0, 0, :, :1]).all())  # every layer, K and V, every dim
    return [int(v) for v in k[0, 0, 0, :, 0].tolist()]


def test_next_turn_takes_over_the_whole_previous_context() -> None:
    kv, cache = store()
    turn1 = list(range(1, 11))
    feed(kv, "t1", turn1, "chat")
    finish(kv, cache, "t1")
    assert kv.resident_tokens == 0 and cache.cache_stats().retained_tokens == 10
    turn2 = [*turn1, 11, 12]
    assert cache.attach("t2", turn2, "chat") == 10
    assert held(kv, "t2") == turn1 and kv.resident_tokens == 10
    assert cache.cache_stats().retained_tokens == 0  # taken over, not copied
    feed(kv, "t2", turn2, "chat")
    assert held(kv, "t2") == turn2


def test_partial_hit_copies_and_keeps_the_entry_and_the_last_token_is_never_cached() -> None:
    kv, cache = store()
    feed(kv, "a", [1, 2, 3, 4, 5, 6], "p")
    finish(kv, cache, "a")
    assert cache.attach("b", [1, 2, 3, 9, 9], "q") == 3  # another program: a shared system prompt
    assert held(kv, "b") == [1, 2, 3]
    assert cache.cache_stats().retained_tokens == 6
    assert cache.attach("c", [1, 2, 3, 4, 5, 6], "p") == 5  # all but the last prompt token
    assert held(kv, "c") == [1, 2, 3, 4, 5]
    stats = cache.cache_stats()
    assert stats.prompt_tokens == 11 and stats.hit_tokens == 8


def test_siblings_arriving_together_share_the_parent_history() -> None:
    kv, cache = store()
    parent = [5, 6, 7, 8]
    feed(kv, "parent", parent, "lats")
    finish(kv, cache, "parent")
    assert cache.attach("child1", [*parent, 1, 1], "lats") == 4  # takes the entry over
    assert cache.attach("child2", [*parent, 2, 2], "lats") == 4  # copies from child1's slot
    assert held(kv, "child1") == parent and held(kv, "child2") == parent
    assert kv.resident_tokens == 8


def test_identical_context_is_retained_once() -> None:
    kv, cache = store()
    for sid in ("x", "y"):
        feed(kv, sid, [1, 2, 3], "p")
        finish(kv, cache, sid)
    assert len(cache.entries) == 1 and cache.cache_stats().retained_tokens == 3


def test_eviction_order_contained_then_ended_then_least_recently_used() -> None:
    kv, cache = store(capacity=40)
    feed(kv, "w", [50] * 6, "c")  # live, oldest
    finish(kv, cache, "w")
    feed(kv, "x", list(range(10)), "a")
    finish(kv, cache, "x")
    feed(kv, "y", list(range(15)), "a")  # extends x: x is contained
    finish(kv, cache, "y")
    feed(kv, "z", [70] * 5, "b")
    finish(kv, cache, "z")
    cache.end_program("b")
    programs = lambda: sorted(len(e.tokens) for e in cache.entries.values())  # noqa: E731
    assert programs() == [5, 6, 10, 15]
    assert cache.make_room(11)  # 36 retained + 11 > 40: one entry must go, the contained one
    assert programs() == [5, 6, 15]
    assert cache.make_room(19)  # then the ended program's
    assert programs() == [6, 15]
    assert cache.make_room(25)  # then the least recently used live one
    assert programs() == [15]
    assert cache.cache_stats().evictions == 3
    assert not cache.make_room(41)  # more than the budget: everything goes, and it says no
    assert programs() == []


def test_live_entry_goes_to_the_cpu_tier_and_a_hit_swaps_it_back() -> None:
    kv, cache = store(capacity=20, tier_tokens=12)
    ctx = list(range(100, 110))
    feed(kv, "a", ctx, "p")
    finish(kv, cache, "a")
    feed(kv, "b", [9] * 4, "ended")
    finish(kv, cache, "b")
    cache.end_program("ended")
    assert cache.make_room(20)  # both leave the device: the live one to the tier, the ended one for good
    stats = cache.cache_stats()
    assert stats.retained_tokens == 0 and stats.tiered_tokens == 10 and stats.evictions == 1
    assert cache.attach("next", [*ctx, 1, 2], "p") == 10
    assert held(kv, "next") == ctx
    stats = cache.cache_stats()
    assert stats.tier_hit_tokens == 10 and stats.tiered_tokens == 0 and cache.tier.used == 0
    assert stats.tier_capacity_tokens == 12 and stats.tier_in_s > 0  # the copy back in is timed


def test_tier_keeps_a_partial_source_and_evicts_in_order_when_full() -> None:
    kv, cache = store(capacity=10, tier_tokens=10)
    for sid, tok in (("old", 1), ("new", 2)):
        feed(kv, sid, [tok] * 6, sid)
        finish(kv, cache, sid)
        assert cache.make_room(10)
    # the tier holds 10 tokens: "old" was pushed out of it for "new"
    assert [e.tokens[0] for e in cache.entries.values()] == [2]
    assert cache.attach("hit", [2, 2, 2, 7], "x") == 3
    assert held(kv, "hit") == [2, 2, 2] and cache.cache_stats().tiered_tokens == 6


def test_disabled_cache_frees_on_release() -> None:
    kv, cache = store(enabled=False, tier_tokens=100)
    feed(kv, "a", [1, 2, 3], "p")
    finish(kv, cache, "a")
    assert cache.attach("b", [1, 2, 3, 4], "p") == 0 and not cache.entries
    assert all(s.used == 0 for s in kv.slabs.values())


def test_a_tiered_hit_source_is_never_pushed_out_while_it_is_copied() -> None:
    kv, cache = store(capacity=10, tier_tokens=10)
    feed(kv, "source", [3] * 6, "s")
    finish(kv, cache, "source")
    assert cache.make_room(10)  # the source moves to the tier
    feed(kv, "other", [4] * 8, "o")
    finish(kv, cache, "other")
    # the hit needs room on the device: "other" must leave, and the tier is full of the source
    assert cache.attach("hit", [3, 3, 3, 9], "x") == 3
    assert held(kv, "hit") == [3, 3, 3]
    assert [e.tokens[0] for e in cache.entries.values()] == [3]  # "other" was discarded instead


def test_lru_retention_ignores_containment() -> None:
    for retention, kept in (("program", [15]), ("lru", [10])):
        kv, cache = store(capacity=30)
        cache = type(cache)(kv, retention=retention)
        feed(kv, "long", list(range(15)), "a")
        finish(kv, cache, "long")
        feed(kv, "short", list(range(10)), "a")  # contained by "long", but the most recently used
        finish(kv, cache, "short")
        assert cache.make_room(10)  # 25 + 10 > 30: one goes
        assert sorted(len(e.tokens) for e in cache.entries.values()) == kept
