"""Queue-boundary calibration from the observed distribution of call service.

A fixed ladder of boundaries leaves the queues inert when it does not match the workload: too low
and every program sits in the bottom queue (FCFS again), too high and everything sits in the top
one. :class:`ServiceCalibrator` keeps a sliding window of recent call service times and proposes
boundaries that start at a low percentile of them and double: ``p, 2p, 4p, ...``.
"""

from __future__ import annotations

from collections import deque

from autellix.policy.mlfq import doubling_boundaries


class ServiceCalibrator:
    """Sliding window of call service times (seconds) -> queue boundaries.

    ``percentile`` of the window is the first boundary once ``min_samples`` have been seen; before
    that :meth:`boundaries` returns ``None`` (keep the configured defaults).
    """

    def __init__(self, percentile: float = 25.0, window: int = 4096, min_samples: int = 100) -> None:
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"percentile must be in (0, 100), got {percentile}")
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be >= 1")
        self.percentile = percentile
        self.min_samples = min_samples
        self._window: deque[float] = deque(maxlen=window)
        self.observed = 0

    def observe(self, service_s: float) -> None:
        if service_s < 0:
            raise ValueError(f"service must be >= 0, got {service_s}")
        self._window.append(service_s)
        self.observed += 1

    @property
    def ready(self) -> bool:
        return len(self._window) >= self.min_samples

    def first_boundary(self) -> float | None:
        """The percentile of the window (nearest-rank), or None while too few samples."""
        if not self.ready:
            return None
        ordered = sorted(self._window)
        rank = max(0, min(len(ordered) - 1, round(self.percentile / 100.0 * len(ordered)) - 1))
        return max(ordered[rank], 1e-6)

    def boundaries(self, num_levels: int, growth: float = 2.0) -> tuple[float, ...] | None:
        first = self.first_boundary()
        if first is None:
            return None
        return doubling_boundaries(first, num_levels, growth)
