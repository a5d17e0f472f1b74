"""The scheduler's Prometheus metrics (``autellix:scheduler_*``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from autellix.services.metrics import MetricsEndpoint, name


class _RouteCounts(Collector):
    """``scheduler_stamps`` and ``scheduler_routes`` (by engine): a dict increment per routed call,
    read when scraped (a prometheus_client ``Counter`` takes a lock and checks its labels per bump,
    on the path of every stamp)."""

    def __init__(self) -> None:
        #: engine id -> calls routed there
        self.by_engine: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = dict(self.by_engine)  # one C-level copy: the event loop may route meanwhile
        stamps = sum(counts.values())
        yield CounterMetricFamily(name("scheduler_stamps"), "calls stamped with a priority and routed", stamps)
        routes = CounterMetricFamily(name("scheduler_routes"), "calls routed, by engine", labels=["engine_id"])
        for engine_id, calls in counts.items():
            routes.add_metric([engine_id], calls)
        yield routes


class SchedulerMetrics:
    def __init__(self, port: int | None, waiting: Callable[[], int]) -> None:
        self.endpoint = MetricsEndpoint(port)
        r = self.endpoint.registry
        self._routes = _RouteCounts()
        r.register(self._routes)
        self.errors = Counter(name("scheduler_errors"), "calls refused, by error code", ["code"], registry=r)
        self.engines = Gauge(name("scheduler_engines_live"), "engines live in this scheduler's view", registry=r)
        waiting_gauge = Gauge(
            name("scheduler_calls_waiting_for_engine"), "calls held until an engine is live", registry=r
        )
        waiting_gauge.set_function(waiting)
        # "programs at the door" (admission control) does not exist yet; its gauge belongs here when it does.

    def on_routed(self, engine_id: str) -> None:
        counts = self._routes.by_engine
        counts[engine_id] = counts.get(engine_id, 0) + 1
