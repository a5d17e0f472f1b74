"""The prefix cache's radix tree on its own (no model): longest match, containment, pruning."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from autellix.engine.hf_prefix_tree import PrefixTree, common_prefix


def test_common_prefix_across_chunk_boundaries() -> None:
    a = list(range(200))
    assert common_prefix(a, a) == 200
    assert common_prefix(a, [*a[:130], -1]) == 130
    assert common_prefix(a, a[64:70], 64) == 6
    assert common_prefix(a, []) == 0


def test_longest_match_and_an_entry_that_holds_it() -> None:
    t: PrefixTree[str] = PrefixTree()
    t.insert("sys+a", [1, 2, 3, 10, 11])
    t.insert("sys+b", [1, 2, 3, 20])
    m, node = t.match([1, 2, 3, 10, 99])
    assert m == 4 and t.pick(node) == "sys+a"
    m, node = t.match([1, 2, 3, 30])  # the shared system prompt hits, whichever program left it
    assert m == 3 and t.pick(node) in {"sys+a", "sys+b"}
    assert t.pick(node, prefer=lambda k: k == "sys+b") == "sys+b"
    assert t.match([7, 8])[0] == 0
    assert t.find([1, 2, 3, 20]) == "sys+b" and t.find([1, 2, 3]) is None


def test_an_entry_another_extends_is_contained_until_that_one_goes() -> None:
    t: PrefixTree[str] = PrefixTree()
    t.insert("turn1", [1, 2, 3])
    assert not t.contained("turn1")
    affected = t.insert("turn2", [1, 2, 3, 4, 5])
    assert "turn1" in affected and t.contained("turn1") and not t.contained("turn2")
    t.insert("sibling", [1, 2, 9])  # shares a prefix but does not extend turn1's whole context
    assert not t.contained("sibling")
    affected = t.remove("turn2")
    assert "turn1" in affected and not t.contained("turn1")
    assert t.match([1, 2, 3, 4])[0] == 3


def test_remove_prunes_and_merges_nodes() -> None:
    t: PrefixTree[int] = PrefixTree()
    t.insert(0, [1, 2, 3, 4])
    t.insert(1, [1, 2, 5])
    t.remove(1)
    assert next(iter(t.root.children.values())).edge == [1, 2, 3, 4]  # the split is undone
    t.remove(0)
    assert not t.root.children and len(t) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=12), st.randoms())
def test_matches_and_containment_agree_with_brute_force(seqs: list[list[int]], rnd: random.Random) -> None:
    t: PrefixTree[int] = PrefixTree()
    live: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        if any(v == s for v in live.values()):
            continue  # the cache never retains two identical contexts
        t.insert(i, s)
        live[i] = s
        if live and rnd.random() < 0.3:
            gone = rnd.choice(sorted(live))
            t.remove(gone)
            del live[gone]
        for q in seqs:
            want = max((common_prefix(q, v) for v in live.values()), default=0)
            m, node = t.match(q)
            assert m == want
            if m:
                key = t.pick(node)
                assert key is not None and live[key][:m] == q[:m]
        for k, v in live.items():
            others = [w for j, w in live.items() if j != k]
            assert t.contained(k) == any(w[: len(v)] == v for w in others)
