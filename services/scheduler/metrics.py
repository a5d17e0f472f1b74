"""The scheduler's Prometheus metrics (``autellix:scheduler_*``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter

from autellix.services.metrics import MetricsEndpoint


class SchedulerMetrics:
    def __init__(self, port: int | None, waiting: Callable[[], int]) -> None:
        self.endpoint = MetricsEndpoint(port)
        m = self.endpoint
        self.stamps = m.counter("scheduler_stamps", "calls stamped with a priority and routed")
        self.routes = m.counter("scheduler_routes", "calls routed, by engine", ["engine_id"])
        self.errors = m.counter("scheduler_errors", "calls refused, by error code", ["code"])
        self.engines = m.gauge("scheduler_engines_live", "engines live in this scheduler's view")
        waiting_gauge = m.gauge("scheduler_calls_waiting_for_engine", "calls held until an engine is live")
        waiting_gauge.set_function(waiting)
        #: engine id -> its child of ``routes`` (``labels()`` takes a lock and builds a key per call)
        self._routes_by_engine: dict[str, Counter] = {}
        # "programs at the door" (admission control) does not exist yet; its gauge belongs here when it does.

    def on_routed(self, engine_id: str) -> None:
        self.stamps.inc()
        child = self._routes_by_engine.get(engine_id)
        if child is None:
            child = self._routes_by_engine[engine_id] = self.routes.labels(engine_id)
        child.inc()
