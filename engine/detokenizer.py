"""Incremental detokenisation: the text of newly generated tokens, stable under multi-byte tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (a few tokens before the unread ones, so joins between tokens come out
    right) and holds text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    __slots__ = ("_decode", "_prefix", "_read")

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted

    def push(self, token_ids: Sequence[int]) -> str:
        """Return the new text after ``token_ids`` (the *whole* output so far) grew."""
        if len(token_ids) <= self._read:
            return ""
        prefix_text = self._decode(token_ids[self._prefix : self._read])
        full_text = self._decode(token_ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = max(0, len(token_ids) - 4)
        # keep the window aligned: the emitted text is everything up to len(token_ids)
        self._read = len(token_ids)
        return delta
