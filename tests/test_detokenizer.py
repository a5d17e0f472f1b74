from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from autellix.engine.detokenizer import IncrementalDetokenizer


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level 'tokenizer': every token is one byte, so characters split across tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(min_size=1, max_size=80))
def test_deltas_add_up_to_the_full_decode(text: str) -> None:
    ids = list(text.encode("utf-8"))
    detok = IncrementalDetokenizer(byte_decode)
    pieces = [detok.push(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multi_byte_character_is_held_until_complete() -> None:
    ids = list("é".encode())
    detok = IncrementalDetokenizer(byte_decode)
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids) == "é"
    assert detok.push(ids) == ""
