"""The program-tracker's Prometheus metrics (``autellix:tracker_*``)."""

from __future__ import annotations

from collections.abc import Callable

from autellix.proto import ProgramService, ProgramSummary
from autellix.services.metrics import MetricsEndpoint


class TrackerMetrics:
    def __init__(self, port: int | None, programs: Callable[[], int]) -> None:
        self.endpoint = MetricsEndpoint(port)
        m = self.endpoint
        active = m.gauge("tracker_programs_active", "programs in the process table")
        active.set_function(programs)
        self.ended = m.counter("tracker_programs_ended", "programs ended, by how", ["how"])
        self.service = m.histogram(
            "tracker_program_attained_service_seconds", "engine service a program received over its life (at its end)"
        )
        self.latency = m.histogram(
            "tracker_program_latency_seconds", "first call to last activity of programs ended explicitly"
        )

    def on_ended(self, summary: ProgramSummary) -> None:
        self.ended.labels("request").inc()
        self.service.observe(summary.program_service_s)
        self.latency.observe(max(0.0, summary.last_activity_at - summary.first_seen_at))

    def on_expired(self, update: ProgramService) -> None:
        self.ended.labels("idle").inc()
        self.service.observe(update.program_service_s)
