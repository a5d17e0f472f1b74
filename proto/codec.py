"""Encoders and decoders, built once. JSON everywhere a person may publish or read by hand."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from .limits import check_shape
from .messages import CallReply

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
_reply_decoder: msgspec.json.Decoder[CallReply] = msgspec.json.Decoder(CallReply)  # type: ignore[arg-type]


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode JSON bytes into ``kind``; raises msgspec.DecodeError / ValidationError, also for a
    message too large or nested too deep (:func:`limits.check_shape`), before any parsing."""
    check_shape(data)
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder.decode(data)


def decode_reply(data: bytes) -> CallReply:
    """Decode one message of a call's reply stream (chunk, final or error)."""
    check_shape(data)
    return _reply_decoder.decode(data)
