from __future__ import annotations

import pytest

from autellix.policy.balancer import (
    EngineLoad,
    LeastUsedBalancer,
    LocalityBalancer,
    RoundRobinBalancer,
    make_balancer,
)

LOADS = [EngineLoad("e0", 500, 100), EngineLoad("e1", 100, 50), EngineLoad("e2", 100, 400)]


def test_used_counts_held_and_queued_kv_tokens() -> None:
    assert [x.used for x in LOADS] == [600, 150, 500]


def test_round_robin_cycles_ignoring_load() -> None:
    b = RoundRobinBalancer()
    assert [b.choose("p", 10, LOADS) for _ in range(4)] == ["e0", "e1", "e2", "e0"]


def test_least_used_and_ties_go_first() -> None:
    b = LeastUsedBalancer()
    assert b.choose("p", 10, LOADS) == "e1"
    assert b.choose("p", 10, [EngineLoad("a", 5), EngineLoad("b", 5)]) == "a"
    with pytest.raises(ValueError):
        b.choose("p", 10, [])


def test_locality_short_calls_go_least_used_long_calls_stay_home() -> None:
    b = LocalityBalancer(threshold_tokens=2048)
    assert b.choose("p", 3000, LOADS) == "e1"  # first sight: least used, becomes home
    moved = [EngineLoad("e0", 0), EngineLoad("e1", 10_000), EngineLoad("e2", 5)]
    assert b.choose("p", 3000, moved) == "e1"  # long: stays with its context
    assert b.choose("p", 2048, moved) == "e0"  # short: least used, and home moves there
    assert b.home_of("p") == "e0"
    assert b.choose("p", 5000, moved) == "e0"
    b.forget("p")
    assert b.home_of("p") is None
    # home engine gone from the snapshot: least used
    b.choose("q", 9000, [EngineLoad("x", 0)])
    assert b.choose("q", 9000, [EngineLoad("y", 3), EngineLoad("z", 1)]) == "z"


def test_make_balancer() -> None:
    assert make_balancer("locality").name == "locality"
    assert make_balancer("round-robin").name == "round-robin"
    assert make_balancer("least-used").name == "least-used"
    with pytest.raises(ValueError):
        make_balancer("random")
