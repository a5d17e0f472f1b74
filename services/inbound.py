"""Decoding what arrives on a subscription: a message that does not decode is dropped, with a
warning that a flood of bad messages cannot turn into a flood of log lines."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from autellix.proto import decode

from .log_throttle import LogThrottle

T = TypeVar("T")


def decode_or_drop(data: bytes, kind: type[T], log: Any, throttle: LogThrottle, what: str) -> T | None:
    """``data`` as a ``kind``, or None after a throttled ``bad <what> dropped`` warning on ``log``."""
    try:
        return decode(data, kind)
    except msgspec.MsgspecError as exc:
        throttle.log(log, f"bad {what} dropped", error=str(exc)[:300])
        return None
