"""decode_or_drop: every service's handler for a message that may not decode."""

from __future__ import annotations

from typing import Any

from autellix.proto import CallAbort, encode
from autellix.services.inbound import decode_or_drop
from autellix.services.log_throttle import LogThrottle


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_a_good_message_decodes_and_logs_nothing() -> None:
    log = _Log()
    abort = decode_or_drop(encode(CallAbort(call_id="c1")), CallAbort, log, LogThrottle(), "abort")
    assert abort == CallAbort(call_id="c1") and not log.lines


def test_bad_messages_are_dropped_with_a_throttled_warning() -> None:
    log, now = _Log(), [0.0]
    throttle = LogThrottle(every_s=10.0, burst=2, clock=lambda: now[0])
    for data in (b"not json", b'{"call_id": 5}', b"[]", b"{"):
        assert decode_or_drop(data, CallAbort, log, throttle, "abort") is None
    assert [event for event, _ in log.lines] == ["bad abort dropped"] * 2  # the rest held back
    assert "call_id" in log.lines[1][1]["error"]
    now[0] = 11.0
    assert decode_or_drop(b"x" * 1000, CallAbort, log, throttle, "abort") is None
    _, fields = log.lines[-1]
    assert fields["suppressed"] == 2 and len(fields["error"]) <= 300
