"""The replies that end calls (finals and errors), kept a few seconds to send again after a reconnect.

A reply written to a broker node that then dies is lost, and the engine's connection only learns of
the death afterwards: the caller, reading through another node, never sees its call end. Chunks lost
that way show as a gap at the next chunk (the caller resubmits and the engine resends what it lacks),
but nothing follows a lost final. So after a reconnect the engine sends again every call-ending reply
of the last few seconds before the disconnect and since. A caller that already has its final no longer
listens (the broker drops the copy); one still waiting takes it; one on a newer attempt ignores it.
Pure and synchronous: ``now`` is always passed in.
"""

from __future__ import annotations

from collections import deque

#: how far before a disconnect replies are sent again: what a dying node can have swallowed
REPLAY_WINDOW_S = 10.0
#: a bound on what is kept (at thousands of calls per second, the newest only)
MAX_KEPT = 4096


class RecentReplies:
    def __init__(self, window_s: float = REPLAY_WINDOW_S, max_kept: int = MAX_KEPT) -> None:
        self.window_s = window_s
        self._kept: deque[tuple[float, str, bytes]] = deque(maxlen=max_kept)
        self._disconnected_at: float | None = None

    def __len__(self) -> int:
        return len(self._kept)

    def sent(self, now: float, subject: str, data: bytes) -> None:
        self._kept.append((now, subject, data))
        if self._disconnected_at is None:  # while disconnected, keep all: they go again on reconnect
            self._trim(now - self.window_s)

    def disconnected(self, now: float) -> None:
        if self._disconnected_at is None:
            self._disconnected_at = now

    def reconnected(self, now: float) -> list[tuple[str, bytes]]:
        """What to send again: the replies since ``window_s`` before the disconnect (if there was one)."""
        since = self._disconnected_at
        self._disconnected_at = None
        if since is None:
            return []
        self._trim(since - self.window_s)
        replay = [(subject, data) for _, subject, data in self._kept]
        self._trim(now - self.window_s)
        return replay

    def _trim(self, before: float) -> None:
        while self._kept and self._kept[0][0] < before:
            self._kept.popleft()
