"""Deadlines of many owners, earliest first: what lets an endpoint drive every connection's
engine timer with one loop timer of its own, a bounded number per loop turn.

One loop timer per connection (``call_later`` each time a deadline moves) costs a loop
handle per re-arm, and whatever is due at once runs in one loop turn: after a turn slowed
by thousands of busy connections, thousands of timers and their sends. Here a deadline is
a heap entry; re-arming leaves the old one behind as a stale entry (no search), skipped
when it comes up, and the heap is rebuilt without them once they are most of it.
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

__all__ = ["DeadlineQueue"]

K = TypeVar("K")

#: Stale entries tolerated before a rebuild: at least this many, and at least as many as
#: the live ones (so rebuilding costs O(1) per re-arm, amortized).
COMPACT_MIN_STALE = 1024


class _Entry(Generic[K]):
    """A key's deadline in the heap; ``key`` is None once stale (replaced or removed)."""

    __slots__ = ("key", "when")

    def __init__(self, key: K, when: float) -> None:
        self.key: K | None = key
        self.when = when


class DeadlineQueue(Generic[K]):
    """At most one deadline per key; ``pop_due`` hands out the due keys, earliest first.

    Keys are hashable; a stale entry keeps no reference to its key, so a key whose
    deadline was removed (``set(key, None)``) is not kept alive by the heap.
    """

    __slots__ = ("_current", "_heap", "_seq", "_stale")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Entry[K]]] = []  # (deadline, tie-break, entry)
        self._current: dict[K, _Entry[K]] = {}  # each key's live entry
        self._seq = 0
        self._stale = 0  # entries in the heap whose key is None

    def __len__(self) -> int:
        """Keys with a deadline."""
        return len(self._current)

    @property
    def heap_size(self) -> int:
        """Entries kept, stale ones included (diagnostics: at most about twice the keys
        with a deadline, plus ``COMPACT_MIN_STALE``)."""
        return len(self._heap)

    def get(self, key: K) -> float | None:
        """``key``'s deadline, or None."""
        entry = self._current.get(key)
        return None if entry is None else entry.when

    def set(self, key: K, when: float | None) -> None:
        """Give ``key`` the deadline ``when`` (None: no deadline), replacing its last one."""
        old = self._current.pop(key, None)
        if old is not None:
            old.key = None
            self._stale += 1
        if when is not None:
            entry = _Entry(key, when)
            self._current[key] = entry
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, entry))
        if self._stale > COMPACT_MIN_STALE and self._stale > len(self._current):
            self._heap = [item for item in self._heap if item[2].key is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def earliest(self) -> float | None:
        """The earliest deadline, or None when no key has one."""
        heap = self._heap
        while heap and heap[0][2].key is None:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0][0] if heap else None

    def pop_due(self, now: float, limit: int) -> list[tuple[K, float]]:
        """Up to ``limit`` keys whose deadline is ``now`` or earlier, earliest first, with
        their deadlines; they have no deadline afterwards (the rest stay due)."""
        heap = self._heap
        current = self._current
        out: list[tuple[K, float]] = []
        while heap and len(out) < limit and heap[0][0] <= now:
            when, _, entry = heapq.heappop(heap)
            key = entry.key
            if key is None:
                self._stale -= 1
                continue
            del current[key]
            out.append((key, when))
        return out
