from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autellix.policy.program_account import ProgramAccount
from autellix.policy.variants import POLICY_NAMES, make_queue, policy_spec, stamp


def run_dag(account: ProgramAccount, dag: dict[str, tuple[list[str], float]]) -> dict[str, float]:
    """Complete calls in the listed order; returns each call's ATLAS priority at submission."""
    prio = {}
    for cid, (parents, service) in dag.items():
        prio[cid] = account.atlas_priority(parents)
        account.complete(cid, parents, service)
    return prio


def test_atlas_exact_equals_critical_path_on_a_diamond() -> None:
    #     a(2)
    #    /    \
    #  b(5)   c(1)
    #    \    /
    #     d(3)
    acc = ProgramAccount("p")
    prio = run_dag(acc, {"a": ([], 2.0), "b": (["a"], 5.0), "c": (["a"], 1.0), "d": (["b", "c"], 3.0)})
    assert prio == {"a": 0.0, "b": 2.0, "c": 2.0, "d": 7.0}
    assert acc.critical_path_s == 10.0
    assert acc.service_s == 11.0  # PLAS would charge the breadth too


def test_atlas_exact_on_fan_out_and_two_roots() -> None:
    acc = ProgramAccount("p")
    dag = {
        "r1": ([], 1.0), "r2": ([], 4.0),
        "x": (["r1"], 2.0), "y": (["r1", "r2"], 1.0), "z": (["x", "y"], 1.0), "w": (["x"], 0.5),
    }
    prio = run_dag(acc, dag)
    assert prio["x"] == 1.0
    assert prio["y"] == 4.0
    assert prio["z"] == 5.0  # max(r1+x = 3, r2+y = 5)
    assert prio["w"] == 3.0
    assert acc.critical_path_s == 6.0


def test_atlas_scalar_approximation_without_parents() -> None:
    acc = ProgramAccount("p")
    assert acc.atlas_priority(None) == 0.0
    acc.complete("a", None, 2.0)
    acc.complete("b", None, 1.0)  # inherits 2 -> path 3
    assert acc.atlas_priority(None) == 3.0


def test_plas_and_sequential_atlas_agree_on_chains() -> None:
    acc = ProgramAccount("p")
    prio = run_dag(acc, {"a": ([], 1.0), "b": (["a"], 2.0), "c": (["b"], 4.0)})
    assert prio == {"a": 0.0, "b": 1.0, "c": 3.0}
    assert acc.plas_priority() == acc.critical_path_s == 7.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=20))
def test_priorities_are_monotone_in_attained_service(services: list[float]) -> None:
    acc = ProgramAccount("p")
    last_plas, last_atlas = acc.plas_priority(), acc.atlas_priority(None)
    for i, s in enumerate(services):
        acc.complete(f"c{i}", None, s)
        assert acc.plas_priority() >= last_plas
        assert acc.atlas_priority(None) >= last_atlas
        last_plas, last_atlas = acc.plas_priority(), acc.atlas_priority(None)


def test_stamps_per_policy() -> None:
    acc = ProgramAccount("p")
    acc.complete("a", [], 2.0)
    assert stamp("fcfs", acc, ["a"]) == 0.0
    assert stamp("mlfq", acc, ["a"]) == 0.0
    assert stamp("plas", acc, ["a"]) == 2.0
    assert stamp("atlas", acc, ["a"]) == 2.0
    assert stamp("atlas", acc, []) == 0.0
    assert stamp("srpt", acc, ["a"], remaining_work=17) == 17.0
    with pytest.raises(ValueError):
        stamp("srpt", acc, ["a"])
    with pytest.raises(ValueError):
        policy_spec("lifo")


def test_queues_per_policy() -> None:
    for name in POLICY_NAMES:
        q = make_queue(name)
        q.add("a", 5.0, 0.0)
        q.add("b", 1.0, 1.0)
        first = next(q.order())
        if name == "fcfs":
            assert first == "a"  # arrival order, whatever the stamp
        else:
            assert first == "b"
    assert not policy_spec("fcfs").preemptive and policy_spec("plas").preemptive
    assert policy_spec("srpt").oracle
