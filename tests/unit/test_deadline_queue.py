"""``qp2p.timers.DeadlineQueue``: the endpoint's one heap of connection deadlines."""

from __future__ import annotations

import random
import weakref

from qp2p import timers
from qp2p.timers import DeadlineQueue


class Key:
    """A key compared by identity, as the endpoint's connection records are (weakly
    referenceable, to see that the heap lets go of it)."""


def test_earliest_first_and_one_deadline_per_key() -> None:
    q: DeadlineQueue[Key] = DeadlineQueue()
    a, b, c = Key(), Key(), Key()
    q.set(a, 3.0)
    q.set(b, 1.0)
    q.set(c, 2.0)
    q.set(b, 4.0)  # re-armed later: its 1.0 is gone
    assert len(q) == 3
    assert q.earliest() == 2.0
    assert q.get(b) == 4.0
    assert q.pop_due(10.0, 10) == [(c, 2.0), (a, 3.0), (b, 4.0)]
    assert len(q) == 0 and q.earliest() is None and q.get(a) is None


def test_removed_deadlines_never_come_due() -> None:
    q: DeadlineQueue[Key] = DeadlineQueue()
    a, b = Key(), Key()
    q.set(a, 1.0)
    q.set(b, 2.0)
    q.set(a, None)
    assert q.earliest() == 2.0
    assert q.pop_due(5.0, 10) == [(b, 2.0)]


def test_pop_due_takes_only_what_is_due_and_at_most_the_limit() -> None:
    q: DeadlineQueue[Key] = DeadlineQueue()
    keys = [Key() for _ in range(10)]
    for i, key in enumerate(keys):
        q.set(key, float(i))
    assert q.pop_due(-1.0, 100) == []
    first = q.pop_due(6.0, 3)  # 7 are due; 3 now, earliest first
    assert first == [(keys[0], 0.0), (keys[1], 1.0), (keys[2], 2.0)]
    assert q.earliest() == 3.0  # the rest stay due, none lost
    assert [k for k, _ in q.pop_due(6.0, 100)] == keys[3:7]
    assert len(q) == 3


def test_rearming_keeps_the_heap_bounded_and_holds_no_removed_key() -> None:
    """A deadline moved on every packet leaves stale entries: the heap is rebuilt once
    they outnumber the live ones, and a stale entry keeps no reference to its key."""
    q: DeadlineQueue[Key] = DeadlineQueue()
    keys = [Key() for _ in range(50)]
    rng = random.Random(1)
    for _ in range(20_000):
        q.set(rng.choice(keys), rng.random())
    assert len(q) == 50
    assert q.heap_size <= 2 * len(q) + timers.COMPACT_MIN_STALE + 1
    gone = keys.pop()
    q.set(gone, None)
    ref = weakref.ref(gone)
    del gone
    assert ref() is None  # the heap does not keep it alive
    due = q.pop_due(2.0, 1000)
    assert sorted(id(k) for k, _ in due) == sorted(id(k) for k in keys)
    assert [w for _, w in due] == sorted(w for _, w in due)
