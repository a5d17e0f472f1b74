"""Every service's Prometheus endpoint: it serves text that prometheus_client's parser reads, in
vLLM's naming style under `autellix:`, and the counters move with the calls."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import pytest
from meshkit import start_mesh, stop_mesh
from prometheus_client.parser import text_string_to_metric_families

from autellix.engine.core import Preemption
from autellix.services.client import CallFailed
from autellix.services.engine.metrics import EngineMetrics, preemption_reason
from autellix.services.metrics import MetricsEndpoint


def scrape(port: int | None) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_every_service_serves_metrics_that_move(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, metrics=True)
    try:
        engine, scheduler, tracker = mesh.engines[0], mesh.scheduler, mesh.tracker
        ports = {engine.metrics.endpoint.port, scheduler.metrics.endpoint.port, tracker.metrics.endpoint.port}
        assert len(ports) == 3 and None not in ports
        before = await asyncio.to_thread(scrape, engine.metrics.endpoint.port)
        async with mesh.client.program("m1") as p:
            await p.call("one two", max_tokens=5)
            await p.call("three", max_tokens=3)
        e = await asyncio.to_thread(scrape, engine.metrics.endpoint.port)
        assert e["autellix:generation_tokens_total"][()] == before["autellix:generation_tokens_total"][()] + 8
        assert e["autellix:prompt_tokens_total"][()] > 0
        assert e["autellix:time_to_first_token_seconds_count"][()] == 2
        assert e["autellix:e2e_request_latency_seconds_count"][()] == 2
        assert e["autellix:request_queue_time_seconds_count"][()] == 2
        assert e["autellix:inter_token_latency_seconds_count"][()] == 2
        assert e["autellix:request_success_total"][(("finished_reason", "length"),)] == 2
        for gauge in ("num_requests_running", "num_requests_waiting", "num_requests_swapped", "kv_cache_usage_perc"):
            assert f"autellix:{gauge}" in e
        deadline = time.monotonic() + 5  # the heartbeat sets the KV gauges
        while (await asyncio.to_thread(scrape, engine.metrics.endpoint.port))["autellix:kv_cache_free_tokens"][()] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        s = await asyncio.to_thread(scrape, scheduler.metrics.endpoint.port)
        assert s["autellix:scheduler_stamps_total"][()] == 2
        assert s["autellix:scheduler_routes_total"][(("engine_id", engine.engine_id),)] == 2
        assert s["autellix:scheduler_engines_live"][()] == 1
        t: dict[str, Any] = {}
        deadline = time.monotonic() + 5
        while t.get("autellix:tracker_programs_ended_total", {}).get((("how", "request"),)) != 1:
            assert time.monotonic() < deadline, t
            t = await asyncio.to_thread(scrape, tracker.metrics.endpoint.port)
        assert t["autellix:tracker_program_attained_service_seconds_count"][()] == 1
        assert t["autellix:tracker_program_attained_service_seconds_sum"][()] > 0
        assert t["autellix:tracker_program_latency_seconds_count"][()] == 1
        assert "autellix:tracker_programs_active" in t
    finally:
        await stop_mesh(mesh)
    assert engine.metrics.endpoint.port is None  # stopped with the service


async def test_scheduler_counts_errors_by_code(nats_url: str, root: str) -> None:
    mesh = await start_mesh(nats_url, root, metrics=True)
    try:
        with pytest.raises(CallFailed) as info:
            await mesh.client.program().call("x", max_tokens=0)
        assert info.value.code == "bad_max_tokens"
        s = await asyncio.to_thread(scrape, mesh.scheduler.metrics.endpoint.port)
        assert s["autellix:scheduler_errors_total"][(("code", "bad_max_tokens"),)] == 1
    finally:
        await stop_mesh(mesh)


def test_metrics_are_off_unless_a_port_is_given() -> None:
    off = MetricsEndpoint(None)
    off.start()
    assert off.port is None


def test_preemptions_by_bounded_reason_and_retention_hook() -> None:
    m = EngineMetrics(None)
    m.on_preemptions([Preemption("c1", "swap", "displaced by c9", 10), Preemption("c2", "recompute", "kv pressure", 5)])
    assert preemption_reason("displaced by call-123") == "priority"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.endpoint.registry.collect()
        for s in family.samples
    }
    assert samples[("autellix:num_preemptions_total", (("mode", "swap"), ("reason", "priority")))] == 1
    assert samples[("autellix:num_preemptions_total", (("mode", "recompute"), ("reason", "kv_pressure")))] == 1
    # retained-context and prefix-hit gauges appear only once heartbeats carry those fields
    assert not any(name.startswith("autellix:kv_cache_retained") for name, _ in samples)

    class Beat:
        running = waiting = swapped = kv_tokens_used = kv_tokens_free = swap_pool_used_bytes = 0
        kv_tokens_retained = 1234
        prefix_hit_rate = 0.9

    m.on_heartbeat(Beat())  # type: ignore[arg-type]
    values = {s.name: s.value for family in m.endpoint.registry.collect() for s in family.samples}
    assert values["autellix:kv_cache_retained_context_tokens"] == 1234
    assert values["autellix:prefix_cache_hit_rate"] == 0.9
