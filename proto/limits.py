"""Every limit on what the mesh accepts from the wire, and the validators that enforce them.

Any NATS client can publish on any subject, so every input is bounded before a service uses it: one
message must never end a task, close a connection (nats-server closes a connection that publishes a
subject over its control-line limit) or make a write fail for ever. The limits live here and the wire
structs in :mod:`messages` carry them as msgspec constraints, so decoding *is* validation: a value
out of bounds is a ``msgspec.ValidationError`` at the edge, in every service alike.

Subjects a service will publish to (``reply_to``) must be valid NATS subjects for publishing: dot-
separated tokens of visible ASCII, no wildcards, no whitespace. Ids that name a subject token
(``engine_id``) must be one token. Other ids (``program_id``, ``call_id``) are free text up to
:data:`MAX_ID_CHARS`; where they become storage keys they go through :func:`storage_key`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Annotated

import msgspec

#: program, call and parent ids (free text)
MAX_ID_CHARS = 256
#: a reply subject; nats-server's control line is 4 KiB by default and holds subject and reply
MAX_SUBJECT_CHARS = 512
#: engine ids are one subject token
MAX_TOKEN_CHARS = 128
#: chat messages in one call
MAX_MESSAGES = 4096
#: characters of one message's content, or of a raw prompt (NATS' 1 MB payload bounds them anyway)
MAX_TEXT_CHARS = 1 << 20
#: a message's role, a model or backend name, a reason
MAX_NAME_CHARS = 256
#: parent calls one call may name
MAX_PARENTS = 1024
#: tokens a resubmission may carry
MAX_RESUME_TOKENS = 1 << 17
#: resubmissions of one call
MAX_ATTEMPT = 10_000
#: nesting of arrays and objects in any JSON message; the contract needs 3 (messages list of objects)
MAX_JSON_DEPTH = 16
#: one message; nats-server's own default max_payload is 1 MiB
MAX_MESSAGE_BYTES = 8 << 20
#: token ids fit a signed 32-bit int
MAX_TOKEN_ID = (1 << 31) - 1
#: sampling temperature
MAX_TEMPERATURE = 100.0
#: call paths, handed-back and active calls a persisted program record keeps of each (the newest),
#: so a record stays below the broker's 1 MiB payload limit even with ids at their longest
MAX_PERSISTED_CALL_PATHS = 512

# Visible ASCII but '.', '*', '>' (0x21-0x7e without 0x2a, 0x2e, 0x3e).
_TOKEN_CHARS = r"[!-)+\-,/-=?-~]"
_TOKEN_RE = re.compile(rf"{_TOKEN_CHARS}+")
_SUBJECT_RE = re.compile(rf"{_TOKEN_CHARS}+(?:\.{_TOKEN_CHARS}+)*")

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
#: "" (none given) or a publishable NATS subject
ReplySubject = Annotated[
    str, msgspec.Meta(max_length=MAX_SUBJECT_CHARS, pattern=rf"^(?:$|{_TOKEN_CHARS}+(?:\.{_TOKEN_CHARS}+)*$)")
]
#: "" or one subject token
Token = Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS, pattern=rf"^{_TOKEN_CHARS}*$")]
#: one non-empty subject token
RequiredToken = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_CHARS, pattern=rf"^{_TOKEN_CHARS}+$")]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
Attempt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPT)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
ResumeTokens = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_RESUME_TOKENS)]
Parents = Annotated[list[Id], msgspec.Meta(max_length=MAX_PARENTS)]
#: a count or a size that cannot be negative
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
#: a duration: not negative, and below a century
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=3.2e9)]
#: an absolute Unix time or 0
Epoch = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]
#: a priority stamp (service seconds); finite and bounded either side
Priority = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]


def is_subject(value: str) -> bool:
    """Whether ``value`` is a NATS subject a service may publish to (no wildcards, within the limit)."""
    return 0 < len(value) <= MAX_SUBJECT_CHARS and _SUBJECT_RE.fullmatch(value) is not None


def is_token(value: str) -> bool:
    """Whether ``value`` is one subject token within the limit."""
    return 0 < len(value) <= MAX_TOKEN_CHARS and _TOKEN_RE.fullmatch(value) is not None


def is_id(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS


class TooDeep(msgspec.DecodeError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH`, or a message over :data:`MAX_MESSAGE_BYTES`."""


def check_shape(data: bytes) -> None:
    """Raise :class:`TooDeep` for a message too large or nested too deep to decode safely.

    msgspec recurses on nested untyped JSON and ends in ``RecursionError`` (not a DecodeError) around
    1,000 levels; this runs first. Counting brackets is a C-speed upper bound on the depth, so most
    messages stop there. Otherwise strings are cut out, only brackets kept, and innermost pairs removed
    one level per pass: brackets left after :data:`MAX_JSON_DEPTH` passes mean deeper nesting (or
    unbalanced brackets: not JSON either way). Every step is a C-level bytes or regex operation, so a
    1 MB message of brackets costs milliseconds, not a Python loop per byte."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise TooDeep(f"the message is {len(data)} bytes, above the limit of {MAX_MESSAGE_BYTES}")
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    # objects count as arrays for depth: "{" -> "[", "}" -> "]", everything else dropped
    structure = _STRING_RE.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not structure:
            return
        structure = structure.replace(b"[]", b"")
    if structure:
        raise TooDeep(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")


_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def storage_key(value: str) -> str:
    """A key for a JetStream key-value bucket (``[-_=A-Za-z0-9]``, bounded length) naming ``value``.

    Short values are base64url-encoded (readable back, and the keys earlier versions wrote); long ones
    are hashed. A hashed key starts with ``=``, which base64url keys never hold (their padding is
    stripped), so the two kinds cannot collide."""
    raw = value.encode()
    if len(raw) <= 64:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=") or "_"
    return "=" + hashlib.sha256(raw).hexdigest()


def explain(exc: msgspec.DecodeError) -> str:
    """A sentence for people about a rejected field (msgspec's own text, but for the regexes)."""
    text = str(exc)
    if text.endswith("`$.reply_to`") and "regex" in text:
        return (
            "reply_to must be a NATS subject to publish to: dot-separated tokens of visible ASCII with no"
            f" spaces, tabs or wildcards (* >), at most {MAX_SUBJECT_CHARS} characters - at `$.reply_to`"
        )
    if "regex" in text:
        field = text.rsplit(" - at ", 1)[-1] if " - at " in text else "a field"
        return f"{field} must be one NATS subject token (visible ASCII, no dots, spaces or wildcards)"
    return text
