"""Which models the live engines serve, from their heartbeats (pure; the clock is passed in).

An engine is live while its state is ``up`` and its last heartbeat is younger than three of its
intervals, the same rule the schedulers use to declare an engine dead.
"""

from __future__ import annotations

from dataclasses import dataclass

from autellix.proto import EngineHeartbeat

#: heartbeats an engine may miss before it no longer counts
MISSED_BEATS = 3


@dataclass(slots=True)
class _Seen:
    model: str
    state: str
    seen_at: float
    interval_s: float
    first_seen_at: float


class LiveModels:
    def __init__(self) -> None:
        self._engines: dict[str, _Seen] = {}

    def on_heartbeat(self, hb: EngineHeartbeat, now: float) -> None:
        prev = self._engines.get(hb.engine_id)
        first = prev.first_seen_at if prev is not None else now
        self._engines[hb.engine_id] = _Seen(hb.model, hb.state, now, hb.interval_s, first)
        if hb.state == "down":
            del self._engines[hb.engine_id]

    def _live(self, now: float) -> list[_Seen]:
        return [
            s
            for s in self._engines.values()
            if s.state == "up" and now - s.seen_at <= MISSED_BEATS * max(s.interval_s, 0.01)
        ]

    def engines(self, now: float) -> int:
        return len(self._live(now))

    def models(self, now: float) -> dict[str, float]:
        """Model name -> when an engine serving it was first seen (OpenAI's ``created``)."""
        out: dict[str, float] = {}
        for s in self._live(now):
            out[s.model] = min(out.get(s.model, s.first_seen_at), s.first_seen_at)
        return out
