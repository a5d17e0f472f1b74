"""Stop sequences applied to a stream of text (pure).

The engines know nothing of OpenAI's ``stop``: the gateway watches the text as it streams, holds
back the end of it while it could still be the start of a stop string, and cuts the answer where one
appears (the stop string itself is not returned, as OpenAI does). The gateway then aborts the call.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    __slots__ = ("_buf", "_stops", "done")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buf = ""
        #: a stop string was found: nothing more is to be emitted
        self.done = False

    def feed(self, text: str) -> str:
        """The text that is safe to emit now."""
        if self.done:
            return ""
        if not self._stops:
            return text
        buf = self._buf + text
        cut = _first_match(buf, self._stops)
        # the end of the text that could still grow into a stop string (the longest such suffix)
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        start = len(buf) - hold
        if cut >= 0 and cut <= start:  # no longer stop can begin before this match
            self.done = True
            self._buf = ""
            return buf[:cut]
        self._buf = buf[start:]
        return buf[:start]

    def flush(self) -> str:
        """What was held back, once the text has ended, up to a stop string found in it."""
        out, self._buf = ("" if self.done else self._buf), ""
        cut = _first_match(out, self._stops)
        if cut < 0:
            return out
        self.done = True  # a stop found only in the held text still ends the answer with "stop"
        return out[:cut]


def _first_match(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text``; -1 for none."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
