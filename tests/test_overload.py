"""Overload through a real mesh (issue 11): one tenant floods the schedulers; its calls past its
bounds get ``rate_limited`` at once, another tenant's calls are served, and once the flood has
drained every table the services keep per call, program or tenant is back where it started."""

from __future__ import annotations

import asyncio
import time
import uuid

from meshkit import Mesh, start_mesh, stop_mesh

from autellix.engine.factory import BackendSpec
from autellix.proto import CallRequest
from autellix.services.client import CallFailed, CallStream

FLOOD = 150
LIMIT = 16


def tables(mesh: Mesh) -> dict[str, int]:
    """The size of every per-call, per-program and per-tenant table in the mesh's services."""
    core = mesh.scheduler.core
    out = {
        "scheduler.routed": sum(map(len, core.routed.values())),
        "scheduler.active_by_program": len(core.active_by_program),
        "scheduler.tenant_loads": len(core.tenant_limits.loads),
        "scheduler.held": len(core.held),
        "scheduler.waiting_tasks": len(mesh.scheduler._waiting),
        "scheduler.deadlines": len(core._deadlines),
        "scheduler.programs": len(core.programs),
        "scheduler.program_wait": len(core.program_wait_s),
        "tracker.programs": len(mesh.tracker.table.summaries()),
    }
    for engine in mesh.engines:
        assert engine.core is not None
        load = engine.core.load()
        out[f"{engine.engine_id}.inflight"] = len(engine._inflight)
        out[f"{engine.engine_id}.queued"] = load.running + load.waiting + load.swapped
    return out


async def _call(mesh: Mesh, tenant: str, program_id: str) -> str:
    request = CallRequest(
        program_id=program_id, call_id=f"call-{uuid.uuid4().hex}", prompt=f"work for {tenant}", max_tokens=24,
        tenant=tenant,
    )  # fmt: skip
    try:
        await CallStream(mesh.client, request, 60).collect()
        return "final"
    except CallFailed as exc:
        return exc.code


async def test_flood_past_a_tenants_bounds_is_refused_and_memory_returns(nats_url: str, root: str) -> None:
    spec = BackendSpec(name="sim", sim_time_scale=1.0, max_batch=8)
    mesh = await start_mesh(nats_url, root, engines=1, backend=spec, scheduler_options={"max_calls_per_tenant": LIMIT})
    try:
        assert await _call(mesh, "warm", "warm-p") == "final"
        await mesh.client.end_program("warm-p")
        await _until(lambda: tables(mesh)["scheduler.programs"] == 0 and tables(mesh)["tracker.programs"] == 0)
        baseline = tables(mesh)

        flood = [asyncio.create_task(_call(mesh, "flood", f"flood-{i % 10}")) for i in range(FLOOD)]
        await asyncio.sleep(0.2)
        others = [asyncio.create_task(_call(mesh, "other", f"other-{i}")) for i in range(4)]
        outcomes = await asyncio.wait_for(asyncio.gather(*flood), 120)
        assert set(outcomes) <= {"final", "rate_limited"}, set(outcomes)
        refused = outcomes.count("rate_limited")
        assert refused >= FLOOD // 2, outcomes  # the bound held: most of the flood was refused at once
        assert outcomes.count("final") >= LIMIT
        assert await asyncio.wait_for(asyncio.gather(*others), 60) == ["final"] * 4  # the other tenant is served

        for program_id in {f"flood-{i}" for i in range(10)} | {f"other-{i}" for i in range(4)}:
            await mesh.client.end_program(program_id)
        await _until(lambda: tables(mesh) == baseline, timeout_s=20)
        print(f"\noverload: {refused} of {FLOOD} flood calls refused with rate_limited; tables back to {baseline}")
    finally:
        await stop_mesh(mesh)


async def _until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)
