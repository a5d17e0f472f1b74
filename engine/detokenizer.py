"""Incremental detokenisation: the text of newly generated tokens, stable under multi-byte tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: the decoded window slides forward once it holds this many emitted tokens
_WINDOW = 16
#: tokens kept before the unread ones when the window slides, so joins between tokens come out right
_CONTEXT = 4


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens (so joins between tokens, such as a leading space, come out
    as they would in a full decode) and holds text back while it ends in an incomplete UTF-8 sequence
    (U+FFFD). One decode per new token: the text of the window's already-emitted part is kept from the
    previous call and recomputed only when the window slides.
    """

    __slots__ = ("_decode", "_prefix", "_prefix_text", "_read")

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # start of the decoded window
        self._read = 0  # tokens whose text has been emitted
        self._prefix_text = ""  # decode(ids[_prefix:_read])

    def push(self, token_ids: Sequence[int]) -> str:
        """Return the new text after ``token_ids`` (the *whole* output so far) grew."""
        if len(token_ids) <= self._read:
            return ""
        if self._read - self._prefix > _WINDOW:
            self._prefix = self._read - _CONTEXT
            self._prefix_text = self._decode(token_ids[self._prefix : self._read])
        full_text = self._decode(token_ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(self._prefix_text):
            return ""
        delta = full_text[len(self._prefix_text) :]
        self._prefix_text = full_text
        self._read = len(token_ids)
        return delta
