"""Cached contexts of finished calls in one memory tier of a simulated engine (GPU KV or CPU pool).

An entry is a finished call's context (prompt + output). It *covers* its own context and every
ancestor's along the call's context chain (a prompt that extends an ancestor's context can reuse the
entry's KV for that prefix). ``covers`` answers "does any entry hold this call's context?".

Eviction order:

- ``lru`` (``retain=False``): least recently used first; what the simulator always did.
- ``retain``: the shared retention policy, :class:`autellix.policy.retention.RetentionIndex`, the same
  the engines use: entries another entry contains first (their KV is already held by that entry, in a
  block-sharing engine they cost nothing), then contexts of ended programs, then least recently used.
  Never by attained service: that evicts the programs that call again soonest.

``active_tokens`` is the KV held for programs that have not ended, contained entries left out (the
door's "retained contexts of active programs"); it is exact only with ``retain``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from autellix.policy.retention import RetentionIndex

if TYPE_CHECKING:
    from autellix.sim.engine_model import SimCall


class ContextPool:
    def __init__(self, retain: bool) -> None:
        self.retain = retain
        self._entries: dict[str, tuple[SimCall, int]] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._index = RetentionIndex() if retain else None
        #: call key -> how many entries hold that call's context as their prefix (itself included)
        self._covered: dict[str, int] = {}
        self._contained: set[str] = set()
        self._ended: set[str] = set()
        #: program id -> tokens of its entries that no other entry contains
        self._own: dict[str, int] = {}
        self.tokens = 0
        self.active_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def covers(self, key: str) -> bool:
        return key in self._covered

    def entry(self, key: str) -> tuple[SimCall, int]:
        return self._entries[key]

    def touch(self, key: str) -> None:
        if self._index is not None:
            self._index.touch(key)
        else:
            self._lru.move_to_end(key)

    def victim(self) -> str | None:
        if self._index is not None:
            return self._index.victim()  # type: ignore[return-value]
        return next(iter(self._lru), None)

    def is_kept(self, key: str) -> bool:
        """Worth keeping elsewhere: no other entry contains it and its program has not ended."""
        c, _ = self._entries[key]
        return key not in self._contained and c.program_id not in self._ended

    # --- changes ------------------------------------------------------------------------------
    def put(self, c: SimCall, tokens: int) -> None:
        key = c.key
        if key in self._entries:
            self.remove(key)
        self._entries[key] = (c, tokens)
        self.tokens += tokens
        covered = self._covered
        contained = covered.get(key, 0) > 0  # a descendant's entry already holds this context
        covered[key] = covered.get(key, 0) + 1
        a = c.history
        while a is not None:
            n = covered.get(a.key, 0) + 1
            covered[a.key] = n
            if n == 2 and a.key in self._entries:
                self._set_contained(a.key, True)
            a = a.history
        if self._index is not None:
            self._index.add(key, c.program_id, tokens, contained=contained)
            if c.program_id in self._ended:
                self._index.end_program(c.program_id)
        else:
            self._lru[key] = None
        if contained:
            self._contained.add(key)
        else:
            self._own_add(c.program_id, tokens)

    def remove(self, key: str) -> tuple[SimCall, int]:
        c, tokens = self._entries.pop(key)
        self.tokens -= tokens
        if self._index is not None:
            self._index.remove(key)
        else:
            del self._lru[key]
        if key in self._contained:
            self._contained.discard(key)
        else:
            self._own_add(c.program_id, -tokens)
        covered = self._covered
        a: SimCall | None = c
        while a is not None:
            n = covered[a.key] - 1
            if n:
                covered[a.key] = n
                if n == 1 and a is not c and a.key in self._entries:
                    self._set_contained(a.key, False)
            else:
                del covered[a.key]
            a = a.history
        return c, tokens

    def end_program(self, program_id: str) -> None:
        if program_id in self._ended:
            return
        self._ended.add(program_id)
        self.active_tokens -= self._own.get(program_id, 0)
        if self._index is not None:
            self._index.end_program(program_id)

    # --- internals ----------------------------------------------------------------------------
    def _own_add(self, program_id: str, tokens: int) -> None:
        left = self._own.get(program_id, 0) + tokens
        if left:
            self._own[program_id] = left
        else:
            self._own.pop(program_id, None)
        if program_id not in self._ended:
            self.active_tokens += tokens

    def _set_contained(self, key: str, contained: bool) -> None:
        c, tokens = self._entries[key]
        if contained:
            self._contained.add(key)
            self._own_add(c.program_id, -tokens)
        else:
            self._contained.discard(key)
            self._own_add(c.program_id, tokens)
        if self._index is not None:
            self._index.set_contained(key, contained)
