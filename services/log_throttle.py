"""Rate limits for log lines that a flood of bad input or a lasting fault would repeat.

A service that logs every rejected message, or every failed retry of a broken connection, can write
tens of thousands of lines a minute and bury the one line that says what is wrong. Each kind of
repeated line goes through :class:`LogThrottle`: the first few pass, then one per window, carrying
how many were held back since the last one.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    """Per key: ``burst`` lines pass at once, then at most one per ``every_s``. Pure; clock injected."""

    def __init__(self, every_s: float = 10.0, burst: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.burst = burst
        self._clock = clock
        #: key -> [lines allowed in the current window, window start, lines suppressed]
        self._state: dict[str, list[float]] = {}

    def allow(self, key: str) -> int | None:
        """None: drop this line. Otherwise log it, with the returned count of lines held back."""
        now = self._clock()
        state = self._state.get(key)
        if state is None or now - state[1] >= self.every_s:
            if len(self._state) > 1024:  # keys are a small fixed set; never let them grow
                self._state.clear()
            suppressed = int(state[2]) if state is not None else 0
            self._state[key] = [1, now, 0]
            return suppressed
        if state[0] < self.burst:
            state[0] += 1
            return 0
        state[2] += 1
        return None

    def log(self, log: object, event: str, *, key: str | None = None, level: str = "warning", **fields: object) -> None:
        """Log ``event`` on ``log`` (a structlog logger) at ``level`` unless throttled under ``key``
        (default: the event text); a line after a quiet spell says how many it held back."""
        held = self.allow(key or event)
        if held is None:
            return
        if held:
            fields["suppressed"] = held
        getattr(log, level)(event, **fields)
