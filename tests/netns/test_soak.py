"""The soak (tests/support/soak.py, ``make soak``) in short: a few seconds per
implementation with fast churn. Every message whose send() returned arrives exactly once,
byte-identical, across connection closes, peer restarts (in-process and namespace peers),
2 % random loss and reordering; and no file descriptor is left behind. Needs root for the
namespaces: skips with the reason where they can't be made (the ``lab`` fixture). Runs
under uvloop only (``one_loop``): both loops would double its time;
``python -m tests.support.soak --loop asyncio`` runs it on asyncio."""

from __future__ import annotations

import json
import random

import pytest

from tests.support.netlab import Lab
from tests.support.soak import Ledger, Traffic, run_soak


@pytest.mark.asyncio
@pytest.mark.netns
@pytest.mark.one_loop  # ~20 s per implementation
async def test_short_soak(lab: Lab, impl: str) -> None:
    report = await run_soak(11, seed=7, peers=8, ns_peers=2, restart_every=2.5,
                            close_every=0.3, sample_every=1.0, hang=30.0, lab=lab)
    print(report.format())  # RSS is reported, not asserted: too noisy for CI
    assert report.implementation == impl
    # the run did what it claims: traffic of every kind, churn, impairment
    assert all(report.sent.get(kind, 0) > 0 for kind in ("uni", "request", "reply")), report.sent
    churn = (report.restarts, report.ns_restarts, report.closes, report.ns_closes)
    assert report.restarts - report.ns_restarts > 0 and report.ns_restarts > 0, churn
    assert report.closes > 0 and report.ns_closes > 0, churn
    assert report.nft_dropped > 0 and report.relay["reordered"] > 0, report.relay
    # the guarantees
    assert report.lost == 0, report.lost_details
    assert report.duplicates == 0, report.duplicate_ids
    assert report.corrupted == 0, report.corrupt_examples
    assert report.hangs == 0 and report.unexpected == 0, report.failures
    assert not report.reader_errors and not report.stuck_tasks
    # no descriptor outlives the soak (fewer than before: an earlier test's, collected meanwhile)
    assert report.fds_after <= report.fds_baseline, (report.fds_baseline, report.fds_after)
    # nothing keeps a closed connection alive
    assert report.conns_alive_after == 0, report.conns_alive_after
    assert report.ok


def test_ledger_counts_lost_duplicate_and_corrupted_messages() -> None:
    """The soak's verdict is only as good as its ledger: it must see each kind of fault."""
    traffic = Traffic(0, random.Random(1))
    ledger = Ledger()
    msgs = [traffic.make(size) for size in (1, 11, 12, 13, 5000)]
    for seq, _header, payload in msgs:
        ledger.mark_sent(0, seq, len(payload), "uni")
    for _, header, payload in msgs[:4]:  # the last one never arrives
        ledger.receive(header, payload)
    ledger.receive(msgs[1][1], msgs[1][2])  # one arrives twice
    _, header, payload = traffic.make(100)  # arrives altered (not marked sent)
    ledger.receive(header, payload[:-1] + bytes([payload[-1] ^ 1]))
    _, other_header, _ = traffic.make(100)
    ledger.receive(other_header, payload)  # another message's payload under this header
    tally = ledger.tally()
    assert (tally["delivered"], tally["lost"], tally["duplicates"]) == (4, 1, 1)
    assert tally["lost_ids"] == [f"0:{msgs[4][0]}"] and tally["duplicate_ids"] == ["0:1 x2"]
    assert ledger.corrupted == 2, ledger.corrupt_examples
    # a namespace peer's ledger travels as JSON and merges back the same
    merged = Ledger()
    merged.merge(json.loads(json.dumps(ledger.export())))
    assert merged.tally() == tally and merged.corrupted == 2
