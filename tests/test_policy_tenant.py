"""Tenant accounting: splitting work into many programs gains nothing over one program."""

from __future__ import annotations

import math

import pytest

from autellix.policy.tenant_account import TenantAccounts


def test_recent_service_decays_by_half_life() -> None:
    t = TenantAccounts(half_life_s=10.0)
    t.charge("a", 8.0, now=0.0)
    assert t.recent("a", 0.0) == pytest.approx(8.0)
    assert t.recent("a", 10.0) == pytest.approx(4.0)
    t.charge("a", 1.0, now=10.0)
    assert t.recent("a", 20.0) == pytest.approx(2.5)
    assert t.recent("nobody", 5.0) == 0.0


def test_one_tenant_keeps_its_programs_own_order() -> None:
    t = TenantAccounts(half_life_s=60.0)
    t.charge("solo", 100.0, now=0.0)
    assert t.stamp("solo", 3.0, now=1.0) == 3.0  # nobody else to be fair to


def test_a_splitting_tenant_starts_where_one_program_would_stand() -> None:
    t = TenantAccounts(half_life_s=60.0)
    honest_program = 0.0
    for step in range(10):  # both do ten 1-second calls, alternating
        now = float(step)
        honest_program += 1.0
        t.charge("honest", 1.0, now)
        t.charge("splitter", 1.0, now)  # each on a fresh program (own service 0)
    now = 10.0
    honest = t.stamp("honest", honest_program, now)
    splitter = t.stamp("splitter", 0.0, now)  # its next fresh program
    assert splitter == pytest.approx(t.recent("splitter", now))
    assert splitter >= 0.9 * honest  # no better than the honest program (decay: within 10%)


def test_idle_tenants_stop_counting() -> None:
    t = TenantAccounts(half_life_s=1.0, active_floor_s=0.01)
    t.charge("a", 1.0, now=0.0)
    t.charge("b", 1.0, now=0.0)
    assert t.active(0.0) == 2
    assert t.active(20.0) == 0  # 2**-20 of a second each
    assert t.stamp("a", 0.5, now=20.0) == 0.5


def test_bad_half_life() -> None:
    with pytest.raises(ValueError):
        TenantAccounts(half_life_s=0)
    assert math.isfinite(TenantAccounts().recent("x", 1e9))


def test_scheduler_stamps_a_splitters_fresh_programs_no_lower_than_an_honest_program() -> None:
    """Through the scheduler core, with the tracker's updates as they arrive: alice keeps her work in
    one program, bob opens a program per call; after the same work bob's next fresh program is
    stamped no lower than alice's next call (plain PLAS would stamp it 0)."""
    from autellix.proto import CallRequest, ProgramService
    from autellix.services.scheduler.core import SchedulerCore

    core = SchedulerCore(policy="plas", tenant_half_life_s=600.0)
    alice_service = 0.0
    for i in range(10):
        now = 100.0 + i
        alice_service += 0.5
        core.on_program_service(
            ProgramService(program_id="alice-p", service_s=alice_service, owner="alice", updated_at=now)
        )
        core.on_program_service(ProgramService(program_id=f"bob-p{i}", service_s=0.5, owner="bob", updated_at=now))
        core.on_program_service(
            ProgramService(program_id=f"bob-p{i}", service_s=0.5, owner="bob", ended=True, updated_at=now)
        )
    now = 110.0
    honest = core.stamp(CallRequest(program_id="alice-p"), "_I.alice.x", now, owner="alice")
    split = core.stamp(CallRequest(program_id="bob-p10"), "_I.bob.x", now, owner="bob")
    assert honest.priority == pytest.approx(5.0, rel=0.02)
    assert split.priority >= 0.95 * honest.priority
    # one tenant alone keeps plain program-level PLAS: a fresh program of alice's stamps 0
    solo = SchedulerCore(policy="plas")
    solo.on_program_service(ProgramService(program_id="a", service_s=5.0, owner="alice", updated_at=now))
    assert solo.stamp(CallRequest(program_id="b"), "_I.alice.x", now, owner="alice").priority == 0.0
