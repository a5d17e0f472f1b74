"""The scheduler's Prometheus metrics (``autellix:scheduler_*``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge

from autellix.services.metrics import MetricsEndpoint, name


class SchedulerMetrics:
    def __init__(self, port: int | None, waiting: Callable[[], int]) -> None:
        self.endpoint = MetricsEndpoint(port)
        r = self.endpoint.registry
        self.stamps = Counter(name("scheduler_stamps"), "calls stamped with a priority and routed", registry=r)
        self.routes = Counter(name("scheduler_routes"), "calls routed, by engine", ["engine_id"], registry=r)
        self.errors = Counter(name("scheduler_errors"), "calls refused, by error code", ["code"], registry=r)
        self.engines = Gauge(name("scheduler_engines_live"), "engines live in this scheduler's view", registry=r)
        waiting_gauge = Gauge(
            name("scheduler_calls_waiting_for_engine"), "calls held until an engine is live", registry=r
        )
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
