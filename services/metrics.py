"""Prometheus metrics shared by every service: a registry per service instance and its HTTP endpoint.

Names follow vLLM's style (``vllm:num_requests_running``) under an ``autellix:`` prefix, so
dashboards and autoscalers (KEDA, HPA) written for vLLM read ours with a prefix change. Each service
instance owns a :class:`CollectorRegistry` rather than the process-wide default: ``autellix up`` runs
several services (and several engines) in one process, and each keeps its own figures on its own port.

The gateway serves its registry on its own HTTP port (``GET /metrics``); the tracker, schedulers and
engines serve theirs with prometheus_client's small threaded HTTP server on ``--metrics-port``
(``AUTELLIX_METRICS_PORT``), off unless set. Metric updates are plain in-memory counter bumps, cheap
enough for the event loop; the exposition runs in the server's thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "autellix:"

#: seconds; from 1 ms (a TTFT on a sim engine) to 10 minutes (a long agent call), as vLLM's buckets
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
#: seconds between tokens of one call
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0)


def name(metric: str) -> str:
    """The exported name of a metric: ``autellix:<metric>``."""
    return PREFIX + metric


def metrics_host_from_env() -> str:
    """Where the metrics endpoints listen: ``AUTELLIX_METRICS_HOST``, all interfaces by default
    (containers); ``autellix up`` sets it to its ``--host``."""
    return os.environ.get("AUTELLIX_METRICS_HOST", "0.0.0.0")


class MetricsEndpoint:
    """One registry and, once started with a port, the HTTP server that exposes it on ``/metrics``."""

    def __init__(self, port: int | None, host: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self._want_port = port
        self._host = host if host is not None else metrics_host_from_env()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # Each metric of a service: its name under ``autellix:``, in this endpoint's registry.
    def counter(self, metric: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name(metric), doc, labels, registry=self.registry)

    def gauge(self, metric: str, doc: str) -> Gauge:
        return Gauge(name(metric), doc, registry=self.registry)

    def histogram(
        self, metric: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(name(metric), doc, labels, buckets=buckets, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with 0), or None when not serving."""
        return self._server.server_port if self._server is not None else None

    def start(self) -> None:
        if self._want_port is None or self._server is not None:
            return
        self._server, self._thread = start_http_server(self._want_port, addr=self._host, registry=self.registry)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
