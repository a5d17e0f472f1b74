"""Retained contexts of finished sequences in one memory tier of the ``sim`` backend (device KV or the
CPU tier), matched by token content and evicted in one order.

An entry is what a finished sequence was fed (its tokens, generated ones included), owned by its
program (the work's ``prefix_key``). A lookup finds the program's entry with the longest common prefix
with a new prompt, as a block- or radix-matching engine would, and as the simulator models it (the
nearest cached ancestor's context, or a sibling's copy of it).

Order (:class:`autellix.policy.retention.RetentionIndex`):

- ``program``: entries another entry of the same program extends (an older turn, a tree node whose
  child is cached) first, then ended programs' entries, then least recently used;
- ``lru``: least recently used only (nothing is marked contained or ended).

"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

from autellix.policy.retention import RetentionIndex

Retention = Literal["lru", "program"]
RETENTIONS: tuple[str, ...] = ("lru", "program")


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons, C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _extends(longer: list[int], shorter: list[int]) -> bool:
    return len(shorter) <= len(longer) and longer[: len(shorter)] == shorter


#: tokens per hashed block of the lookup index
BLOCK = 64


def block_chain(program_id: str, ids: list[int]) -> list[int]:
    """A hash per whole block of ``ids``, each chained on the one before (as vLLM hashes its prefix
    cache's blocks) and seeded with the program: equal chain hashes mean equal prefixes."""
    out: list[int] = []
    h = hash(program_id)
    for end in range(BLOCK, len(ids) + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK : end])))
        out.append(h)
    return out


class ContextStore:
    def __init__(self, retention: Retention = "lru") -> None:
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {', '.join(RETENTIONS)}, got {retention!r}")
        self.retention = retention
        self._tokens: dict[str, list[int]] = {}
        self._program: dict[str, str] = {}
        self._by_program: dict[str, dict[str, None]] = {}
        self._order: RetentionIndex[str] = RetentionIndex()
        #: key -> keys of the entries it extends; key -> keys of the entries that extend it
        #: (kept with ``program`` retention only)
        self._extends: dict[str, set[str]] = {}
        self._containers: dict[str, set[str]] = {}
        #: lookup index: each entry's block chain, and chain hash -> the entries with that prefix
        self._chain: dict[str, list[int]] = {}
        #: (dicts, not sets: ties go to the entry retained first, whatever the hash seed)
        self._by_block: dict[int, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: object) -> bool:
        return key in self._tokens

    def __iter__(self) -> Iterator[str]:
        """Keys in eviction order (the next victim first)."""
        return iter(self._order)

    @property
    def tokens(self) -> int:
        return self._order.tokens

    def tokens_of(self, key: str) -> list[int]:
        return self._tokens[key]

    def program_of(self, key: str) -> str:
        return self._program[key]

    def is_contained(self, key: str) -> bool:
        return bool(self._containers.get(key))

    # -- lookups -------------------------------------------------------------------------------
    def longest(self, program_id: str, ids: list[int]) -> tuple[str | None, int]:
        """The program's entry sharing the longest prefix with ``ids``, and that length.

        The block index narrows the search to the entries sharing the most whole blocks with
        ``ids``; only those are compared token by token past them."""
        chain = block_chain(program_id, ids)
        matched = 0
        while matched < len(chain) and chain[matched] in self._by_block:
            matched += 1
        if matched:
            start = matched * BLOCK
            candidates: Iterable[str] = self._by_block[chain[matched - 1]]
        else:  # no entry shares a whole block: the longest common prefix is shorter than one
            start = 0
            candidates = self._by_program.get(program_id, ())
        best, best_key = 0, None
        rest = ids[start : start + BLOCK] if not matched else ids[start:]
        for key in candidates:
            entry = self._tokens[key]
            if len(entry) <= best:
                continue
            common = start + common_prefix(entry[start : start + len(rest)], rest)
            if common > best and (not start or entry[:start] == ids[:start]):  # a hash collision is no match
                best, best_key = common, key
        return best_key, best

    def touch(self, key: str) -> None:
        self._order.touch(key)

    def victim(self) -> str | None:
        return self._order.victim()

    def is_kept(self, key: str) -> bool:
        """Worth moving to another tier when evicted: with ``lru`` always; with ``program`` when no
        other entry contains it and its program has not ended."""
        if self.retention == "lru":
            return True
        return not self.is_contained(key) and not self._order.is_ended(self._program[key])

    # -- changes -------------------------------------------------------------------------------
    def put(self, key: str, program_id: str, tokens: list[int]) -> None:
        """Retain ``tokens`` as the program's most recently used entry (replacing ``key``'s)."""
        if key in self._tokens:
            self.remove(key)
        below: set[str] = set()
        above: set[str] = set()
        chain = block_chain(program_id, tokens)
        if self.retention == "program":
            for other in self._by_program.get(program_id, ()):
                theirs = self._tokens[other]
                mine, its = len(chain), len(self._chain[other])
                if mine and its and chain[min(mine, its) - 1] != self._chain[other][min(mine, its) - 1]:
                    continue  # they differ within their shared whole blocks: neither holds the other
                if _extends(tokens, theirs):  # equal lengths: the newer entry holds the older
                    below.add(other)
                    holders = self._containers[other]
                    holders.add(key)
                    if len(holders) == 1:
                        self._order.set_contained(other, True)
                elif _extends(theirs, tokens):
                    above.add(other)
                    self._extends[other].add(key)
        self._extends[key] = below
        self._containers[key] = above
        self._tokens[key] = tokens
        self._program[key] = program_id
        self._chain[key] = chain
        for h in chain:
            self._by_block.setdefault(h, {})[key] = None
        self._by_program.setdefault(program_id, {})[key] = None
        self._order.add(key, program_id, len(tokens), contained=bool(above))

    def remove(self, key: str) -> tuple[str, list[int]]:
        """Forget an entry; returns its program and tokens."""
        tokens = self._tokens.pop(key)
        program_id = self._program.pop(key)
        keys = self._by_program[program_id]
        del keys[key]
        if not keys:
            del self._by_program[program_id]
        self._order.remove(key)
        for h in self._chain.pop(key):
            keys_with = self._by_block[h]
            del keys_with[key]
            if not keys_with:
                del self._by_block[h]
        for other in self._containers.pop(key):
            self._extends[other].discard(key)
        for other in self._extends.pop(key):
            holders = self._containers[other]
            holders.discard(key)
            if not holders:
                self._order.set_contained(other, False)
        return program_id, tokens

    def end_program(self, program_id: str) -> None:
        if self.retention == "program":
            self._order.end_program(program_id)

    def revive_program(self, program_id: str) -> None:
        """The program called again after it was marked ended."""
        self._order.revive_program(program_id)
