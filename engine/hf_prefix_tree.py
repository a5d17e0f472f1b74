"""A radix tree over token ids: which retained entry shares the longest prefix with a prompt.

Each retained entry (a finished sequence's KV) is a path from the root; the tree compresses runs
of tokens into edges, as SGLang's radix cache does. We chose a tree over vLLM's chain of block
hashes because the ``hf`` backend keeps a sequence's KV in *one* slot (no pages), so a hit is "the
first ``m`` tokens of one entry", at token granularity: a tree gives the exact ``m`` and an entry
that holds it in one walk, with no block-size rounding.

- :meth:`PrefixTree.match` walks a prompt down the tree and returns the longest common prefix with
  any entry, and the node under which every entry holds it.
- An entry is **contained** when another entry holds all its tokens as a prefix (an older turn of
  the same chat, a tree-search node whose child is retained): :meth:`contained` says so, and
  :meth:`insert`/:meth:`remove` return the entries whose containment may have changed, so that the
  caller can update its :class:`autellix.policy.retention.RetentionIndex`.

Pure Python, no torch: unit-tested on its own. Costs are O(length of the walk) in tokens compared
(slices compared in C) plus O(depth) nodes touched.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_CHUNK = 64


def common_prefix(a: Sequence[int], b: Sequence[int], a_start: int = 0) -> int:
    """Length of the common prefix of ``a[a_start:]`` and ``b`` (chunks compared as list slices)."""
    n = min(len(a) - a_start, len(b))
    i = 0
    while i + _CHUNK <= n and a[a_start + i : a_start + i + _CHUNK] == b[i : i + _CHUNK]:
        i += _CHUNK
    while i < n and a[a_start + i] == b[i]:
        i += 1
    return i


class Node(Generic[K]):
    __slots__ = ("below", "children", "depth", "edge", "ends", "parent")

    def __init__(self, edge: list[int], parent: Node[K] | None, depth: int) -> None:
        self.edge = edge  # tokens from the parent to this node
        self.parent = parent
        self.depth = depth  # tokens from the root to the end of this node's edge
        self.children: dict[int, Node[K]] = {}
        self.ends: set[K] = set()  # entries whose tokens end exactly here
        self.below = 0  # entries ending at this node or under it


class PrefixTree(Generic[K]):
    def __init__(self) -> None:
        self.root: Node[K] = Node([], None, 0)
        self._nodes: dict[K, Node[K]] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    # -- lookup --------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[int, Node[K]]:
        """The longest common prefix of ``tokens`` with any entry, and the node under which every
        entry holds that prefix (the root, with length 0, when nothing matches)."""
        node = self.root
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = common_prefix(tokens, child.edge, i)
            i += common
            node = child
            if common < len(child.edge):
                break
        return i, node

    def entries_under(self, node: Node[K]) -> Iterator[K]:
        """Entries ending at ``node`` or below it, nearest first (depth-first)."""
        stack = [node]
        while stack:
            n = stack.pop()
            yield from n.ends
            stack.extend(n.children.values())

    def pick(self, node: Node[K], prefer: Callable[[K], bool] | None = None) -> K | None:
        """An entry under ``node``: the first that ``prefer`` accepts, else any."""
        first: K | None = None
        for key in self.entries_under(node):
            if prefer is None or prefer(key):
                return key
            if first is None:
                first = key
        return first

    def find(self, tokens: Sequence[int]) -> K | None:
        """An entry whose tokens are exactly ``tokens``, if any."""
        m, node = self.match(tokens)
        if m != len(tokens) or node.depth != m or not node.ends:
            return None
        return next(iter(node.ends))

    def contained(self, key: K) -> bool:
        """Another entry holds all of this entry's tokens (it ends at or under this one's node)."""
        return self._nodes[key].below > 1

    # -- updates -------------------------------------------------------------------------------
    def insert(self, key: K, tokens: Sequence[int]) -> list[K]:
        """Add an entry; returns the entries whose containment may have changed (the new one included)."""
        if key in self._nodes:
            raise KeyError(f"entry {key!r} is already in the tree")
        node = self.root
        i = 0
        n = len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                leaf: Node[K] = Node(list(tokens[i:]), node, n)
                node.children[tokens[i]] = leaf
                node = leaf
                i = n
                break
            common = common_prefix(tokens, child.edge, i)
            if common < len(child.edge):
                child = self._split(child, common)
            i += common
            node = child
        node.ends.add(key)
        self._nodes[key] = node
        affected: list[K] = []
        walk: Node[K] | None = node
        while walk is not None:
            walk.below += 1
            affected.extend(walk.ends)
            walk = walk.parent
        return affected

    def remove(self, key: K) -> list[K]:
        """Forget an entry; returns the entries whose containment may have changed."""
        node = self._nodes.pop(key)
        node.ends.discard(key)
        affected: list[K] = []
        walk: Node[K] | None = node
        while walk is not None:
            walk.below -= 1
            affected.extend(walk.ends)
            walk = walk.parent
        self._prune(node)
        return affected

    def _split(self, child: Node[K], at: int) -> Node[K]:
        """Cut ``child``'s edge after ``at`` tokens; returns the new middle node."""
        parent = child.parent
        assert parent is not None
        mid: Node[K] = Node(child.edge[:at], parent, child.depth - len(child.edge) + at)
        mid.below = child.below
        parent.children[mid.edge[0]] = mid
        child.edge = child.edge[at:]
        child.parent = mid
        mid.children[child.edge[0]] = child
        return mid

    def _prune(self, node: Node[K]) -> None:
        """Remove a node left with no entries; merge a pass-through node into its only child."""
        while node is not self.root and not node.ends and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.edge[0]]
            node = parent
        if node is not self.root and not node.ends and len(node.children) == 1:
            (child,) = node.children.values()
            parent = node.parent
            assert parent is not None
            child.edge = node.edge + child.edge
            child.parent = parent
            parent.children[child.edge[0]] = child
