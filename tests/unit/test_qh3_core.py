"""qh3 2.1's native core under loss: its stale-retransmission failure in ``poll_transmit``
("reserved stream is missing", see ``qp2p.engine._qh3.STALE_STREAM``).

The failure needs a precise pattern of lost packets (a stream's data lost more than once,
then completed by a late acknowledgement while a retransmission of it is still queued).
Over UDP it takes 20 % random loss (tests/netns/test_faults.py); here two real qh3 cores behind
qp2p's adapter exchange their datagrams in memory, on a virtual clock, and a fixed list of
datagrams is dropped: the same list reaches the failure on every run (found by shrinking
the losses of a seeded 20 % run). Before the adapter handled it, the core's ``ValueError``
escaped ``datagrams_to_send`` (and the endpoint's flush, see test_engine_faults.py).
"""

from __future__ import annotations

import heapq
import random
from typing import Any

import pytest

import qp2p
from qp2p import wire
from qp2p.identity import Identity, Trust

_qh3 = pytest.importorskip("qp2p.engine._qh3")

#: Datagrams (by index, per direction, counting from the first Initial) that are dropped.
DROP_TO_SERVER = frozenset({
    3, 13, 19, 25, 29, 31, 44, 47, 48, 55, 65, 66, 72, 74, 80, 89, 91, 95, 96, 97, 101,
})
DROP_TO_CLIENT = frozenset({78})
CLIENT, SERVER = ("10.0.0.1", 5555), ("10.0.0.2", 4433)
ONE_WAY = 0.001  # seconds


class Exchange:
    """A client sending ``count`` 1 KiB messages, ``window`` at a time (each on its own
    unidirectional stream, as qp2p does), to a server that takes everything."""

    def __init__(self, count: int = 200, window: int = 100,
                 drop_to_server: frozenset[int] = DROP_TO_SERVER,
                 drop_to_client: frozenset[int] = DROP_TO_CLIENT,
                 one_call: bool = False, deliver: bool = False) -> None:
        # one_call: the client writes each message with send_on_new_stream; deliver: the
        # server hands stream data to a receiver (deliver_to) instead of returning events
        self.one_call, self.deliver = one_call, deliver
        self.delivered = 0  # messages the receiver got
        self.stream_ids: list[int] = []
        self.config = qp2p.Config()
        self.drop_to_server, self.drop_to_client = drop_to_server, drop_to_client
        self.now = 1000.0
        self.count, self.window = count, window
        self.client = _qh3.new_client(
            _qh3.make_configuration(Identity.generate(), self.config, is_client=True),
            self.config, Trust.any(), None,
        )
        self.server: Any = None
        self.client.connect(SERVER, now=self.now)
        self.queue: list[tuple[float, int, str, bytes]] = []
        self.sent = {"server": 0, "client": 0}  # datagrams sent toward each side
        self.seq = 0
        self.streams: set[int] = set()
        self.started = self.finished = self.received = 0
        self.repeated: list[int] = []  # how often each datagram went out, when more than once
        self.stalled: list[int] = []  # streams the client reported stalled (and reset)
        self.completed: set[int] = set()  # streams the server received whole
        self.reset: list[tuple[int, int]] = []  # (stream, code) of resets the server saw

    def flush(self, conn: Any, toward: str, drop: frozenset[int]) -> None:
        datagrams = [data for data, _ in conn.datagrams_to_send(self.now)]
        for data in datagrams:
            index = self.sent[toward]
            self.sent[toward] += 1
            if index not in drop:
                self.seq += 1
                heapq.heappush(self.queue, (self.now + ONE_WAY, self.seq, toward, data))
        counts: dict[bytes, int] = {}
        for data in datagrams:
            counts[data] = counts.get(data, 0) + 1
        self.repeated += [n for n in counts.values() if n > 1]

    def step(self) -> bool:
        """Deliver the next datagram or fire the next timer; False once nothing is due."""
        engines = [e for e in (self.client, self.server) if e is not None]
        timers = [t for t in (e.get_timer() for e in engines) if t is not None]
        due = min(timers) if timers else None
        if self.queue and (due is None or self.queue[0][0] <= due):
            self.now, _, toward, data = heapq.heappop(self.queue)
            if toward == "server":
                if self.server is None:
                    header = _qh3.parse_long_header(data)
                    self.server = _qh3.new_server(
                        _qh3.make_configuration(Identity.generate(), self.config,
                                                is_client=False),
                        self.config, Trust.any(), header.dcid,
                    )
                    if self.deliver:
                        self.server.deliver_to(self.on_stream_data, None)
                self.server.receive_datagrams([data], CLIENT, self.now)
            else:
                self.client.receive_datagrams([data], SERVER, self.now)
        elif due is not None:
            self.now = max(self.now, due)
            for engine in engines:
                timer = engine.get_timer()
                if timer is not None and timer <= self.now:
                    engine.handle_timer(self.now)
        else:
            return False
        return True

    def on_stream_data(self, sid: int, data: bytes, fin: bool) -> None:
        self.server.release(len(data))
        self.delivered += fin

    def run(self, until: float = 30.0) -> None:
        client = self.client
        self.flush(client, "server", self.drop_to_server)
        while self.now < 1000.0 + until and self.finished < self.count and self.step():
            while self.server is not None and (event := self.server.next_event()) is not None:
                if isinstance(event, _qh3.StreamData):
                    self.server.release(len(event.data))
                    self.received += event.end_stream
                    if event.end_stream:
                        self.completed.add(event.stream_id)
                elif isinstance(event, _qh3.StreamReset):
                    self.reset.append((event.stream_id, event.error_code))
            while (event := client.next_event()) is not None:
                if isinstance(event, _qh3.SendStalled):  # as qp2p's Connection does
                    self.stalled.append(event.stream_id)
                    client.reset_stream(event.stream_id, wire.ERR_STALLED)
            if client.handshake_confirmed():
                done = {sid for sid in self.streams if client.send_finished(sid)}
                self.finished += len(done)
                self.streams -= done
                if not self.streams and self.started < self.count:
                    room = min(self.window, self.count - self.started,
                               client.streams_available(True))
                    for _ in range(room):
                        payload = self.started.to_bytes(4, "big") + bytes(1036)
                        if self.one_call:
                            sid = client.send_on_new_stream(True, payload)
                        else:
                            sid = client.open_stream(True)
                            client.send_stream(sid, payload, True)
                        self.stream_ids.append(sid)
                        self.streams.add(sid)
                        self.started += 1
            self.flush(client, "server", self.drop_to_server)
            if self.server is not None:
                self.flush(self.server, "client", self.drop_to_client)


def test_stale_retransmission_is_survived() -> None:
    exchange = Exchange()
    exchange.run()
    client = exchange.client
    # the loss pattern still reaches the core's failure (else this test tests nothing)
    assert client.stale_stream_errors >= 1
    # the datagram after the failed build (it may carry frames the core no longer tracks)
    # went out in copies
    assert 1 + _qh3.EXTRA_COPIES in exchange.repeated
    # and the exchange completes: every stream acknowledged, every message received once
    assert (exchange.finished, exchange.received) == (exchange.count, exchange.count)
    assert not client.is_closed()
    assert exchange.stalled == []  # nothing stalled here: nothing reported


def _random_drops(seed: int, loss: float = 0.2) -> tuple[frozenset[int], frozenset[int]]:
    rnd = random.Random(seed)
    to_server = frozenset(i for i in range(200_000) if rnd.random() < loss)
    return to_server, frozenset(i for i in range(200_000) if rnd.random() < loss)


def test_a_stream_the_core_never_completes_is_reported() -> None:
    """Seed 409 of a 20 % random-loss run of 1000 messages (0.2 % of seeds do this): the
    core fails builds on stale retransmissions and then never completes one stream (the
    server never saw it whole; in the netns test its send() waited for the idle timeout).
    The adapter reports it, once, as SendStalled; reset, it ends at the server (where qp2p
    answers with an ERR_STALLED receipt and the sender sends the message again), and the
    exchange goes on. No other stream is reported: in 958 seeds the only two reported
    were such streams."""
    to_server, to_client = _random_drops(409)
    exchange = Exchange(count=1000, drop_to_server=to_server, drop_to_client=to_client)
    exchange.run(until=60.0)
    assert exchange.client.stale_stream_errors >= 1
    assert len(exchange.stalled) == 1, exchange.stalled
    sid = exchange.stalled[0]
    assert sid not in exchange.completed
    assert (sid, wire.ERR_STALLED) in exchange.reset
    assert (exchange.finished, exchange.received) == (1000, 999)
    assert not exchange.client.is_closed()


def test_one_call_streams_and_delivery_to_receivers() -> None:
    """``send_on_new_stream`` numbers and finishes streams as ``open_stream`` +
    ``send_stream`` do; with ``deliver_to`` every message reaches the receiver (none comes
    back as an event), and after ``deliver_to(None, None)`` they are events again."""
    exchange = Exchange(count=60, window=20, drop_to_server=frozenset(),
                        drop_to_client=frozenset(), one_call=True, deliver=True)
    exchange.run()
    assert (exchange.finished, exchange.delivered, exchange.received) == (60, 60, 0)
    assert exchange.stream_ids == list(range(2, 2 + 4 * 60, 4))  # the client's uni streams
    exchange.server.deliver_to(None, None)
    exchange.count = 80
    exchange.run()
    assert (exchange.finished, exchange.delivered, exchange.received) == (80, 60, 20)
    assert exchange.stream_ids == list(range(2, 2 + 4 * 80, 4))
    assert not exchange.client.is_closed()


def _exchange_until_quiet(exchange: Exchange, *, pull_server: bool,
                          drop_acks: bool = True) -> list[Any]:
    """Deliver every datagram (``drop_acks``: none of the server's, so nothing completes
    at the client) until none is in flight; the server's events, unless it holds them (as
    behind a closed gate)."""
    events: list[Any] = []
    to_client = frozenset(range(1 << 20)) if drop_acks else frozenset()
    while True:
        exchange.flush(exchange.client, "server", frozenset())
        if exchange.server is not None:
            exchange.flush(exchange.server, "client", to_client)
        if not exchange.queue:
            return events
        exchange.now, _, toward, data = heapq.heappop(exchange.queue)
        if toward == "server":
            if exchange.server is None:
                exchange.server = _qh3.new_server(
                    _qh3.make_configuration(Identity.generate(), exchange.config, is_client=False),
                    exchange.config, Trust.any(), _qh3.parse_long_header(data).dcid,
                )
            exchange.server.receive_datagrams([data], CLIENT, exchange.now)
        else:
            exchange.client.receive_datagrams([data], SERVER, exchange.now)
        while pull_server and (event := exchange.server.next_event()) is not None:
            events.append(event)
        while exchange.client.next_event() is not None:
            pass


def test_a_reset_queued_behind_a_whole_message_is_not_reported() -> None:
    """A sender resets (ERR_STALLED) a stream whose whole message already reached the
    receiver's core, still unpulled (its gate closed): the core emits the data, then the
    reset. The adapter drops that reset: qp2p took the message whole, and must not then
    answer "dropped it" (the sender would send it again: a duplicate)."""
    exchange = Exchange(count=0)
    _exchange_until_quiet(exchange, pull_server=True, drop_acks=False)  # the handshake
    assert exchange.client.handshake_confirmed()
    sid = exchange.client.send_on_new_stream(True, b"x" * 100)
    _exchange_until_quiet(exchange, pull_server=False)
    exchange.client.reset_stream(sid, wire.ERR_STALLED)
    _exchange_until_quiet(exchange, pull_server=False)
    events = []
    while (event := exchange.server.next_event()) is not None:
        events.append(event)
    assert [type(e) for e in events] == [_qh3.StreamData], events
    assert events[0].end_stream
