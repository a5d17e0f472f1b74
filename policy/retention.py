"""Which retained KV entry to evict next: the one eviction order every KV cache here shares.

An engine keeps the KV of finished calls (a program's context) so that the program's next call
prefills only its new input. When running calls need the room, a retained entry must go. The
order, from first to last out (DESIGN.md, "Where the gains live"):

1. **contained** entries: an entry whose tokens another retained entry already holds as a prefix
   (an older turn of a conversation, a tree-search node whose child is cached). Evicting it loses
   nothing a lookup could not find in the longer entry.
2. entries of **ended** programs (ended explicitly, or by the tracker's idle TTL): nobody will ask
   for them again.
3. everything else, **least recently used** first.

Never by attained service: the programs PLAS ranks last are the ones that call again soonest, and
evicting them measured 0.59-0.87x of LRU's stable capacity.

Pure and synchronous: no clocks (recency is the order of ``add``/``touch`` calls), no I/O. Used by
the simulator's engine model, the ``sim`` backend and the ``hf`` backend's prefix cache alike; each
keeps its own entries (token lists, KV slots, modelled sizes) and asks this index for the order.
All operations are O(1) amortised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: eviction classes, first out first
CONTAINED, ENDED, LIVE = 0, 1, 2


@dataclass(slots=True)
class _Entry:
    program_id: str
    tokens: int
    contained: bool
    cls: int


class RetentionIndex(Generic[K]):
    """Retained entries by eviction class, least recently used first within a class."""

    def __init__(self) -> None:
        self._entries: dict[K, _Entry] = {}
        self._classes: tuple[OrderedDict[K, None], ...] = (OrderedDict(), OrderedDict(), OrderedDict())
        self._ended: set[str] = set()
        self._program_tokens: dict[str, int] = {}
        #: program id -> its keys in the order they were retained (a dict, not a set: ending a
        #: program moves them in this order, which must not depend on the interpreter's hash seed)
        self._program_entries: dict[str, dict[K, None]] = {}
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys in eviction order (the next victim first)."""
        for cls in self._classes:
            yield from cls

    def _class_of(self, program_id: str, contained: bool) -> int:
        if contained:
            return CONTAINED
        return ENDED if program_id in self._ended else LIVE

    def _move(self, key: K, entry: _Entry) -> None:
        cls = self._class_of(entry.program_id, entry.contained)
        if cls != entry.cls:
            del self._classes[entry.cls][key]
            self._classes[cls][key] = None  # joins its new class as its most recently used
            entry.cls = cls

    # -- entries -------------------------------------------------------------------------------
    def add(self, key: K, program_id: str, tokens: int, contained: bool = False) -> None:
        """Retain an entry as the most recently used (replacing one of the same key).

        A program that adds an entry is active again, even if it was marked ended."""
        if tokens < 0:
            raise ValueError(f"an entry holds >= 0 tokens, got {tokens}")
        if key in self._entries:
            self.remove(key)
        self.revive_program(program_id)
        cls = self._class_of(program_id, contained)
        self._entries[key] = _Entry(program_id, tokens, contained, cls)
        self._classes[cls][key] = None
        self.tokens += tokens
        self._program_tokens[program_id] = self._program_tokens.get(program_id, 0) + tokens
        self._program_entries.setdefault(program_id, {})[key] = None

    def touch(self, key: K) -> None:
        """The entry was used (a cache hit): it becomes the most recently used of its class."""
        entry = self._entries.get(key)
        if entry is not None:
            self._classes[entry.cls].move_to_end(key)

    def remove(self, key: K) -> int:
        """Forget an entry (evicted, or taken over by a running call); returns its tokens (0 if absent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        del self._classes[entry.cls][key]
        self.tokens -= entry.tokens
        pid = entry.program_id
        left = self._program_tokens[pid] - entry.tokens
        keys = self._program_entries[pid]
        del keys[key]
        if keys:
            self._program_tokens[pid] = left
        else:
            del self._program_tokens[pid]
            del self._program_entries[pid]
            self._ended.discard(pid)  # nothing of it left to order
        return entry.tokens

    def set_contained(self, key: K, contained: bool) -> None:
        """Another entry now holds (or no longer holds) this entry's tokens as its prefix."""
        entry = self._entries.get(key)
        if entry is not None and entry.contained != contained:
            entry.contained = contained
            self._move(key, entry)

    # -- programs ------------------------------------------------------------------------------
    def end_program(self, program_id: str) -> None:
        """The program ended: its entries go before every live program's. No-op if none is held."""
        keys = self._program_entries.get(program_id)
        if not keys or program_id in self._ended:
            return
        self._ended.add(program_id)
        for key in list(keys):
            self._move(key, self._entries[key])

    def revive_program(self, program_id: str) -> None:
        """The program called again after it was marked ended: its entries are live again."""
        if program_id not in self._ended:
            return
        self._ended.discard(program_id)
        for key in list(self._program_entries.get(program_id, ())):
            self._move(key, self._entries[key])

    def is_ended(self, program_id: str) -> bool:
        return program_id in self._ended

    def program_tokens(self, program_id: str) -> int:
        """Tokens retained for one program (all its entries, contained ones included)."""
        return self._program_tokens.get(program_id, 0)

    def program_of(self, key: K) -> str | None:
        entry = self._entries.get(key)
        return entry.program_id if entry is not None else None

    def tokens_of(self, key: K) -> int:
        entry = self._entries.get(key)
        return entry.tokens if entry is not None else 0

    def active_tokens(self) -> int:
        """Tokens retained for programs not marked ended (the active programs' working set)."""
        ended = sum(self._program_tokens.get(p, 0) for p in self._ended)
        return self.tokens - ended

    # -- eviction ------------------------------------------------------------------------------
    def victim(self) -> K | None:
        """The entry to evict next, or None when nothing is retained."""
        for cls in self._classes:
            if cls:
                return next(iter(cls))
        return None

    def pop_victim(self) -> tuple[K, int] | None:
        """Remove and return the next victim and its tokens."""
        key = self.victim()
        if key is None:
            return None
        return key, self.remove(key)
