"""A call queue ordered by a fixed key per call: the shape SRPT takes in the simulator.

Same interface as :class:`autellix.policy.mlfq.MultiLevelQueues` (add, remove, started, stopped,
charge, promote_starved, order, sort_key), so an engine can hold either. Smaller keys are served
first; equal keys in the order they were added. Keys never change: ``charge`` only records service
and nothing is ever promoted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class StaticPriorityQueue:
    def __init__(self) -> None:
        self._sorted: list[tuple[float, int, str]] = []
        self._keys: dict[str, tuple[float, int, str]] = {}
        self._service: dict[str, float] = {}
        self._waiting: list[tuple[float, int, str]] = []
        self._is_waiting: dict[str, bool] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._keys

    def add(
        self,
        call_id: str,
        priority: float,
        now: float,
        *,
        program_wait_s: float = 0.0,
        program_service_s: float = 0.0,
    ) -> int:
        """Queue ``call_id`` with key ``priority``; returns 0 (there are no levels)."""
        if call_id in self._keys:
            raise KeyError(f"call {call_id!r} is already queued")
        self._seq += 1
        item = (float(priority), self._seq, call_id)
        bisect.insort(self._sorted, item)
        self._keys[call_id] = item
        self._service[call_id] = 0.0
        bisect.insort(self._waiting, item)
        self._is_waiting[call_id] = True
        return 0

    def is_waiting(self, call_id: str) -> bool:
        return self._is_waiting[call_id]

    def waiting_count(self) -> int:
        return len(self._waiting)

    def remove(self, call_id: str) -> None:
        item = self._keys.pop(call_id)
        del self._service[call_id]
        del self._sorted[bisect.bisect_left(self._sorted, item)]
        if self._is_waiting.pop(call_id):
            del self._waiting[bisect.bisect_left(self._waiting, item)]

    def started(self, call_id: str, now: float) -> None:
        item = self._keys[call_id]
        if self._is_waiting[call_id]:
            del self._waiting[bisect.bisect_left(self._waiting, item)]
            self._is_waiting[call_id] = False

    def stopped(self, call_id: str, now: float) -> None:
        item = self._keys[call_id]
        if not self._is_waiting[call_id]:
            bisect.insort(self._waiting, item)
            self._is_waiting[call_id] = True

    def charge(self, call_id: str, service_s: float) -> int:
        if service_s < 0:
            raise ValueError(f"service must be >= 0, got {service_s}")
        self._service[call_id] += service_s
        return 0

    def service_of(self, call_id: str) -> float:
        return self._service[call_id]

    def promote_starved(self, now: float) -> list[str]:
        return []

    def sort_key(self, call_id: str) -> tuple[float, int]:
        key, seq, _ = self._keys[call_id]
        return (key, seq)

    def displaces(self, waiting_id: str, running_id: str) -> bool:
        """A waiting call displaces a running one whenever it is ahead in the order (no gap: the
        oracle's keys are exact)."""
        return self.sort_key(waiting_id) < self.sort_key(running_id)

    def order(self) -> Iterator[str]:
        """Call ids by ascending key, ties in arrival order. Do not mutate while iterating."""
        for _, _, call_id in self._sorted:
            yield call_id

    def order_waiting(self) -> Iterator[str]:
        """The waiting calls only, in :meth:`order` order. Do not mutate while iterating."""
        for _, _, call_id in self._waiting:
            yield call_id
