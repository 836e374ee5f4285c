"""Port mapping on the local gateway: PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP-IGD.

``PortMapper`` asks the gateway to forward an external UDP port to the endpoint's port,
renews the lease at half its lifetime, and deletes it at ``stop()``. Everything runs in one
background task started after bind: a gateway that does not answer costs the endpoint
nothing but that task. Failure is quiet (debug/info log lines only).

* PCP and NAT-PMP share the gateway's UDP port 5351 and are written here (they are small).
  A response counts only if it comes from the gateway's address and port (the socket is
  connected to it, and the source is checked again), has exactly the expected version,
  opcode, length and, for PCP, the request's nonce, protocol and internal port; anything
  else is dropped and waited past, within the same bounded time. A gateway that answers
  PCP with "unsupported version" (or a version-0 reply) gets NAT-PMP next; one that
  answers nothing on 5351 is not asked NAT-PMP too.
* UPnP-IGD uses ``async-upnp-client`` (the ``qp2p[portmap]`` extra; without it the IGD step
  is skipped). Only an SSDP answer from the gateway address whose description URL points at
  that same address is used, so another LAN host cannot redirect us.

Times are bounded: each UDP request is tried 3 times (0.25 s, then 0.5 s, then 1 s), each
IGD HTTP request 5 s, SSDP discovery 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import os
import random
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .ratelog import RateLimitedLog

__all__ = ["PROTOCOLS", "Mapping", "PortMapper", "default_gateway"]

logger = logging.getLogger(__name__)
_peer_log = RateLimitedLog(logger)

#: Protocol names in the order they are tried.
PROTOCOLS: tuple[str, ...] = ("pcp", "natpmp", "upnp")

GATEWAY_PORT = 5351          # PCP and NAT-PMP (RFC 6887 §19.1, RFC 6886 §3.1)
SSDP_ADDR = ("239.255.255.250", 1900)
_TRIES = (0.25, 0.5, 1.0)   # per-try waits: RFC 6886 starts at 250 ms and doubles
_PCP_MAX = 1100             # RFC 6887 §7: PCP messages are at most 1100 bytes
_HTTP_TIMEOUT = 5
_SSDP_TIMEOUT = 2.0
_MIN_RENEW = 1.0            # a gateway granting tiny leases cannot make us spin
_RETRY_FIRST = 60.0         # no mapping (none offered, or lost): look again after this,
_RETRY_MAX = 1800.0         # doubling up to this
_IGD_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)


@dataclass(frozen=True)
class Mapping:
    """A granted mapping: ``external`` (the gateway's address and port) forwards to
    ``internal``; ``lifetime`` is the lease the gateway granted in seconds (0: until
    deleted)."""

    protocol: str
    external: tuple[str, int]
    internal: tuple[str, int]
    lifetime: int


class _Refused(Exception):
    """The gateway answered, and the answer is no (or: wrong protocol version)."""

    def __init__(self, reason: str, *, unsupported_version: bool = False) -> None:
        super().__init__(reason)
        self.unsupported_version = unsupported_version


class _NoAnswer(Exception):
    """Nothing valid came back in the bounded time."""


def default_gateway() -> str | None:
    """The IPv4 default gateway from this process's routing table, or ``None`` (Linux:
    ``/proc/net/route``; elsewhere ``None``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/net/route", encoding="ascii") as f:
            lines = f.read(65536).splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        try:
            flags, metric = int(fields[3], 16), int(fields[6])
            gw = socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
        except (ValueError, struct.error):
            continue
        if flags & 0x2 and (best is None or metric < best[0]):  # RTF_GATEWAY
            best = (metric, gw)
    return best[1] if best else None


def _local_ip_towards(gateway: str) -> str | None:
    """Our address on the gateway's link (the source the kernel picks)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, GATEWAY_PORT))
            ip: str = s.getsockname()[0]
    except OSError:
        return None
    return ip


def _usable_external(ip: str) -> bool:
    try:
        a = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not (a.is_unspecified or a.is_multicast or a.is_loopback or a.is_reserved
                or a == ipaddress.IPv4Address("255.255.255.255"))


class _GatewayUdp(asyncio.DatagramProtocol):
    """A UDP socket connected to gateway:5351; keeps only datagrams from there."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self.refused = False

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # the socket is connected, so the kernel already filters; check again anyway
        if addr is not None and tuple(addr[:2]) != (self.gateway, GATEWAY_PORT):
            _peer_log.info("portmap-src", "port mapping: ignored a datagram from %s", addr)
            return
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(data[:_PCP_MAX + 1])

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):  # ICMP port unreachable: no server
            self.refused = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(b"")


async def _exchange(udp: _GatewayUdp, transport: asyncio.DatagramTransport, request: bytes,
                    accept: Callable[[bytes], Any]) -> Any:
    """Send ``request`` up to 3 times; return the first ``accept(reply)`` that is not
    ``None``. ``accept`` raises ``_Refused`` for a valid negative answer."""
    loop = asyncio.get_running_loop()
    while not udp.queue.empty():  # stale replies to an earlier request
        udp.queue.get_nowait()
    for wait in _TRIES:
        transport.sendto(request)
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(udp.queue.get(), left)
            except asyncio.TimeoutError:
                break
            if not data and udp.refused:
                raise _NoAnswer("gateway refused (no service on port 5351)")
            result = accept(data)
            if result is not None:
                return result
    raise _NoAnswer("no answer from the gateway")


# ---------------------------------------------------------------------------- NAT-PMP


def _natpmp_result(data: bytes, op: int, length: int) -> int | None:
    """The result code of a NAT-PMP reply to ``op``, or None if it is not one."""
    if len(data) < 4 or data[0] != 0 or data[1] != 128 + op:
        return None
    code = struct.unpack_from("!H", data, 2)[0]
    if code == 0 and len(data) != length:
        return None
    if code != 0 and len(data) not in (8, length):  # RFC 6886 §3.5: 8 bytes, or the full reply
        return None
    return int(code)


def parse_natpmp_address(data: bytes) -> str | None:
    """A NAT-PMP external-address reply: the address, or ``None`` when ``data`` is not
    one. Raises ``_Refused`` for a well-formed error reply."""
    code = _natpmp_result(data, 0, 12)
    if code is None:
        return None
    if code:
        raise _Refused(f"NAT-PMP external address: result {code}",
                       unsupported_version=code == 1)
    return socket.inet_ntoa(data[8:12])


def parse_natpmp_map(data: bytes, port: int, lifetime: int) -> tuple[int, int] | None:
    """A NAT-PMP UDP-mapping reply for internal ``port``: ``(external port, lifetime)``,
    or ``None`` when ``data`` is not one. Raises ``_Refused`` for an error reply (or a
    grant of nothing when ``lifetime`` asked for something)."""
    code = _natpmp_result(data, 1, 16)
    if code is None:
        return None
    if len(data) == 16:
        iport, eport, granted = struct.unpack_from("!HHI", data, 8)
        if iport != port:
            return None  # an answer for some other request
    if code:
        raise _Refused(f"NAT-PMP map: result {code}", unsupported_version=code == 1)
    if lifetime and (eport == 0 or granted == 0):
        raise _Refused("NAT-PMP map: gateway granted nothing")
    return eport, granted


class _NatPmp:
    name = "natpmp"

    def __init__(self, udp: _GatewayUdp, transport: asyncio.DatagramTransport) -> None:
        self.udp, self.transport = udp, transport
        self.external_ip: str | None = None

    async def map(self, internal: tuple[str, int], external_port: int,
                  lifetime: int) -> Mapping:
        if self.external_ip is None:
            ip = await _exchange(self.udp, self.transport, b"\x00\x00", parse_natpmp_address)
            if not _usable_external(ip):
                raise _Refused(f"NAT-PMP gateway reports external address {ip}")
            self.external_ip = ip
        port = internal[1]
        request = struct.pack("!BBHHHI", 0, 1, 0, port, external_port, lifetime)
        eport, granted = await _exchange(self.udp, self.transport, request,
                                         lambda data: parse_natpmp_map(data, port, lifetime))
        return Mapping(self.name, (self.external_ip, eport), internal, granted)

    async def unmap(self, mapping: Mapping) -> None:
        if self.external_ip is None:  # stopped while asking: the delete needs no address
            self.external_ip = mapping.external[0]
        await self.map(mapping.internal, 0, 0)


# ---------------------------------------------------------------------------- PCP

_PCP_MAP = 1
_PCP_UNSUPP_VERSION = 1
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"


def _v4mapped(ip: str) -> bytes:
    return _V4MAPPED + socket.inet_aton(ip)


def pcp_map_request(nonce: bytes, internal: tuple[str, int], external_port: int,
                    lifetime: int) -> bytes:
    """A PCP MAP request (RFC 6887 §11.1) for UDP ``internal``, external address any."""
    ip, port = internal
    return (struct.pack("!BBHI", 2, _PCP_MAP, 0, lifetime) + _v4mapped(ip) + nonce
            + struct.pack("!B3xHH", 17, port, external_port) + _v4mapped("0.0.0.0"))


def parse_pcp_map(data: bytes, nonce: bytes, port: int,
                  lifetime: int) -> tuple[str, int, int] | None:
    """A PCP MAP reply to our request (``nonce``, UDP, internal ``port``): ``(external
    address, external port, lifetime)``, or ``None`` when ``data`` is not one. Raises
    ``_Refused`` for an error reply with our nonce, for "unsupported version" (which
    carries no nonce: a PCP server may answer it with the header alone, a NAT-PMP one
    with its own 8-byte error), and for a grant of nothing."""
    if len(data) >= 4 and data[0] != 2:
        if data[0] == 0 and len(data) == 8 and data[1] >= 128 and data[2:4] == b"\x00\x01":
            raise _Refused("PCP: gateway speaks NAT-PMP only", unsupported_version=True)
        return None
    if len(data) < 24 or len(data) > _PCP_MAX or len(data) % 4 or data[1] != 0x80 | _PCP_MAP:
        return None
    code = data[3]
    if code == _PCP_UNSUPP_VERSION:
        raise _Refused("PCP: unsupported version", unsupported_version=True)
    if len(data) < 60 or data[24:36] != nonce:
        return None  # not the answer to our request (RFC 6887 §11.3)
    proto, iport, eport = struct.unpack_from("!B3xHH", data, 36)
    if proto != 17 or iport != port:
        return None
    if code:
        raise _Refused(f"PCP map: result {code}")
    granted = struct.unpack_from("!I", data, 4)[0]
    if data[44:56] != _V4MAPPED:
        return None  # an IPv6 external address for an IPv4 request
    ext = socket.inet_ntoa(data[56:60])
    if lifetime and (eport == 0 or granted == 0 or not _usable_external(ext)):
        raise _Refused(f"PCP map: unusable grant {ext}:{eport} for {granted}s")
    return ext, eport, granted


class _Pcp:
    name = "pcp"

    def __init__(self, udp: _GatewayUdp, transport: asyncio.DatagramTransport) -> None:
        self.udp, self.transport = udp, transport
        self.nonce = os.urandom(12)  # one per mapping: renewals and delete reuse it

    async def map(self, internal: tuple[str, int], external_port: int,
                  lifetime: int) -> Mapping:
        request = pcp_map_request(self.nonce, internal, external_port, lifetime)
        port = internal[1]
        ext, eport, granted = await _exchange(
            self.udp, self.transport, request,
            lambda data: parse_pcp_map(data, self.nonce, port, lifetime))
        return Mapping(self.name, (ext, eport), internal, granted)

    async def unmap(self, mapping: Mapping) -> None:
        # RFC 6887 §15: delete = MAP with lifetime 0, same nonce, protocol and internal port
        await self.map(mapping.internal, 0, 0)


# ---------------------------------------------------------------------------- UPnP-IGD


def _import_upnp() -> bool:
    try:
        importlib.import_module("async_upnp_client.aiohttp")
        importlib.import_module("async_upnp_client.client_factory")
        importlib.import_module("async_upnp_client.search")
    except ImportError:
        return False
    return True


class _Igd:
    name = "upnp"

    def __init__(self, gateway: str | None, local_ip: str) -> None:
        self.gateway = gateway
        self.local_ip = local_ip
        self.session: Any = None
        self.service: Any = None
        self.external_ip: str | None = None

    async def _discover(self) -> str:
        from async_upnp_client.search import SsdpSearchListener

        loop = asyncio.get_running_loop()
        found: asyncio.Future[str] = loop.create_future()

        async def on_response(headers: Any) -> None:
            location = str(headers.get("location", ""))
            remote = headers.get("_remote_addr")
            if found.done() or not location or not remote:
                return
            host = str(remote[0])
            try:
                url_host = _url_host(location)
            except ValueError:
                return
            if url_host != host or (self.gateway is not None and host != self.gateway):
                _peer_log.info("portmap-ssdp", "port mapping: ignored SSDP answer from %s "
                               "(location %.80r)", host, location)
                return
            found.set_result(location)

        async def on_connect() -> None:
            listener.async_search()
            if self.gateway is not None:
                listener.async_search((self.gateway, SSDP_ADDR[1]))

        listener = SsdpSearchListener(
            async_callback=on_response, loop=loop, source=(self.local_ip, 0),
            target=SSDP_ADDR, timeout=int(_SSDP_TIMEOUT),
            search_target="urn:schemas-upnp-org:device:InternetGatewayDevice:1",
            async_connect_callback=on_connect)
        await listener.async_start()
        try:
            return await asyncio.wait_for(found, _SSDP_TIMEOUT)
        except asyncio.TimeoutError:
            raise _NoAnswer("no IGD answered SSDP") from None
        finally:
            listener.async_stop()

    async def _connect(self) -> None:
        import aiohttp
        from async_upnp_client.aiohttp import AiohttpSessionRequester
        from async_upnp_client.client_factory import UpnpFactory

        location = await self._discover()
        self.session = aiohttp.ClientSession()
        requester = AiohttpSessionRequester(self.session, timeout=_HTTP_TIMEOUT)
        device = await UpnpFactory(requester, non_strict=True).async_create_device(location)
        services = {s.service_type: s for s in device.all_services}
        for kind in _IGD_SERVICES:
            if kind in services:
                self.service = services[kind]
                break
        else:
            raise _Refused("IGD has no WANIPConnection/WANPPPConnection service")
        result = await self.service.action("GetExternalIPAddress").async_call()
        ip = str(result.get("NewExternalIPAddress") or "")
        if not _usable_external(ip):
            raise _Refused(f"IGD reports external address {ip!r}")
        self.external_ip = ip

    async def map(self, internal: tuple[str, int], external_port: int,
                  lifetime: int) -> Mapping:
        from async_upnp_client.exceptions import UpnpActionResponseError

        if self.service is None:
            await self._connect()
        assert self.external_ip is not None
        add = self.service.action("AddPortMapping")
        ports = [external_port] + [random.randint(20000, 60000) for _ in range(2)]
        for port in ports:
            try:
                await add.async_call(
                    NewRemoteHost="", NewExternalPort=port, NewProtocol="UDP",
                    NewInternalPort=internal[1], NewInternalClient=internal[0],
                    NewEnabled=True, NewPortMappingDescription=f"qp2p {internal[1]}",
                    NewLeaseDuration=lifetime)
            except UpnpActionResponseError as exc:
                if exc.error_code == 725 and lifetime:  # OnlyPermanentLeasesSupported
                    return await self.map(internal, port, 0)
                if exc.error_code == 718:  # ConflictInMappingEntry: try another port
                    continue
                raise _Refused(f"IGD AddPortMapping: {exc}") from None
            return Mapping(self.name, (self.external_ip, port), internal, lifetime)
        raise _Refused("IGD: every external port tried is taken")

    async def unmap(self, mapping: Mapping) -> None:
        await self.service.action("DeletePortMapping").async_call(
            NewRemoteHost="", NewExternalPort=mapping.external[1], NewProtocol="UDP")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(url)
    return str(ipaddress.ip_address(parts.hostname))


# ---------------------------------------------------------------------------- mapper


class PortMapper:
    """Keeps one UDP port mapped on the local gateway while running.

    ``on_change(mapping_or_None)`` is called when a mapping is granted (with it) and when
    it is lost or removed (with ``None``). ``start()`` returns at once; ``stop()`` deletes
    the mapping (one bounded attempt) and ends the task.
    """

    def __init__(self, port: int, *, protocols: Sequence[str] = PROTOCOLS,
                 lifetime: int = 7200, internal_ip: str | None = None,
                 gateway: str | None = None,
                 on_change: Callable[[Mapping | None], None] | None = None) -> None:
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown or not protocols:
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        if not 0 < lifetime < 2**31:
            raise ValueError("lifetime must be a positive number of seconds")
        self.port = port
        self.protocols = tuple(p for p in PROTOCOLS if p in protocols)
        self.lifetime = lifetime
        self._internal_ip = internal_ip
        self._gateway = gateway
        self._on_change = on_change
        self.mapping: Mapping | None = None
        #: how many times the current protocol's lease was renewed (tests, stats)
        self.renewals = 0
        self._client: Any = None
        # a map request in flight: stop() deletes it too, as the gateway may have granted it
        self._inflight: tuple[Any, Mapping] | None = None
        self._cleanup: list[Callable[[], Any]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start mapping in the background (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Delete the mapping if there is one and stop. Idempotent; never raises."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, mapping = ((self._client, self.mapping) if self.mapping is not None
                           else self._inflight or (None, None))
        if client is not None and mapping is not None:
            try:
                await asyncio.wait_for(client.unmap(mapping), sum(_TRIES) + 1)
                logger.info("port mapping removed: %s %s:%d", mapping.protocol,
                            *mapping.external)
            except (Exception, asyncio.TimeoutError) as exc:
                logger.info("port mapping: removing %s mapping failed: %s",
                            mapping.protocol, exc)
            self._set(None)
        await self._close_clients()

    def _set(self, mapping: Mapping | None) -> None:
        changed = mapping != self.mapping
        self.mapping = mapping
        if changed and self._on_change is not None:
            self._on_change(mapping)

    async def _close_clients(self) -> None:
        for fn in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
        self._cleanup.clear()
        self._client = None

    async def _run(self) -> None:
        wait = _RETRY_FIRST
        while True:
            try:
                await self._map_and_renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # quiet by contract: a gateway can't hurt us
                logger.debug("port mapping failed: %r", exc)
            if self.mapping is not None:
                wait = _RETRY_FIRST  # it worked once: the router is worth asking again soon
            self._set(None)
            await self._close_clients()
            await asyncio.sleep(wait)
            wait = min(wait * 2, _RETRY_MAX)

    async def _try(self, client: Any, internal: tuple[str, int]) -> Mapping:
        """``client.map`` for our port, remembered as in flight while it runs."""
        self._inflight = (client, Mapping(client.name, ("0.0.0.0", self.port), internal, 0))
        try:
            mapping: Mapping = await client.map(internal, self.port, self.lifetime)
        except asyncio.CancelledError:
            raise  # still in flight: stop() deletes it
        except BaseException:
            self._inflight = None
            raise
        self._inflight = None
        return mapping

    async def _map_and_renew(self) -> None:
        gateway = self._gateway or default_gateway()
        local_ip = self._internal_ip
        if local_ip is None or local_ip in ("0.0.0.0", "::"):
            # without a known gateway (not Linux) only IGD can work: pick the LAN address
            local_ip = _local_ip_towards(gateway or SSDP_ADDR[0])
        if local_ip is None:
            logger.debug("port mapping: no IPv4 gateway found")
            return
        internal = (local_ip, self.port)
        mapping = await self._first_mapping(gateway, internal)
        if mapping is None:
            return
        logger.info("port mapping: %s maps %s:%d -> %s:%d (lease %ds)", mapping.protocol,
                    *mapping.external, *internal, mapping.lifetime)
        self._set(mapping)
        loop = asyncio.get_running_loop()
        expires = loop.time() + (mapping.lifetime or self.lifetime)
        while True:
            # renew at half the lease; after a failed renewal, at half of what is left
            left = expires - loop.time()
            await asyncio.sleep(max(left / 2, _MIN_RENEW))
            try:
                renewed = await self._client.map(internal, mapping.external[1], self.lifetime)
            except Exception as exc:  # any gateway failure; CancelledError passes
                if loop.time() >= expires:
                    logger.info("port mapping lost: %s", exc)
                    return
                logger.debug("port mapping: renewal failed (%s), retrying", exc)
                continue
            self.renewals += 1
            if renewed.external != mapping.external:
                logger.info("port mapping: %s now maps %s:%d", renewed.protocol,
                            *renewed.external)
            mapping = renewed
            expires = loop.time() + (mapping.lifetime or self.lifetime)
            self._set(mapping)

    async def _first_mapping(self, gateway: str | None,
                             internal: tuple[str, int]) -> Mapping | None:
        loop = asyncio.get_running_loop()
        want = self.protocols
        if gateway is not None and ("pcp" in want or "natpmp" in want):
            transport, udp = await loop.create_datagram_endpoint(
                lambda: _GatewayUdp(gateway), remote_addr=(gateway, GATEWAY_PORT),
                family=socket.AF_INET)
            self._cleanup.append(transport.close)
            answered = True
            for client in (_Pcp(udp, transport), _NatPmp(udp, transport)):
                if client.name not in want or not answered:
                    continue
                try:
                    mapping = await self._try(client, internal)
                except _Refused as exc:
                    logger.debug("port mapping: %s refused: %s", client.name, exc)
                    if not exc.unsupported_version:
                        break  # the gateway speaks it and said no: NAT-PMP would too
                    continue
                except _NoAnswer as exc:
                    logger.debug("port mapping: %s: %s", client.name, exc)
                    answered = False  # nobody on 5351: don't wait for NAT-PMP too
                    continue
                self._client = client
                return mapping
            await self._close_clients()
        if "upnp" in want:
            if not await loop.run_in_executor(None, _import_upnp):
                logger.debug("port mapping: async-upnp-client not installed, IGD skipped "
                             "(pip install 'qp2p[portmap]')")
                return None
            igd = _Igd(gateway, internal[0])
            self._cleanup.append(igd.close)
            try:
                mapping = await self._try(igd, internal)
            except (_Refused, _NoAnswer) as exc:
                logger.debug("port mapping: upnp: %s", exc)
                await self._close_clients()
                return None
            self._client = igd
            return mapping
        return None
