"""The endpoint-wide receive budget (``engine.ReceiveBudget``) on its own: what it grants,
whom it remembers as starved, what it charges and whom it wakes (no network: the
loopback tests in test_hardening*.py cover it end to end)."""

from __future__ import annotations

from qp2p.engine import INITIAL_MAX_DATA, ReceiveBudget

KiB = 1024


def test_grant_stays_within_the_limit_and_remembers_the_starved() -> None:
    budget = ReceiveBudget(INITIAL_MAX_DATA * 4)
    # a connection past its floor gets what the limit allows, no more
    assert budget.grant("a", 3 * INITIAL_MAX_DATA, INITIAL_MAX_DATA) == 3 * INITIAL_MAX_DATA
    assert budget.grant("b", 2 * INITIAL_MAX_DATA, INITIAL_MAX_DATA) == INITIAL_MAX_DATA
    assert budget.reserved == budget.limit
    assert list(budget.starved) == ["b"]  # cut short: woken later
    assert budget.grant("c", KiB, INITIAL_MAX_DATA) == 0


def test_every_connection_keeps_its_floor_over_the_limit() -> None:
    """Peers that filled the budget cannot starve a new one below INITIAL_MAX_DATA."""
    budget = ReceiveBudget(0)
    assert budget.grant("new", 2 * INITIAL_MAX_DATA, 0) == INITIAL_MAX_DATA
    assert budget.grant("new", KiB, INITIAL_MAX_DATA) == 0  # its floor is used up
    assert budget.reserved == INITIAL_MAX_DATA
    assert "new" in budget.starved


def test_charge_respects_the_limit_unless_forced() -> None:
    budget = ReceiveBudget(10 * KiB)
    assert budget.charge(8 * KiB)
    assert not budget.charge(4 * KiB)  # no room: refused, nothing charged
    assert budget.reserved == 8 * KiB
    assert budget.charge(4 * KiB, force=True)  # stream costs are charged regardless
    assert budget.reserved == 12 * KiB
    budget.release(12 * KiB)
    assert budget.reserved == 0


def test_wake_only_once_enough_is_free_and_a_few_at_a_time() -> None:
    budget = ReceiveBudget(100 * KiB)
    budget.reserved = 100 * KiB
    for owner in "abcde":
        budget.starved[owner] = None
    budget.release(10 * KiB)
    assert budget.wake(64 * KiB, 2) == []  # not worth a packet yet
    budget.release(60 * KiB)
    assert budget.wake(64 * KiB, 2) == ["a", "b"]  # oldest first, at most two
    assert list(budget.starved) == ["c", "d", "e"]
    assert budget.wake(64 * KiB, 8) == ["c", "d", "e"]
    assert budget.wake(64 * KiB, 8) == []
