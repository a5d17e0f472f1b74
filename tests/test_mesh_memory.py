"""Program-aware KV memory through the mesh: engines report their retained contexts and hit rate in
heartbeats, and learn from the tracker when a program ended."""

from __future__ import annotations

import asyncio

from meshkit import Mesh, start_mesh, stop_mesh, until

from autellix.engine.factory import BackendSpec
from autellix.engine.sim_backend import SimBackend


async def test_heartbeats_report_retained_kv_and_hits_and_end_reaches_the_engine(mesh: Mesh) -> None:
    engine = mesh.engines[0]
    backend = engine.backend
    assert isinstance(backend, SimBackend) and backend.device.retention == "program" and backend.tier is not None
    p = mesh.client.program("prog-mem")
    first_prompt = "plan the trip " * 10
    first = await p.call(first_prompt, max_tokens=6)
    # the program's next call re-sends its history: it prefills only the new words
    second = await p.call(f"{first_prompt}{first.text} now book it", max_tokens=4)
    assert second.final.prompt_tokens == 1 + 30 + 6 + 3  # a role marker, the history, three words
    other = mesh.client.program("prog-other")
    await other.call("something else entirely", max_tokens=3)
    view = lambda: mesh.scheduler.core.engines[engine.engine_id].heartbeat  # noqa: E731
    await until(lambda: view().prompt_tokens_total == 31 + 40 + 4)
    hb = view()
    assert hb.prefix_hit_tokens_total == 37 and hb.prefix_hit_rate == 37 / 75
    assert hb.kv_tokens_capacity == engine.core.kv_capacity_tokens > 0
    assert hb.kv_tokens_tier_capacity == backend.tier_tokens > 0 and hb.tier_spill_share == 0.0
    # retained: prog-mem's two contexts (the first is inside the second) and prog-other's; the
    # working set between calls: each program's latest context
    assert hb.kv_tokens_retained == 37 + 44 + 7 and hb.kv_tokens_tiered == 0
    assert hb.kv_tokens_idle_contexts == 44 + 7
    # the tracker says the program ended: its context leaves the working set and goes first
    await p.end()
    await until(lambda: view().kv_tokens_idle_contexts == 7)
    assert list(backend.device) == [first.call_id, second.call_id, next(iter(reversed(list(backend.device))))]


async def test_door_holds_a_new_program_while_the_working_set_does_not_fit(nats_url: str, root: str) -> None:
    # no CPU tier: the working-set rule applies at once (with a tier the spill gate would keep the
    # door open while swapping back in costs under 10% of busy time)
    spec = BackendSpec(name="sim", sim_time_scale=0.05, kv_capacity_tokens=300, max_batch=8, kv_tier_tokens=0)
    m = await start_mesh(nats_url, root, backend=spec, door=True)
    try:
        a = m.client.program("prog-a")
        await a.call("word " * 100, max_tokens=50)  # A's context (151 tokens) stays its working set
        engine_id = m.engines[0].engine_id
        await until(lambda: m.scheduler.core.engines[engine_id].heartbeat.kv_tokens_idle_contexts == 151)
        b = m.client.program("prog-b")
        waiting = asyncio.create_task(b.call("other " * 100, max_tokens=50))
        gate = m.scheduler.door
        assert gate is not None
        await until(lambda: gate.waiting_programs() == 1)
        await asyncio.sleep(0.5)
        assert not waiting.done()  # 151 + another ~151 > 90% of 300
        await a.end()  # the tracker says A ended: B goes in
        result = await asyncio.wait_for(waiting, 10)
        assert result.output_tokens == 50 and gate.waiting_programs() == 0
        row = next(r for r in (await m.client.table()).programs if r.program_id == "prog-b")
        assert row.door_wait_s >= 0.5 and row.program_wait_s >= row.door_wait_s
    finally:
        await stop_mesh(m)
