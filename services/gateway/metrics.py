"""The gateway's Prometheus metrics (served on its own port at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from autellix.services.metrics import LATENCY_BUCKETS, MetricsEndpoint, name


class GatewayMetrics:
    def __init__(self) -> None:
        # never a port of its own: the gateway's HTTP server serves this registry
        self.endpoint = MetricsEndpoint(port=None)
        r = self.endpoint.registry
        self.requests = Counter(
            name("gateway_requests"), "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.running = Gauge(name("gateway_requests_running"), "requests in flight", registry=r)
        self.ttft = Histogram(
            name("gateway_time_to_first_token_seconds"),
            "time from request to the first streamed text, as the gateway sees it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            name("gateway_e2e_request_latency_seconds"),
            "time from request to the end of the response, completion endpoints",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(name("gateway_prompt_tokens"), "prompt tokens of finished calls", registry=r)
        self.generation_tokens = Counter(
            name("gateway_generation_tokens"), "tokens generated for finished calls", registry=r
        )
        self.one_call_programs = Counter(
            name("gateway_one_call_programs"), "requests that named no program (each its own program)", registry=r
        )
        self.aborts = Counter(
            name("gateway_aborted_calls"), "calls the gateway aborted on the engine", ["reason"], registry=r
        )
