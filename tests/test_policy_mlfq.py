from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autellix.policy.mlfq import MLFQConfig, MultiLevelQueues, doubling_boundaries


def queues(**kw: object) -> MultiLevelQueues:
    return MultiLevelQueues(MLFQConfig(num_levels=4, first_boundary_s=1.0, beta=2.0), **kw)  # type: ignore[arg-type]


def test_doubling_boundaries() -> None:
    assert doubling_boundaries(0.5, 5) == (0.5, 1.0, 2.0, 4.0)


def test_new_call_enters_level_matching_priority_not_top() -> None:
    q = queues()
    assert q.boundaries == (1.0, 2.0, 4.0)
    assert q.add("a", 0.0, 0.0) == 0
    assert q.add("b", 1.5, 0.0) == 1
    assert q.add("c", 3.9, 0.0) == 2
    assert q.add("d", 100.0, 0.0) == 3
    assert [q.level_of(x) for x in "abcd"] == [0, 1, 2, 3]


def test_order_is_top_down_and_fcfs_within_a_level() -> None:
    q = queues()
    q.add("low1", 5.0, 0.0)
    q.add("top1", 0.1, 1.0)
    q.add("mid", 1.5, 2.0)
    q.add("top2", 0.2, 3.0)
    q.add("low2", 9.0, 4.0)
    assert list(q.order()) == ["top1", "top2", "mid", "low1", "low2"]
    keys = [q.sort_key(x) for x in q.order()]
    assert keys == sorted(keys)


def test_demotion_when_quantum_used_and_back_of_next_level() -> None:
    q = queues()
    q.add("a", 0.0, 0.0)
    q.add("b", 1.2, 0.0)  # already in level 1
    q.started("a", 0.0)
    assert q.quantum(0) == 1.0 and q.quantum(1) == 1.0 and q.quantum(2) == 2.0 and math.isinf(q.quantum(3))
    assert q.charge("a", 0.99) == 0
    assert q.charge("a", 0.01) == 1  # used level 0's quantum
    assert list(q.order()) == ["b", "a"]  # FCFS within level 1: a joined after b
    assert q.charge("a", 3.0) == 3  # level 1 (1.0) and level 2 (2.0) quanta used up
    assert q.charge("a", 1e9) == 3  # the bottom level has no quantum


def test_no_demotion_when_disabled() -> None:
    q = queues(demote=False)
    q.add("a", 0.0, 0.0)
    assert q.charge("a", 1e6) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=3.0, allow_nan=False), min_size=1, max_size=12))
def test_charging_in_pieces_equals_charging_at_once(pieces: list[float]) -> None:
    a, b = queues(), queues()
    a.add("x", 0.0, 0.0)
    b.add("x", 0.0, 0.0)
    for p in pieces:
        a.charge("x", p)
    b.charge("x", sum(pieces))
    assert a.level_of("x") == b.level_of("x")


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0, max_value=1e4), st.floats(min_value=0, max_value=1e4))
def test_level_is_monotone_in_attained_service(p1: float, p2: float) -> None:
    q = MultiLevelQueues()
    lo, hi = sorted((p1, p2))
    assert q.level_for(lo) <= q.level_for(hi)


def test_beta_rule_promotes_exactly_when_ratio_reaches_beta() -> None:
    q = queues()  # beta = 2
    # program waited 1 s and received 2 s; the call has no service yet
    q.add("old", 3.0, 10.0, program_wait_s=1.0, program_service_s=2.0)
    q.add("new", 0.0, 10.0)
    assert q.level_of("old") == 2
    # (1 + w) / 2 >= 2  <=>  w >= 3: promoted at t = 13
    assert q.promote_starved(12.99) == []
    assert q.starvation_ratio("old", 12.99) < 2.0
    assert q.promote_starved(13.0) == ["old"]
    assert q.level_of("old") == 0
    assert list(q.order()) == ["new", "old"]  # back of the top queue
    # only the call's counters reset: its wait restarts, the program's figures stay
    assert q.starvation_ratio("old", 13.0) == pytest.approx(0.5)


def test_running_calls_are_not_promoted_and_wait_stops_while_running() -> None:
    q = queues()
    q.add("a", 3.0, 0.0, program_wait_s=0.0, program_service_s=1.0)
    q.started("a", 1.0)  # waited 1 s
    assert q.promote_starved(100.0) == []
    q.charge("a", 1.0)
    q.stopped("a", 100.0)
    # (0 + 1 + w) / (1 + 1) >= 2  <=> w >= 3
    assert q.promote_starved(102.9) == []
    assert q.promote_starved(103.0) == ["a"]


def test_starvation_can_be_disabled() -> None:
    q = queues(starvation=False)
    q.add("a", 3.0, 0.0, program_wait_s=100.0, program_service_s=1.0)
    assert q.promote_starved(1e9) == []


def test_readding_a_removed_id_does_not_inherit_stale_deadlines() -> None:
    q = queues()
    q.add("a", 3.0, 0.0, program_wait_s=0.0, program_service_s=1.0)  # deadline t = 2
    q.remove("a")
    q.add("a", 3.0, 50.0, program_wait_s=0.0, program_service_s=10.0)  # deadline t = 70
    assert q.promote_starved(60.0) == []
    assert q.promote_starved(70.0) == ["a"]


def test_set_boundaries_validates_and_keeps_levels() -> None:
    q = queues()
    q.add("a", 1.5, 0.0)
    with pytest.raises(ValueError):
        q.set_boundaries([1.0, 2.0])
    with pytest.raises(ValueError):
        q.set_boundaries([2.0, 1.0, 3.0])
    q.set_boundaries([10.0, 20.0, 40.0])
    assert q.level_of("a") == 1
    assert q.level_for(15.0) == 1


def test_duplicate_and_unknown_ids() -> None:
    q = queues()
    q.add("a", 0.0, 0.0)
    with pytest.raises(KeyError):
        q.add("a", 0.0, 0.0)
    with pytest.raises(KeyError):
        q.remove("zzz")


ops = st.lists(
    st.tuples(st.sampled_from(["add", "start", "stop", "charge", "remove", "promote"]),
              st.integers(0, 7), st.floats(0, 5)),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops)
def test_waiting_index_matches_order_under_random_operations(seq: list[tuple[str, int, float]]) -> None:
    q = queues()
    now = 0.0
    for op, i, x in seq:
        cid = f"c{i}"
        now += 0.5
        if op == "add" and cid not in q:
            q.add(cid, x, now, program_wait_s=x, program_service_s=x / 2)
        elif cid not in q and op != "promote":
            continue
        elif op == "start" and q.is_waiting(cid):
            q.started(cid, now)
        elif op == "stop" and not q.is_waiting(cid):
            q.stopped(cid, now)
        elif op == "charge":
            q.charge(cid, x)
        elif op == "remove":
            q.remove(cid)
        elif op == "promote":
            q.promote_starved(now)
        order = list(q.order())
        assert list(q.order_waiting()) == [c for c in order if q.is_waiting(c)]
        assert q.waiting_count() == sum(1 for c in order if q.is_waiting(c))
        assert len(order) == len(q) == len(set(order))
        keys = [q.sort_key(c) for c in order]
        assert keys == sorted(keys)
