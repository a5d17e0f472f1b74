"""Per-tenant bounds in the schedulers (issue 11): calls and tokens in flight per tenant, refused
with ``rate_limited`` past them; released on every way a call leaves the scheduler's hands."""

from __future__ import annotations

import pytest
from eventkit import completed

from autellix.proto import CallRequest, EngineHeartbeat
from autellix.services.scheduler.core import SchedulerCore, call_tokens
from autellix.services.scheduler.tenant_limits import TenantLimits


def test_who_the_tenant_is() -> None:
    limits = TenantLimits(trusted_users=("gateway",))
    assert limits.tenant_of("", "acme") == "acme"  # no auth: whatever the request names
    assert limits.tenant_of("", "") == ""
    assert limits.tenant_of("alice", "someone-else") == "alice"  # a client cannot pick (or split) its tenant
    assert limits.tenant_of("gateway", "acme") == "gateway/acme"  # the gateway names its API-key tenants
    assert limits.tenant_of("gateway", "") == "gateway"


def test_bounds_on_calls_and_tokens() -> None:
    limits = TenantLimits(max_calls=2, max_tokens=100)
    assert limits.refusal("a", 60) is None
    limits.add("a", 60)
    refusal = limits.refusal("a", 60)
    assert refusal is not None and "100" in refusal  # tokens
    assert limits.refusal("a", 40) is None
    limits.add("a", 40)
    refusal = limits.refusal("a", 1)
    assert refusal is not None and "2 calls" in refusal  # calls
    assert limits.refusal("b", 100) is None  # another tenant is not affected
    limits.remove("a", 60)
    limits.remove("a", 40)
    assert limits.loads == {}  # nothing kept for a tenant with nothing in flight
    assert TenantLimits(max_calls=0, max_tokens=0).refusal("a", 10**9) is None  # 0: no bound
    with pytest.raises(ValueError):
        TenantLimits(max_calls=-1)


def _core(max_calls: int = 2, max_tokens: int = 0) -> SchedulerCore:
    core = SchedulerCore(max_calls_per_tenant=max_calls, max_tokens_per_tenant=max_tokens, call_deadline_s=10)
    for engine_id in ("e1", "e2"):
        core.on_heartbeat(EngineHeartbeat(engine_id=engine_id, backend="sim", model="m", interval_s=1.0), 0.0)
    return core


def _route(core: SchedulerCore, request: CallRequest, owner: str, engine_id: str = "e1", now: float = 0.0) -> None:
    assert core.tenant_refusal(request, core.tenant_of(request, owner)) is None
    core.on_routed(core.stamp(request, f"_I.{owner}.x", now, owner), engine_id)


def test_core_refuses_past_a_tenants_calls_and_releases_them() -> None:
    core = _core(max_calls=2)
    calls = [CallRequest(program_id=f"p{i}", call_id=f"c{i}", prompt="hi") for i in range(4)]
    _route(core, calls[0], "alice")
    _route(core, calls[1], "alice", "e2")
    refusal = core.tenant_refusal(calls[2], core.tenant_of(calls[2], "alice"))
    assert refusal is not None and "alice" in refusal
    assert core.tenant_refusal(calls[2], core.tenant_of(calls[2], "bob")) is None  # per tenant
    resubmission = CallRequest(program_id="p0", call_id="c0", prompt="hi", attempt=1)
    assert core.tenant_refusal(resubmission, "alice") is None  # admitted work goes on
    # completion releases; an older attempt's completion does not release a newer routing
    core.on_routed(core.stamp(resubmission, "_I.alice.x", 0.0, "alice"), "e1")
    core.on_completed("c0", "e1", attempt=0)
    assert core.tenant_limits.loads["alice"].calls == 2
    core.on_completed("c0", "e1", attempt=1)
    assert core.tenant_limits.loads["alice"].calls == 1
    _route(core, calls[2], "alice")
    # a dead engine's calls and calls past their deadline are released too
    core.on_heartbeat(EngineHeartbeat(engine_id="e1", backend="sim", model="m", interval_s=1.0), 4.0)
    assert [(e, [r.call_id for r in orphans]) for e, orphans in core.dead_engines(5.0)] == [("e2", ["c1"])]
    assert core.tenant_limits.loads["alice"].calls == 1
    assert [r.call_id for _, r in core.expired(20.0)] == ["c2"]
    assert core.tenant_limits.loads == {}
    assert core.active_by_program == {} and not any(core.routed.values())


def test_calls_waiting_for_an_engine_count() -> None:
    core = _core(max_calls=1)
    request = CallRequest(program_id="p", call_id="c", prompt="hi")
    core.hold("c", "alice", call_tokens(request))
    assert core.tenant_refusal(CallRequest(program_id="p", call_id="d", prompt="hi"), "alice") is not None
    core.unhold("c")
    assert core.held == {} and core.tenant_limits.loads == {}


def test_core_bounds_a_tenants_tokens() -> None:
    core = _core(max_calls=0, max_tokens=300)
    big = CallRequest(program_id="p", call_id="big", prompt="x" * 400, max_tokens=100)  # ~200 tokens
    _route(core, big, "alice")
    again = CallRequest(program_id="p", call_id="again", prompt="x" * 400, max_tokens=100)
    refusal = core.tenant_refusal(again, "alice")
    assert refusal is not None and "tokens" in refusal
    core.on_completed("big", "e1")
    assert core.tenant_refusal(again, "alice") is None


def test_gateway_tenants_are_accounted_apart_and_a_fresh_program_is_weighed_at_its_tenant() -> None:
    """The gateway names its API-key tenants: each is accounted on its own (not all as "gateway"),
    and a tenant's fresh program carries its tenant's service into the engine's anti-starvation
    rule as well as its priority (else wait / service >= beta lifts it to the top queue at once)."""
    from autellix.proto import CallDispatched, ProgramService
    from autellix.services.tracker.process_table import ProcessTable

    table = ProcessTable()
    table.on_dispatched(
        CallDispatched(
            call_id="c", program_id="acme/p", engine_id="e", priority=0, owner="gateway", tenant="gateway/acme"
        ),
        now=1.0,
    )
    done = completed("acme/p", "c", 4.0, engine_id="e")
    update = table.on_completed(done, now=2.0)
    assert update is not None and update.tenant == "gateway/acme" and update.owner == "gateway"

    core = SchedulerCore(policy="plas", tenant_half_life_s=600.0)
    core.on_program_service(msgspec_replace(update, updated_at=100.0))
    core.on_program_service(
        ProgramService(program_id="beta/p", service_s=1.0, owner="gateway", tenant="gateway/beta", updated_at=100.0)
    )
    fresh = core.stamp(CallRequest(program_id="acme/new", prompt="x", tenant="acme"), "_I.gateway.x", 100.0, "gateway")
    assert fresh.tenant == "gateway/acme"
    assert fresh.priority == pytest.approx(4.0) and fresh.program_service_s == pytest.approx(4.0)
    other = core.stamp(CallRequest(program_id="beta/new", prompt="x", tenant="beta"), "_I.gateway.x", 100.0, "gateway")
    assert other.priority == pytest.approx(1.0)
    # a client cannot name a tenant: its own identity is its tenant
    assert core.stamp(CallRequest(program_id="q", prompt="x", tenant="beta"), "_I.bob.x", 100.0, "bob").tenant == "bob"


def msgspec_replace(update, **changes):  # type: ignore[no-untyped-def]
    import msgspec

    return msgspec.structs.replace(update, **changes)
