"""RadixCache: a radix tree over request keys whose nodes own KV slots, for prefix reuse.

A key is a sequence of ints: token ids, or token ids with an image-content hash standing in for
an image's placeholder tokens, so two requests with different images part ways at the first
differing element. Each edge carries a run of key elements and the KV slots computed for them;
the slots along the path from the root spell out the KV of the whole prefix.

Ownership, the rule everything else follows: a slot belongs either to the tree or to exactly one
request, never both. A request that reused a prefix holds the tree's slots for it (and a lock so
they stay put); everything after that it allocated itself. When the request finishes, the tree
takes its slots: where the tree already has an entry for a position (the reused prefix, or a
part another request inserted meanwhile) the request's own copy is a duplicate and goes back to
the allocator; the rest hangs off the tree as a new leaf.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pymllm.mem_cache.base_prefix_cache import PrefixCache, PrefixMatch
from pymllm.mem_cache.memory_pool import KVAllocationError, TokenToKVPoolAllocator

Key = Tuple[int, ...]
_EMPTY = np.empty(0, dtype=np.int64)


class _Node:
    __slots__ = ("key", "slots", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: Key, slots: np.ndarray, parent: Optional["_Node"], last_access: int):
        self.key = key
        self.slots = slots  # one KV slot per element of `key`
        self.parent = parent  # None for the root and for nodes no longer in the tree
        self.children: Dict[int, _Node] = {}  # first key element -> child
        # Locks held on this node or any node below it: a lock covers the whole path to the root.
        self.lock_ref = 0
        self.last_access = last_access

    def __len__(self) -> int:
        return len(self.key)


def _common_prefix_len(edge: Key, key: Key, start: int) -> int:
    n = min(len(edge), len(key) - start)
    for i in range(n):
        if edge[i] != key[start + i]:
            return i
    return n


class RadixCache(PrefixCache):
    """Longest-prefix reuse of finished requests' KV, with LRU eviction of unlocked leaves."""

    def __init__(self, allocator: TokenToKVPoolAllocator):
        super().__init__(allocator)
        self._root = _Node((), _EMPTY, None, 0)
        # A logical clock instead of wall time: deterministic LRU order, no ties within a step
        # that would depend on timer resolution.
        self._clock = 0
        self._total = 0  # slots owned by the tree
        self._protected = 0  # slots in locked nodes
        self._hit_tokens = 0
        self._queried_tokens = 0
        self._evicted_tokens = 0

    # ---------------- lookups ----------------
    def match_prefix(self, key: Sequence[int]) -> PrefixMatch:
        """Slots of the longest cached prefix of `key`; the handle is the node that ends it.

        Lock the handle before anything can evict (the scheduler does so at once).
        """
        key = tuple(key)
        node, matched, parts = self._descend(key)
        self._queried_tokens += len(key)
        self._hit_tokens += matched
        slots = np.concatenate(parts) if parts else _EMPTY.copy()
        return PrefixMatch(slots=slots, handle=node)

    def lock(self, handle: Optional[_Node]) -> None:
        for node in self._path_to_root(handle):
            if node.lock_ref == 0:
                self._protected += len(node)
            node.lock_ref += 1

    def unlock(self, handle: Optional[_Node]) -> None:
        for node in self._path_to_root(handle):
            if node.lock_ref == 0:
                raise KVAllocationError("prefix-cache node unlocked more often than locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node)

    # ---------------- taking a request's KV ----------------
    def cache_finished_req(self, key: Sequence[int], slots: np.ndarray, handle: Optional[_Node]) -> None:
        """Insert `key` with the request's `slots`, free its duplicates, then drop its lock.

        Also used for retraction: whatever prefix the request computed stays reusable.
        """
        slots = np.asarray(slots, dtype=np.int64)
        key = tuple(key)
        if len(key) != slots.size:
            raise ValueError(f"key has {len(key)} elements but {slots.size} KV slots were given")
        self._insert(key, slots)
        self.unlock(handle)

    def _insert(self, key: Key, slots: np.ndarray) -> None:
        node, matched, parts = self._descend(key)
        if matched:
            mine = slots[:matched]
            # Positions where the request holds the tree's own slot (the prefix it reused) come
            # first; after them it computed its own copies of entries the tree already has.
            shared = mine == np.concatenate(parts)
            n_shared = int(shared.sum())
            if not shared[:n_shared].all():
                raise KVAllocationError("a request's KV slots interleave with the prefix cache's")
            self.allocator.free(mine[n_shared:])
        if matched < len(key):
            leaf = _Node(key[matched:], slots[matched:].copy(), node, self._clock)
            node.children[key[matched]] = leaf
            self._total += len(leaf)

    # ---------------- eviction ----------------
    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until `num_tokens` slots are freed (or none is left).

        Whole leaves go, so this may free a little more than asked. Every unlocked node can be
        evicted eventually: a lock covers its whole path, so an unlocked node has no locked
        descendant and becomes a leaf once its children are gone.
        """
        if num_tokens <= 0 or self.evictable_size() == 0:
            return 0
        # The candidate list is rebuilt per call: eviction runs only when the allocator is short,
        # and the tree has about one node per cached request, so the walk stays cheap.
        heap = [(n.last_access, i, n) for i, n in enumerate(self._unlocked_leaves())]
        heapq.heapify(heap)
        tiebreak = len(heap)
        freed = 0
        while heap and freed < num_tokens:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            self.allocator.free(node.slots)
            freed += len(node)
            del parent.children[node.key[0]]
            node.parent = None
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, tiebreak, parent))
                tiebreak += 1
        self._total -= freed
        self._evicted_tokens += freed
        return freed

    def _unlocked_leaves(self) -> List[_Node]:
        leaves: List[_Node] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    # ---------------- sizes, reset, stats ----------------
    def evictable_size(self) -> int:
        return self._total - self._protected

    def total_cached(self) -> int:
        return self._total

    def reset(self) -> None:
        """Free every cached slot. Raises if a request still holds a lock on the tree."""
        if self._protected:
            raise RuntimeError(f"cannot reset the prefix cache: {self._protected} cached tokens are locked")
        nodes = self._all_nodes()
        if nodes:
            self.allocator.free(np.concatenate([n.slots for n in nodes]))
        for node in nodes:
            # Detached nodes are recognisable as stale handles (see _path_to_root).
            node.parent = None
        self._root.children = {}
        self._total = 0

    def stats(self) -> dict:
        """Counters since start; hit_rate is matched / queried key elements over all lookups."""
        return {
            "hit_tokens": self._hit_tokens,
            "queried_tokens": self._queried_tokens,
            "hit_rate": self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0,
            "cached_tokens": self._total,
            "evicted_tokens": self._evicted_tokens,
        }

    def check_invariants(self) -> None:
        """Tree structure and size counters agree; for tests and debugging."""
        total = protected = 0
        seen: List[np.ndarray] = []
        for node in self._all_nodes():
            if not len(node) or node.slots.shape != (len(node),):
                raise KVAllocationError("prefix-cache node with an empty key or mismatched slots")
            parent = node.parent
            if parent is None or parent.children.get(node.key[0]) is not node:
                raise KVAllocationError("prefix-cache node not linked from its parent")
            if node.lock_ref < sum(c.lock_ref for c in node.children.values()):
                raise KVAllocationError("prefix-cache node locked less than its children")
            total += len(node)
            protected += len(node) if node.lock_ref else 0
            seen.append(node.slots)
        if (total, protected) != (self._total, self._protected):
            raise KVAllocationError(
                f"prefix-cache counters ({self._total} cached, {self._protected} locked) disagree with "
                f"the tree ({total}, {protected})"
            )
        all_slots = np.concatenate(seen) if seen else _EMPTY
        if np.unique(all_slots).size != all_slots.size:
            raise KVAllocationError("a KV slot appears twice in the prefix cache")
        if self.allocator.used_size() < total:
            raise KVAllocationError("the prefix cache holds more slots than the allocator handed out")

    def cached_slots(self) -> np.ndarray:
        """Every slot the tree owns (any order)."""
        nodes = self._all_nodes()
        return np.concatenate([n.slots for n in nodes]) if nodes else _EMPTY.copy()

    # ---------------- tree walking ----------------
    def _descend(self, key: Key) -> Tuple[_Node, int, List[np.ndarray]]:
        """Follow `key` from the root, splitting the edge where the match ends mid-edge.

        Returns the deepest matched node, the matched length and the slot arrays along the path;
        every node on the path counts as used now.
        """
        self._clock += 1
        node, pos = self._root, 0
        parts: List[np.ndarray] = []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            edge = child.key
            # Whole-edge comparison runs in C; the element loop only finds where they differ.
            common = len(edge) if key[pos : pos + len(edge)] == edge else _common_prefix_len(edge, key, pos)
            if common < len(edge):
                child = self._split(child, common)
            child.last_access = self._clock
            parts.append(child.slots)
            node, pos = child, pos + common
        return node, pos, parts

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s edge after `at` elements; returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child)
        upper = _Node(child.key[:at], child.slots[:at], parent, child.last_access)
        # The upper part lies on the path of every lock below `child`.
        upper.lock_ref = child.lock_ref
        upper.children[child.key[at]] = child
        parent.children[child.key[0]] = upper
        child.key, child.slots, child.parent = child.key[at:], child.slots[at:], upper
        return upper

    def _path_to_root(self, handle: Optional[_Node]) -> List[_Node]:
        path: List[_Node] = []
        node = handle
        while node is not None and node is not self._root:
            if node.parent is None:
                raise KVAllocationError("prefix-cache handle refers to an evicted or flushed entry")
            path.append(node)
            node = node.parent
        return path

    def _all_nodes(self) -> List[_Node]:
        nodes: List[_Node] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes
