"""The program-tracker's Prometheus metrics (``autellix:tracker_*``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from autellix.proto import ProgramService, ProgramSummary
from autellix.services.metrics import LATENCY_BUCKETS, MetricsEndpoint, name


class TrackerMetrics:
    def __init__(self, port: int | None, programs: Callable[[], int]) -> None:
        self.endpoint = MetricsEndpoint(port)
        r = self.endpoint.registry
        active = Gauge(name("tracker_programs_active"), "programs in the process table", registry=r)
        active.set_function(programs)
        self.ended = Counter(name("tracker_programs_ended"), "programs ended, by how", ["how"], registry=r)
        self.service = Histogram(
            name("tracker_program_attained_service_seconds"),
            "engine service a program received over its life (at its end)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            name("tracker_program_latency_seconds"),
            "first call to last activity of programs ended explicitly",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def on_ended(self, summary: ProgramSummary) -> None:
        self.ended.labels("request").inc()
        self.service.observe(summary.program_service_s)
        self.latency.observe(max(0.0, summary.last_activity_at - summary.first_seen_at))

    def on_expired(self, update: ProgramService) -> None:
        self.ended.labels("idle").inc()
        self.service.observe(update.program_service_s)
