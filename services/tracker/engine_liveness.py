"""Which engines are alive, from their heartbeats, so the tracker can reconcile active calls.

A call dispatched to an engine that then dies never gets its completed event. The scheduler tells
its caller to resubmit (a new dispatch names the new engine); if the caller never does, the call
would stay among its program's active calls. When an engine says it is down, or misses three
heartbeats, the tracker drops the active calls still recorded on it. Pure; ``now`` is passed in.
"""

from __future__ import annotations

from autellix.proto import EngineHeartbeat

#: missed heartbeat intervals after which an engine counts as gone (as the schedulers count)
MISSED_BEATS = 3.0


class EngineLiveness:
    def __init__(self) -> None:
        #: engine id -> (last heartbeat at, its interval)
        self._seen: dict[str, tuple[float, float]] = {}
        self._gone: list[str] = []

    def on_heartbeat(self, hb: EngineHeartbeat, now: float) -> None:
        if hb.state == "down":
            self._seen.pop(hb.engine_id, None)
            self._gone.append(hb.engine_id)
            return
        self._seen[hb.engine_id] = (now, max(hb.interval_s, 0.05))

    def gone(self, now: float) -> list[str]:
        """Engines gone since the last call: said they were down, or stopped heartbeating."""
        silent = [eid for eid, (at, interval) in self._seen.items() if now - at > MISSED_BEATS * interval]
        for eid in silent:
            del self._seen[eid]
        out, self._gone = self._gone + silent, []
        return list(dict.fromkeys(out))
