"""The shared eviction order for retained KV: contained, then ended programs, then LRU."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from autellix.policy.retention import RetentionIndex


def drain(index: RetentionIndex[str]) -> list[str]:
    out = []
    while (v := index.pop_victim()) is not None:
        out.append(v[0])
    return out


def test_lru_within_live_entries_and_touch_refreshes() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    idx.add("a", "p1", 10)
    idx.add("b", "p2", 20)
    idx.add("c", "p3", 30)
    idx.touch("a")
    assert idx.tokens == 60
    assert drain(idx) == ["b", "c", "a"]
    assert idx.tokens == 0


def test_contained_before_ended_before_live() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    idx.add("live-old", "p1", 5)
    idx.add("ended", "p2", 5)
    idx.add("turn1", "p3", 5)
    idx.add("turn2", "p3", 9)
    idx.set_contained("turn1", True)  # turn2 extends turn1
    idx.end_program("p2")
    assert list(idx) == ["turn1", "ended", "live-old", "turn2"]
    assert drain(idx) == ["turn1", "ended", "live-old", "turn2"]


def test_a_program_that_calls_again_is_live_again() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    idx.add("x", "p1", 5)
    idx.add("y", "p2", 5)
    idx.end_program("p2")
    assert idx.victim() == "y" and idx.is_ended("p2")
    idx.add("y2", "p2", 7)  # a new call of p2 finished: the program is active
    assert not idx.is_ended("p2")
    assert drain(idx) == ["x", "y", "y2"]


def test_program_totals_and_active_tokens() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    idx.add("a", "p1", 10)
    idx.add("b", "p1", 5, contained=True)
    idx.add("c", "p2", 7)
    assert idx.program_tokens("p1") == 15 and idx.program_tokens("p2") == 7
    idx.end_program("p2")
    assert idx.active_tokens() == 15
    assert idx.remove("a") == 10 and idx.program_tokens("p1") == 5
    assert idx.remove("missing") == 0
    idx.add("b", "p1", 8)  # replaces b (and is no longer contained)
    assert idx.program_tokens("p1") == 8 and idx.tokens == 15
    assert list(idx) == ["c", "b"]


def test_ending_an_unknown_program_is_a_no_op() -> None:
    idx: RetentionIndex[str] = RetentionIndex()
    idx.end_program("nobody")
    idx.add("a", "nobody", 3)
    assert not idx.is_ended("nobody")


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "touch", "remove", "contain", "uncontain", "end", "pop"]),
        st.integers(0, 7),  # key
        st.integers(0, 3),  # program
        st.integers(0, 50),  # tokens
    ),
    max_size=80,
)


@given(ops)
def test_totals_and_order_stay_consistent(seq: list[tuple[str, int, int, int]]) -> None:
    idx: RetentionIndex[int] = RetentionIndex()
    model: dict[int, tuple[str, int, bool]] = {}  # key -> (program, tokens, contained)
    ended: set[str] = set()
    for op, key, prog, tokens in seq:
        pid = f"p{prog}"
        if op == "add":
            idx.add(key, pid, tokens)
            model[key] = (pid, tokens, False)
            ended.discard(pid)
        elif op == "touch":
            idx.touch(key)
        elif op == "remove":
            assert idx.remove(key) == (model.pop(key)[1] if key in model else 0)
        elif op in ("contain", "uncontain") and key in model:
            idx.set_contained(key, op == "contain")
            p, t, _ = model[key]
            model[key] = (p, t, op == "contain")
        elif op == "end" and any(p == pid for p, _, _ in model.values()):
            idx.end_program(pid)
            ended.add(pid)
        elif op == "pop":
            victim = idx.pop_victim()
            if not model:
                assert victim is None
                continue
            assert victim is not None
            p, t, contained = model.pop(victim[0])
            assert victim[1] == t
            rank = 0 if contained else 1 if p in ended else 2
            for q, _, c in model.values():  # nothing left belongs to an earlier class
                assert rank <= (0 if c else 1 if q in ended else 2)
        ended &= {p for p, _, _ in model.values()}
        assert idx.tokens == sum(t for _, t, _ in model.values())
        assert len(idx) == len(model) and set(idx) == set(model)
        for p in {p for p, _, _ in model.values()}:
            assert idx.program_tokens(p) == sum(t for q, t, _ in model.values() if q == p)
