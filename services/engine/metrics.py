"""The engine's Prometheus metrics, in vLLM's names under ``autellix:``.

Fed from three places in the service, each one line: the heartbeat (load gauges), the step loop
(preemptions) and the call-completed event (token counters, latency histograms).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Gauge

from autellix.engine.core import CallState, Preemption
from autellix.proto import CallCompleted, EngineHeartbeat
from autellix.services.metrics import ITL_BUCKETS, MetricsEndpoint

#: heartbeat fields that later engines may carry; their gauges appear once a heartbeat has them
RETENTION_FIELDS = {
    # KV tokens of programs between calls (think/tool time) that the engine keeps for their next call
    "kv_tokens_retained": ("kv_cache_retained_context_tokens", "KV tokens retained for programs between calls"),
    # share of prompt tokens served from the prefix cache (0..1)
    "prefix_hit_rate": ("prefix_cache_hit_rate", "share of prompt tokens found in the prefix cache"),
}


def preemption_reason(reason: str) -> str:
    """A bounded label for the core's free-text reason ("displaced by <call id>", "kv pressure")."""
    if reason.startswith("displaced"):
        return "priority"
    if reason.startswith("kv"):
        return "kv_pressure"
    return "other"


class EngineMetrics:
    def __init__(self, port: int | None) -> None:
        self.endpoint = MetricsEndpoint(port)
        m = self.endpoint
        self.running = m.gauge("num_requests_running", "calls in the running batch")
        self.waiting = m.gauge("num_requests_waiting", "calls queued, not yet admitted")
        self.swapped = m.gauge("num_requests_swapped", "preempted calls whose KV is in the CPU pool")
        self.kv_usage = m.gauge("kv_cache_usage_perc", "share of KV capacity in use (0..1)")
        self.kv_used = m.gauge("kv_cache_used_tokens", "KV tokens in use")
        self.kv_free = m.gauge("kv_cache_free_tokens", "KV tokens free")
        self.swap_pool = m.gauge("swap_pool_used_bytes", "bytes of KV held in the CPU swap pool")
        self.retention: dict[str, Gauge] = {}
        self.preemptions = m.counter("num_preemptions", "preempted calls by reason and mode", ["reason", "mode"])
        self.swap_bytes = m.counter("swap_bytes", "KV bytes swapped out and back in")
        self.prompt_tokens = m.counter("prompt_tokens", "prompt tokens of finished calls")
        self.generation_tokens = m.counter("generation_tokens", "tokens generated")
        self.finished = m.counter("request_success", "finished calls by finish reason", ["finished_reason"])
        self.ttft = m.histogram("time_to_first_token_seconds", "arrival to first token")
        self.itl = m.histogram(
            "inter_token_latency_seconds",
            "mean time between a call's tokens after its first (one sample per call)",
            buckets=ITL_BUCKETS,
        )
        self.e2e = m.histogram("e2e_request_latency_seconds", "arrival to the call's end")
        self.queue = m.histogram("request_queue_time_seconds", "time a call waited in the queues")

    def on_heartbeat(self, hb: EngineHeartbeat) -> None:
        self.running.set(hb.running)
        self.waiting.set(hb.waiting)
        self.swapped.set(hb.swapped)
        self.kv_used.set(hb.kv_tokens_used)
        self.kv_free.set(hb.kv_tokens_free)
        total = hb.kv_tokens_used + hb.kv_tokens_free
        self.kv_usage.set(hb.kv_tokens_used / total if total else 0.0)
        self.swap_pool.set(hb.swap_pool_used_bytes)
        self._retention(hb)

    def _retention(self, hb: EngineHeartbeat) -> None:
        """Hook for the retention figures another change adds to the heartbeat (see RETENTION_FIELDS)."""
        for field_name, (metric, doc) in RETENTION_FIELDS.items():
            value = getattr(hb, field_name, None)
            if value is None:
                continue
            gauge = self.retention.get(field_name)
            if gauge is None:
                gauge = self.retention[field_name] = self.endpoint.gauge(metric, doc)
            gauge.set(value)

    def on_preemptions(self, preemptions: Iterable[Preemption]) -> None:
        for p in preemptions:
            self.preemptions.labels(preemption_reason(p.reason), p.mode).inc()

    def on_completed(self, done: CallCompleted, state: CallState, now: float) -> None:
        self.prompt_tokens.inc(done.prompt_tokens)
        self.generation_tokens.inc(done.output_tokens)
        self.swap_bytes.inc(done.swap_bytes)
        self.finished.labels(done.finish_reason).inc()
        self.queue.observe(done.queue_wait_s)
        self.e2e.observe(max(0.0, now - state.arrived_at))
        if state.first_token_at is not None:
            self.ttft.observe(max(0.0, state.first_token_at - state.arrived_at))
            if done.output_tokens > 1:
                self.itl.observe(max(0.0, now - state.first_token_at) / (done.output_tokens - 1))
