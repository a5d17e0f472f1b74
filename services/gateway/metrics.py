"""The gateway's Prometheus metrics (served on its own port at ``GET /metrics``)."""

from __future__ import annotations

from autellix.services.metrics import MetricsEndpoint


class GatewayMetrics:
    def __init__(self) -> None:
        # never a port of its own: the gateway's HTTP server serves this registry
        self.endpoint = MetricsEndpoint(port=None)
        m = self.endpoint
        self.requests = m.counter("gateway_requests", "HTTP requests by endpoint and status", ["endpoint", "status"])
        self.running = m.gauge("gateway_requests_running", "requests in flight")
        self.ttft = m.histogram(
            "gateway_time_to_first_token_seconds",
            "time from request to the first streamed text, as the gateway sees it",
        )
        self.e2e = m.histogram(
            "gateway_e2e_request_latency_seconds",
            "time from request to the end of the response, completion endpoints",
            ["endpoint"],
        )
        self.prompt_tokens = m.counter("gateway_prompt_tokens", "prompt tokens of finished calls")
        self.generation_tokens = m.counter("gateway_generation_tokens", "tokens generated for finished calls")
        self.one_call_programs = m.counter(
            "gateway_one_call_programs", "requests that named no program (each its own program)"
        )
        self.aborts = m.counter("gateway_aborted_calls", "calls the gateway aborted on the engine", ["reason"])
