# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled fast path: frame codec, connection-ID routing and batched UDP I/O.

Twin of ``qp2p._purepy``: same public names, same behaviour, byte-identical results
and identical exceptions (type and message). ``qp2p._speedups`` picks one of the two.
The public interface with its documentation is in ``_fastpath.pyi``; the fields of
the classes are declared in ``_fastpath.pxd``.

Batched I/O uses recvmmsg(2)/sendmmsg(2) with the GIL released around the system
call, UDP GSO (``UDP_SEGMENT``) for runs of equal-sized datagrams to one address and
UDP GRO (``UDP_GRO``) on sockets where ``enable_gro`` was called, when the kernel has
them; ``QP2P_NO_GSO=1`` turns GSO and GRO off. Inputs the fast code does not handle
itself (unusual address forms, non-``bytes`` data, other socket families) are handed
to the twin, which makes the results identical by construction.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
    _PyBytes_Resize,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_FromString
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strchr, strlen

import _socket
import logging as _logging
import os as _os
from collections import deque as _deque

from qp2p.errors import ProtocolError


cdef extern from *:
    """
    #include <errno.h>
    #include <string.h>
    #include <unistd.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>

    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef MSG_DONTWAIT
    #define MSG_DONTWAIT 0
    #endif
    #ifndef EHOSTDOWN
    #define EHOSTDOWN EHOSTUNREACH
    #endif

    #if defined(__linux__)
    #define QP2P_HAVE_MMSG 1
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104
    #endif
    #else
    /* No recvmmsg/sendmmsg: the module still builds and hands batched I/O to the twin. */
    #define QP2P_HAVE_MMSG 0
    #define UDP_SEGMENT (-1)
    #define UDP_GRO (-1)
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    static int recvmmsg(int fd, struct mmsghdr *m, unsigned int n, int f, void *t)
    { (void)fd; (void)m; (void)n; (void)f; (void)t; errno = ENOSYS; return -1; }
    static int sendmmsg(int fd, struct mmsghdr *m, unsigned int n, int f)
    { (void)fd; (void)m; (void)n; (void)f; errno = ENOSYS; return -1; }
    #endif

    /* EAGAIN and EWOULDBLOCK may be one value: no switch statements on errno. */
    static int qp2p_would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }
    static int qp2p_send_stop(int e) { return qp2p_would_block(e) || e == ENOBUFS; }
    /* Errors a UDP socket reports for an earlier datagram (ICMP and friends). */
    static int qp2p_recv_transient(int e) {
        return e == ECONNREFUSED || e == ECONNRESET || e == EHOSTUNREACH || e == ENETUNREACH
            || e == EHOSTDOWN || e == ENETDOWN || e == ETIMEDOUT || e == EMSGSIZE;
    }

    /* One socket address of either family: the size of the largest we use. */
    typedef union {
        struct sockaddr sa;
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } qp2p_addr;
    """
    enum:
        QP2P_HAVE_MMSG
        SOL_UDP
        UDP_SEGMENT
        UDP_GRO
    bint qp2p_would_block(int e) nogil
    bint qp2p_send_stop(int e) nogil
    bint qp2p_recv_transient(int e) nogil



cdef extern from "errno.h" nogil:
    int errno
    enum:
        EINTR
        EIO
        EINVAL
        EAFNOSUPPORT


cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    enum:
        AF_INET
        AF_INET6
        SOCK_DGRAM
        MSG_DONTWAIT

    cmsghdr* CMSG_FIRSTHDR(msghdr* msgh)
    cmsghdr* CMSG_NXTHDR(msghdr* msgh, cmsghdr* cmsg)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int socket(int domain, int type, int protocol)
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int recvmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags)


cdef extern from "netinet/in.h" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id


cdef extern from "arpa/inet.h" nogil:
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)


cdef extern from "unistd.h" nogil:
    int close(int fd)


cdef extern from *:
    # Declared in the verbatim block above.
    ctypedef union qp2p_addr:
        sockaddr sa
        sockaddr_in v4
        sockaddr_in6 v6


cdef extern from "Python.h":
    # The same macro as cpython.bytes' PyBytes_AS_STRING, on a borrowed pointer.
    char* _bytes_data "PyBytes_AS_STRING" (PyObject* o)


__all__ = [
    "FRAME_HEADER_LEN",
    "KIND_USER",
    "MAX_KIND",
    "WIRE_VERSION",
    "ConnectionTable",
    "CorePuller",
    "DirtySet",
    "FrameAssembler",
    "MessageSink",
    "Outbox",
    "PendingSend",
    "decode_frame",
    "enable_gro",
    "encode_frame",
    "encode_receipt",
    "features",
    "parse_dcid",
    "parse_receipts",
    "recv_batch",
    "send_batch",
]

FRAME_HEADER_LEN = 16
WIRE_VERSION = 0x0002
KIND_USER = 0
MAX_KIND = 12

cdef enum:
    _HDR_LEN = 16
    _VERSION = 0x0002
    _MAX_CID_LEN = 20
    _BATCH = 64                  # datagrams per system call
    _RECV_SLOT = 65536           # receive buffer per datagram: the largest UDP payload
    _CTRL_WORDS = 8              # 64 bytes of control data per message (UDP_GRO, UDP_SEGMENT)
    _GSO_MAX_SEGMENTS = 64       # the kernel's UDP_MAX_SEGMENTS on older kernels
    _GSO_MAX_BYTES = 64000       # payload of one GSO send, safely under 65507

# max_message_size is kept in an int64: a frame is never longer than 16 + 3 * (2**32 - 1)
# bytes, so any larger limit behaves exactly like this one.
cdef object _SIZE_CLAMP = 1 << 40
cdef object _LEN_LIMIT = 1 << 32

_log = _logging.getLogger("qp2p._fastpath")


# --------------------------------------------------------------------------- helpers

cdef inline uint32_t _get32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline object _bufobj(object obj):
    """What the twin's ``_view`` makes of ``obj``: same objects, same errors."""
    if type(obj) is bytes or type(obj) is bytearray:
        return obj
    return memoryview(obj).cast("B")


cdef int _limits(object max_message_size, object max_kind,
                 int64_t* size_out, int* kind_out) except -1:
    size = PyNumber_Index(max_message_size)
    if size < 0:
        raise ValueError(f"max_message_size must not be negative, got {size}")
    kind = PyNumber_Index(max_kind)
    if not 0 <= kind <= 255:
        raise ValueError(f"max_kind must be in 0..255, got {kind}")
    if size > _SIZE_CLAMP:
        size = _SIZE_CLAMP
    size_out[0] = size
    kind_out[0] = kind
    return 0


cdef Py_ssize_t _cid_len(object short_cid_len) except -1:
    n = PyNumber_Index(short_cid_len)
    if not 0 <= n <= _MAX_CID_LEN:
        raise ValueError(f"short_cid_len must be in 0..{_MAX_CID_LEN}, got {n}")
    return n


cdef str _header_error(const unsigned char* h, int64_t max_size, int max_kind):
    """``None`` if the 16 frame-header bytes at ``h`` pass every check, else why not."""
    cdef unsigned int version = (<unsigned int>h[0] << 8) | h[1]
    cdef int kind = h[14]
    cdef int reserved = h[15]
    cdef uint32_t lp = _get32(h + 10)
    cdef int64_t total
    if version != _VERSION:
        return f"unsupported frame version 0x{version:04x}"
    if kind > max_kind:
        return f"unknown frame kind {kind}"
    if reserved != 0:
        return f"reserved byte is {reserved}, not 0"
    total = _HDR_LEN + <int64_t>_get32(h + 2) + <int64_t>_get32(h + 6) + <int64_t>lp
    if total > max_size:
        return f"frame of {total} bytes exceeds the limit of {max_size}"
    if lp == 0:
        return "empty payload"
    return None


# --------------------------------------------------------------------------- frames

cdef object _build_frame(int kind, const char* h, Py_ssize_t lh, const char* d,
                         Py_ssize_t ld, const char* p, Py_ssize_t lp):
    cdef object out = PyBytes_FromStringAndSize(NULL, _HDR_LEN + lh + ld + lp)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    o[0] = 0
    o[1] = _VERSION
    _put32(o + 2, <uint32_t>lh)
    _put32(o + 6, <uint32_t>ld)
    _put32(o + 10, <uint32_t>lp)
    o[14] = <unsigned char>kind
    o[15] = 0
    o += _HDR_LEN
    if lh:
        memcpy(o, h, lh)
    o += lh
    if ld:
        memcpy(o, d, ld)
    o += ld
    if lp:
        memcpy(o, p, lp)
    return out


def encode_frame(header, dst, payload, kind=0):
    """One frame: the 16-byte frame header, then ``header``, ``dst`` and ``payload``."""
    cdef Py_buffer vh, vd, vp
    cdef bint gh = False, gd = False, gp = False
    k = PyNumber_Index(kind)
    if not 0 <= k <= 255:
        raise ValueError(f"frame kind must be in 0..255, got {k}")
    cdef int ck = k
    cdef Py_ssize_t lh, ld, lp
    if type(header) is bytes and type(dst) is bytes and type(payload) is bytes:
        lh = PyBytes_GET_SIZE(header)
        if lh >= _LEN_LIMIT:
            raise ValueError(f"header of {lh} bytes is too long for a frame")
        ld = PyBytes_GET_SIZE(dst)
        if ld >= _LEN_LIMIT:
            raise ValueError(f"dst of {ld} bytes is too long for a frame")
        lp = PyBytes_GET_SIZE(payload)
        if lp >= _LEN_LIMIT:
            raise ValueError(f"payload of {lp} bytes is too long for a frame")
        return _build_frame(ck, PyBytes_AS_STRING(header), lh, PyBytes_AS_STRING(dst), ld,
                            PyBytes_AS_STRING(payload), lp)
    try:
        PyObject_GetBuffer(_bufobj(header), &vh, PyBUF_SIMPLE)
        gh = True
        if vh.len >= _LEN_LIMIT:
            raise ValueError(f"header of {vh.len} bytes is too long for a frame")
        PyObject_GetBuffer(_bufobj(dst), &vd, PyBUF_SIMPLE)
        gd = True
        if vd.len >= _LEN_LIMIT:
            raise ValueError(f"dst of {vd.len} bytes is too long for a frame")
        PyObject_GetBuffer(_bufobj(payload), &vp, PyBUF_SIMPLE)
        gp = True
        if vp.len >= _LEN_LIMIT:
            raise ValueError(f"payload of {vp.len} bytes is too long for a frame")
        return _build_frame(ck, <const char*>vh.buf, vh.len, <const char*>vd.buf, vd.len,
                            <const char*>vp.buf, vp.len)
    finally:
        if gh:
            PyBuffer_Release(&vh)
        if gd:
            PyBuffer_Release(&vd)
        if gp:
            PyBuffer_Release(&vp)


cdef object _decode(const unsigned char* p, Py_ssize_t n, int64_t size, int max_kind):
    cdef str err
    cdef uint32_t lh, ld
    cdef int64_t total
    if n < _HDR_LEN:
        raise ProtocolError(f"stream ended after {n} of {_HDR_LEN} bytes")
    err = _header_error(p, size, max_kind)
    if err is not None:
        raise ProtocolError(err)
    lh = _get32(p + 2)
    ld = _get32(p + 6)
    total = _HDR_LEN + <int64_t>lh + ld + _get32(p + 10)
    if n > total:
        raise ProtocolError(f"{n - total} bytes after the end of the frame")
    if n < total:
        raise ProtocolError(f"stream ended after {n} of {total} bytes")
    return (
        <int>p[14],
        PyBytes_FromStringAndSize(<const char*>p + _HDR_LEN, lh),
        PyBytes_FromStringAndSize(<const char*>p + _HDR_LEN + lh, ld),
        PyBytes_FromStringAndSize(<const char*>p + _HDR_LEN + lh + ld, total - _HDR_LEN - lh - ld),
    )


# --------------------------------------------------------------------------- receipts

cdef object _VARINT_LIMIT = 1 << 62


cdef uint64_t _varint_value(object value, str what) except? 0xFFFFFFFFFFFFFFFF:
    v = PyNumber_Index(value)
    if not 0 <= v < _VARINT_LIMIT:
        raise ValueError(f"{what} must be in 0..2**62-1, got {v}")
    return <uint64_t>v


cdef inline Py_ssize_t _put_varint(unsigned char* p, uint64_t v) noexcept nogil:
    cdef int n, i
    cdef uint64_t tag
    if v < 0x40:
        p[0] = <unsigned char>v
        return 1
    if v < 0x4000:
        n = 2
        tag = 0x4000
    elif v < 0x40000000:
        n = 4
        tag = 0x80000000U
    else:
        n = 8
        tag = (<uint64_t>3) << 62
    v = v | tag
    for i in range(n):
        p[n - 1 - i] = <unsigned char>(v >> (8 * i))
    return n


cdef bytes _receipt_accepted(object stream_id):
    cdef unsigned char buf[16]
    cdef Py_ssize_t n = _put_varint(buf, _varint_value(stream_id, "stream id"))
    n += _put_varint(buf + n, 0)
    return PyBytes_FromStringAndSize(<char*>buf, n)


def encode_receipt(stream_id, code):
    """One receipt entry: ``stream_id`` and ``code`` (0: accepted) as QUIC varints."""
    cdef unsigned char buf[16]
    cdef uint64_t sid = _varint_value(stream_id, "stream id")
    cdef uint64_t c = _varint_value(code, "code")
    cdef Py_ssize_t n = _put_varint(buf, sid)
    n += _put_varint(buf + n, c)
    return PyBytes_FromStringAndSize(<char*>buf, n)


cdef list _parse_receipts(const unsigned char* p, Py_ssize_t end):
    cdef Py_ssize_t pos = 0, length, i
    cdef uint64_t v, first = 0
    cdef bint have_first = False
    cdef list out = []
    while pos < end:
        length = 1 << (p[pos] >> 6)
        if pos + length > end:
            raise ProtocolError("truncated receipt")
        v = p[pos] & 0x3F
        for i in range(1, length):
            v = (v << 8) | p[pos + i]
        pos += length
        if have_first:
            out.append((first, v))
            have_first = False
        else:
            first = v
            have_first = True
    if have_first:
        raise ProtocolError("truncated receipt")
    return out


def parse_receipts(payload):
    """The ``(stream id, code)`` entries of a receipt frame's payload, in order."""
    cdef Py_buffer view
    if type(payload) is bytes:
        return _parse_receipts(<const unsigned char*>PyBytes_AS_STRING(payload),
                               PyBytes_GET_SIZE(payload))
    PyObject_GetBuffer(_bufobj(payload), &view, PyBUF_SIMPLE)
    try:
        return _parse_receipts(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def decode_frame(data, max_message_size, max_kind=MAX_KIND):
    """Decode a whole frame held in one buffer: ``(kind, header, dst, payload)``."""
    cdef int64_t size
    cdef int k
    cdef Py_buffer view
    _limits(max_message_size, max_kind, &size, &k)
    if type(data) is bytes:
        return _decode(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                       size, k)
    PyObject_GetBuffer(_bufobj(data), &view, PyBUF_SIMPLE)
    try:
        return _decode(<const unsigned char*>view.buf, view.len, size, k)
    finally:
        PyBuffer_Release(&view)


cdef class CorePuller:
    """A native QUIC core's event loop for its adapter (qh3's), where qp2p's per-message
    work on receipt runs: ``pull(next_event, budget, room)`` calls ``next_event()`` (the
    core's) until it returns ``None`` (returned) or an event the adapter must handle
    (returned). It owns ``pulled`` (stream bytes taken from the core so far).

    On the way it handles, without returning:

    - the core's acknowledgement bookkeeping: ``"streams_available"`` and
      ``"connection_credit"`` are skipped, and ``("stream_finished", stream_id)`` removes
      ``stream_id`` from ``unfinished`` and ``created``;
    - a peer's whole message (``("stream_data", sid, data, True)``, ``sid`` of parity
      ``peer_parity``, ``data`` bytes) while ``rejected`` is empty and ``receiver`` is
      set: ``pulled`` and (``budget`` not None) ``budget.reserved`` grow by its length,
      ``sid`` leaves ``peer_streams`` and joins ``fin_pulled``, and
      ``receiver(sid, data, True)`` takes it. Once ``room`` bytes or more were taken so,
      it returns ``()``: the adapter asks its gate again;
    - a datagram (``("datagram", data)``) while ``datagram_receiver`` is set: it takes it.

    ``unfinished``, ``created``, ``rejected``, ``peer_streams`` and ``fin_pulled`` are the
    adapter's; this loop only does the above to them. (qh3's core emits about four events
    per message: this is what runs for them.)
    """

    def __init__(self, set unfinished, set created, dict rejected, dict peer_streams,
                 set fin_pulled, peer_parity):
        self.pulled = 0
        self.receiver = None
        self.datagram_receiver = None
        self._unfinished = unfinished
        self._created = created
        self._rejected = rejected
        self._peer_streams = peer_streams
        self._fin_pulled = fin_pulled
        self._peer_parity = PyNumber_Index(peer_parity) & 1

    def pull(self, next_event, budget, room):
        """The next event for the adapter, None, or ``()`` (see the class)."""
        cdef object native, kind, sid, data
        cdef int64_t stop = self.pulled + <int64_t>min(room, _SIZE_CLAMP)
        cdef Py_ssize_t n
        while True:
            native = next_event()
            if native is None:
                return None
            kind = (<tuple?>native)[0]
            if kind == "stream_data":
                sid = native[1]
                data = native[2]
                if (native[3] is True and not self._rejected and self.receiver is not None
                        and type(data) is bytes and (sid & 1) == self._peer_parity):
                    n = PyBytes_GET_SIZE(data)
                    self.pulled += n
                    if budget is not None:
                        budget.reserved += n
                    self._peer_streams.pop(sid, None)
                    self._fin_pulled.add(sid)
                    self.receiver(sid, data, True)
                    if self.pulled >= stop:
                        return ()
                    continue
                return native
            if kind == "stream_finished":
                self._unfinished.discard(native[1])
                self._created.discard(native[1])
            elif kind == "datagram" and self.datagram_receiver is not None:
                self.datagram_receiver(native[1])
            elif kind != "streams_available" and kind != "connection_credit":
                return native


cdef class DirtySet:
    """An endpoint's connections with something to send: calling it with a connection
    adds it to ``dirty`` (a dict used as an ordered set) and, unless one is already
    scheduled (``scheduled``), schedules ``flush`` with ``call_soon``, so that everything
    written in one turn of the loop goes out in one batch. ``flush`` sets ``scheduled``
    back to False when it runs."""

    def __init__(self, call_soon, flush):
        self.dirty = {}
        self.scheduled = False
        self._call_soon = call_soon
        self._flush = flush

    def __call__(self, conn):
        """Mark ``conn`` dirty (see the class)."""
        self.dirty[conn] = None
        if not self.scheduled:
            self.scheduled = True
            self._call_soon(self._flush)


cdef class MessageSink:
    """A connection's receive core for whole messages: called with each piece of stream data
    its engine pulls (``sid, data, fin``), it takes a peer's message that arrived whole on
    a stream of its own (the common case: one call per small message) and hands anything
    else to ``fallback`` (a ``weakref.WeakMethod``): a frame in pieces, a stream being
    rejected, a control frame, a malformed frame, a receipt it cannot yet write.

    It owns ``inbox`` (``(header, dst, payload, stream_id or None, size)`` per message
    to be read), ``inbox_bytes`` (their stream bytes) and ``receipts`` (encoded receipt
    entries owed to the peer, which ``receipts_mode`` says how to write: 0 not known yet,
    so the fallback decides; 1 one per message from the peer's unidirectional streams;
    2 none). A message taken bumps ``stats["messages_received"]``, calls
    ``mark_dirty(conn)`` for a receipt written (``conn`` a ``weakref.ref``) and
    ``notify()``. ``assemblers`` and ``rejected`` (dicts keyed by stream) are only read:
    a stream in either goes to the fallback.
    """

    def __init__(self, fallback, conn, mark_dirty, notify, dict stats, dict assemblers,
                 dict rejected, max_frame_size, peer_parity, max_receipts, dict starved,
                 window, release_batch):
        self._fallback = fallback
        self._conn = conn
        self._mark_dirty = mark_dirty
        self._notify = notify
        self._stats = stats
        self._assemblers = assemblers
        self._rejected = rejected
        _limits(max_frame_size, MAX_KIND, &self._max_frame_size, &self._max_kind)
        self._peer_parity = PyNumber_Index(peer_parity) & 1
        self._max_receipts = max_receipts
        self.inbox = _deque()
        self.inbox_bytes = 0
        self.receipts = []
        self.receipts_mode = 0
        self.unreleased = 0
        self._starved = starved
        self._window = window
        self._release_batch = release_batch

    def take(self, held):
        """The oldest message of ``inbox`` as ``(header, dst, payload, stream_id or None,
        release)``; its bytes leave ``inbox_bytes``. ``release`` is what to release now
        (its bytes and those of the messages read before it, then no longer counted in
        ``unreleased``), or 0 while nobody waits for this credit: more of the burst is in
        the inbox, fewer than ``release_batch`` bytes are unreleased, ``starved`` is
        empty (no connection waits for the endpoint's budget) and ``held``, the bytes
        the engine holds, stays ``release_batch`` under ``window``."""
        cdef tuple entry = self.inbox.popleft()
        cdef Py_ssize_t size = entry[4]
        cdef Py_ssize_t release = 0
        self.inbox_bytes -= size
        if (self.inbox and self.unreleased + size < self._release_batch and not self._starved
                and held + self._release_batch < self._window):
            self.unreleased += size
        else:
            release = self.unreleased + size
            self.unreleased = 0
        return (entry[0], entry[1], entry[2], entry[3], release)

    def __call__(self, sid, data, fin):
        """Take one piece of stream data (see the class)."""
        cdef object frame, entry, conn
        cdef int mode
        cdef Py_ssize_t size
        if (not fin or self._rejected or type(data) is not bytes
                or (sid & 1) != self._peer_parity or sid in self._assemblers):
            return self._hand_over(sid, data, fin)
        try:
            frame = _decode(<const unsigned char*>PyBytes_AS_STRING(data),
                            PyBytes_GET_SIZE(data), self._max_frame_size, self._max_kind)
        except ProtocolError:
            return self._hand_over(sid, data, fin)
        if (<tuple>frame)[0] != KIND_USER:
            return self._hand_over(sid, data, fin)
        size = PyBytes_GET_SIZE(data)
        if sid & 2:
            mode = self.receipts_mode
            if mode == 1 and len(self.receipts) < self._max_receipts:
                self.receipts.append(_receipt_accepted(sid))
                conn = self._conn()
                if conn is not None:
                    self._mark_dirty(conn)
            elif mode != 2:
                return self._hand_over(sid, data, fin)
            entry = ((<tuple>frame)[1], (<tuple>frame)[2], (<tuple>frame)[3], None, size)
        else:
            entry = ((<tuple>frame)[1], (<tuple>frame)[2], (<tuple>frame)[3], sid, size)
        self._stats["messages_received"] += 1
        self.inbox.append(entry)
        self.inbox_bytes += size
        self._notify()
        return None

    cdef _hand_over(self, sid, data, fin):
        fallback = self._fallback()
        if fallback is not None:
            fallback(sid, data, fin)
        return None


cdef class PendingSend:
    """One frame of ours waiting for stream credit, for its acknowledgement or for its
    receipt (``receipt``: the peer sends one, and the send completes on it, not on the
    ACK). ``stream_id`` is -1 until it is written; ``control``: from ``send_control``;
    ``stalled``: we reset its stream for a stall, a receipt says what next; ``resends``:
    times sent again after a stall."""

    def __init__(self, frame, future):
        self.frame = frame
        self.future = future
        self.size = len(frame)
        self.stream_id = -1
        self.receipt = False
        self.control = False
        self.stalled = False
        self.resends = 0


cdef class Outbox:
    """A connection's send core: what it wrote on its own streams and what waits to be.

    It owns the three queues of ``PendingSend`` waiting for stream credit (``queue_uni``,
    ``queue_bidi``, ``queue_reply``), ``unacked`` (stream id -> the send awaiting its
    acknowledgement or receipt) with ``unacked_bytes``, and ``sending`` (stream id ->
    frame size of a stream that may still have bytes to put in packets) with
    ``sending_bytes``. ``open`` (established and not closed), ``receipts`` (the peer
    sends them) and ``send_limit`` (the most header + dst + payload may hold; 0 until the
    peer's limit is known) are the connection's to set. ``quic`` is its engine;
    ``mark_dirty(conn())`` runs after a write (``conn`` a ``weakref.ref``). Streams start
    while unacknowledged bytes stay under ``max_pending``; a frame over ``large_frame``
    bytes starts once the previous large one is nearly all in packets; ``sending`` is
    swept of streams all in packets once it holds more than twice what the last sweep
    kept (at least ``min_sweep``)."""

    def __init__(self, quic, create_future, mark_dirty, conn, max_pending, large_frame,
                 min_sweep):
        self.queue_uni = _deque()
        self.queue_bidi = _deque()
        self.queue_reply = _deque()
        self.unacked = {}
        self.sending = {}
        self.unacked_bytes = 0
        self.sending_bytes = 0
        self.send_limit = 0
        self.last_large = -1
        self.open = False
        self.receipts = False
        self._quic = quic
        self._credit_tracked = getattr(quic, "send_credit_tracked", True)
        self._create_future = create_future
        self._mark_dirty = mark_dirty
        self._conn = conn
        self._max_pending = max_pending
        self._large_frame = large_frame
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep

    def start(self, payload, header, dst):
        """A user message (all three ``bytes``) as a ``PendingSend``, written on a new
        unidirectional stream when ``start_at_once`` would (``stream_id`` set) and not
        queued otherwise; None, with nothing done, when the connection must decide:
        not open, an empty payload, over ``send_limit``, or not all ``bytes``."""
        cdef Py_ssize_t size
        cdef PendingSend pending
        if (not self.open or type(payload) is not bytes or type(header) is not bytes
                or type(dst) is not bytes):
            return None
        size = PyBytes_GET_SIZE(header) + PyBytes_GET_SIZE(dst) + PyBytes_GET_SIZE(payload)
        if PyBytes_GET_SIZE(payload) == 0 or size > self.send_limit or size >= 0xFFFFFFFF:
            return None
        pending = PendingSend.__new__(PendingSend)
        pending.frame = _build_frame(KIND_USER, PyBytes_AS_STRING(header),
                                     PyBytes_GET_SIZE(header), PyBytes_AS_STRING(dst),
                                     PyBytes_GET_SIZE(dst), PyBytes_AS_STRING(payload),
                                     PyBytes_GET_SIZE(payload))
        pending.future = self._create_future()
        pending.size = _HDR_LEN + size
        pending.stream_id = -1
        pending.receipt = self.receipts
        self._start_at_once(pending)
        return pending

    def start_at_once(self, PendingSend pending):
        """Write a small message on a new unidirectional stream now if nothing waits
        before it and credit allows, as the connection's pump would; else False (it
        queues it)."""
        return self._start_at_once(pending)

    cdef bint _start_at_once(self, PendingSend pending) except -1:
        cdef Py_ssize_t size = pending.size
        if (not self.open or self.queue_uni or self.queue_reply or self.queue_bidi
                or (self.unacked_bytes >= self._max_pending and self.unacked)
                or size > self._large_frame):
            return False
        quic = self._quic
        if self._credit_tracked and (
            quic.send_credit() < size + self.sending_bytes and not self._credit_covers(size)
        ):
            return False
        stream_id = quic.send_on_new_stream(True, pending.frame)
        if stream_id < 0:  # no stream credit
            return False
        self._started(pending, stream_id, True)
        if len(self.sending) > self._sweep_at:
            self._sweep()
        conn = self._conn()
        if conn is not None:
            self._mark_dirty(conn)
        return True

    def started(self, PendingSend pending, stream_id, bint awaits_ack=True):
        """``pending``'s frame is on ``stream_id``: it counts as sending and, if
        ``awaits_ack`` (not a request), awaits its acknowledgement or receipt."""
        self._started(pending, stream_id, awaits_ack)

    cdef int _started(self, PendingSend pending, object stream_id, bint awaits_ack) except -1:
        pending.stream_id = stream_id
        if pending.size > self._large_frame:
            self.last_large = pending.stream_id
        self.sending[stream_id] = pending.size
        self.sending_bytes += pending.size
        if awaits_ack:
            self.unacked[stream_id] = pending
            self.unacked_bytes += pending.size
        return 0

    def full(self):
        """Whether unacknowledged bytes reached ``max_pending`` (no stream starts)."""
        return self.unacked_bytes >= self._max_pending and bool(self.unacked)

    def may_start(self, size):
        """Whether a message of ``size`` bytes may go on a stream now: a large one when
        the previous large one is nearly all sent, a small one when the peer's credit
        covers it (see ``credit_covers``)."""
        cdef Py_ssize_t n = size
        if n > self._large_frame:
            return self.last_large < 0 or self._quic.unsent_bytes(self.last_large) <= self._large_frame
        return self._credit_covers(n)

    def credit_covers(self, size):
        """Whether the peer's flow-control credit covers a small message of ``size``
        bytes on top of what the open small streams still have to send. Starting more
        than that would leave several messages half-sent, each waiting for credit the
        receiver only returns once one completes (it then resets the newest). The one
        large message in flight is not counted: it streams as credit comes."""
        return self._credit_covers(size)

    cdef bint _credit_covers(self, Py_ssize_t size) except -1:
        if not self._credit_tracked:
            return True
        quic = self._quic
        left = quic.send_credit()
        if left >= size + self.sending_bytes:
            return True  # the common case, without looking at each stream
        unsent = 0
        for sid, frame_size in list(self.sending.items()):
            rest = quic.unsent_bytes(sid)
            if rest == 0:  # all in packets: never walked again
                del self.sending[sid]
                self.sending_bytes -= frame_size
            elif sid != self.last_large:
                unsent += rest
        return unsent == 0 or left >= unsent + size

    def sweep(self):
        """Sweep ``sending`` if it outgrew the last sweep (see the class)."""
        if len(self.sending) > self._sweep_at:
            self._sweep()

    cdef int _sweep(self) except -1:
        # requests and replies leave ``sending`` only so; the entries dropped are those
        # _credit_covers drops, so no decision changes (amortized: a constant per message)
        quic = self._quic
        for sid, frame_size in list(self.sending.items()):
            if quic.unsent_bytes(sid) == 0:
                del self.sending[sid]
                self.sending_bytes -= frame_size
        self._sweep_at = max(self._min_sweep, 2 * len(self.sending))
        return 0

    def stop_sending_on(self, sid):
        """``sid`` will send nothing more (reset by us or the peer)."""
        size = self.sending.pop(sid, None)
        if size is not None:
            self.sending_bytes -= size

    def forget(self, sid):
        """The send awaiting its acknowledgement on ``sid``, no longer counted; or None."""
        cdef PendingSend pending = self.unacked.pop(sid, None)
        if pending is not None:
            self.unacked_bytes -= pending.size
        return pending

    def complete_acked(self):
        """Complete the sends (without receipts) whose streams the peer fully
        acknowledged."""
        cdef PendingSend pending
        quic = self._quic
        done = [sid for sid, p in self.unacked.items()
                if not (<PendingSend>p).receipt and quic.send_finished(sid)]
        for sid in done:
            pending = self.unacked.pop(sid)
            self.unacked_bytes -= pending.size
            size = self.sending.pop(sid, None)  # all acknowledged: nothing left to send
            if size is not None:
                self.sending_bytes -= size
            if not pending.future.done():
                pending.future.set_result(None)

    def take_receipts(self, payload):
        """Complete the sends a receipt frame's payload says the peer took; return
        ``(pending, code)`` for its other entries (refused, or dropped after a stall)
        that name a send awaiting a receipt, in order, for the connection to decide.
        Entries for streams not awaiting one (not ours, cancelled, done) are ignored."""
        cdef PendingSend pending
        cdef Py_ssize_t taken = 0, unsent = 0
        cdef list left = []
        unacked = self.unacked
        sending = self.sending
        for entry in parse_receipts(payload):
            sid = (<tuple>entry)[0]
            pending = unacked.get(sid)
            if pending is None or not pending.receipt:
                continue
            if (<tuple>entry)[1]:
                left.append((pending, (<tuple>entry)[1]))
                continue
            del unacked[sid]
            taken += pending.size
            size = sending.pop(sid, None)  # the peer took it whole: all was sent
            if size is not None:
                unsent += <Py_ssize_t>size
            if not pending.future.done():
                pending.future.set_result(None)
        self.unacked_bytes -= taken
        self.sending_bytes -= unsent
        return left

    def close(self):
        """Not open from here on: every send queued or awaiting its acknowledgement, for
        the connection to fail, and nothing kept."""
        out = [*self.queue_uni, *self.queue_bidi, *self.queue_reply, *self.unacked.values()]
        self.open = False
        self.queue_uni.clear()
        self.queue_bidi.clear()
        self.queue_reply.clear()
        self.sending.clear()
        self.sending_bytes = 0
        self.unacked.clear()
        self.unacked_bytes = 0
        return out


cdef class FrameAssembler:
    """Incremental decoder for ONE stream carrying exactly one frame."""

    def __init__(self, max_message_size, max_kind=MAX_KIND):
        _limits(max_message_size, max_kind, &self._max_message_size, &self._max_kind)
        self._release()
        self._state = _HEAD
        self._received = 0
        self._total = _HDR_LEN
        self._kind = 0
        self._seg = 0
        self._error = ""

    def __dealloc__(self):
        self._release()

    @property
    def buffered(self):
        """Bytes of the stream currently held (0 once the frame was returned or failed)."""
        if self._state >= _DONE:
            return 0
        return self._received

    cdef void _release(self) noexcept:
        cdef int i
        for i in range(3):
            Py_XDECREF(self._parts[i])
            self._parts[i] = NULL
            self._part_len[i] = 0
            self._part_cap[i] = 0

    cdef int _fail(self, str message) except -1:
        self._state = _FAILED
        self._error = message
        self._release()
        raise ProtocolError(message)

    cdef int _reserve(self, int seg, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._part_len[seg] + extra
        cdef Py_ssize_t cap = self._part_cap[seg]
        cdef Py_ssize_t want = self._lens[seg]
        if need <= cap:
            return 0
        # Grow geometrically (amortised linear copying), never past the segment; start
        # small, so a flood of streams that each send a few bytes costs a few bytes each.
        cap = cap * 2
        if cap < 1024:
            cap = 1024
        if cap < need:
            cap = need
        if cap > want:
            cap = want
        if self._parts[seg] == NULL:
            obj = PyBytes_FromStringAndSize(NULL, cap)
            Py_INCREF(obj)
            self._parts[seg] = <PyObject*>obj
        else:
            _PyBytes_Resize(&self._parts[seg], cap)
        self._part_cap[seg] = cap
        return 0

    cdef int _store(self, const unsigned char* data, Py_ssize_t n) except -1:
        cdef int seg
        cdef Py_ssize_t room, take
        while n > 0:
            seg = self._seg
            room = <Py_ssize_t>self._lens[seg] - self._part_len[seg]
            if room == 0:
                self._seg = seg + 1
                continue
            take = room if room < n else n
            self._reserve(seg, take)
            memcpy(_bytes_data(self._parts[seg]) + self._part_len[seg], data, take)
            self._part_len[seg] += take
            data += take
            n -= take
        return 0

    cdef object _finish(self):
        cdef PyObject* raw
        cdef int i
        parts = []
        for i in range(3):
            raw = self._parts[i]
            if raw == NULL:
                parts.append(b"")
                continue
            obj = <object>raw
            parts.append(obj)
            Py_XDECREF(raw)
            self._parts[i] = NULL
        self._release()
        return (self._kind, parts[0], parts[1], parts[2])

    def feed(self, data, bint fin):
        """Add the next piece of the stream; ``fin`` says the stream ended with it."""
        cdef Py_buffer view
        if self._state == _FAILED:
            raise ProtocolError(self._error)
        if type(data) is bytes:
            return self._feed(<const unsigned char*>PyBytes_AS_STRING(data),
                              PyBytes_GET_SIZE(data), fin)
        PyObject_GetBuffer(_bufobj(data), &view, PyBUF_SIMPLE)
        try:
            return self._feed(<const unsigned char*>view.buf, view.len, fin)
        finally:
            PyBuffer_Release(&view)

    cdef object _feed(self, const unsigned char* data, Py_ssize_t n, bint fin):
        cdef Py_ssize_t pos = 0
        cdef int64_t avail, need
        cdef const unsigned char* h
        cdef str err
        cdef uint32_t lh, ld
        if self._state == _DONE:
            if n:
                self._fail(f"{n} bytes after the end of the frame")
            return None
        if self._state == _HEAD:
            if self._received == 0 and n >= _HDR_LEN:
                h = data  # the usual case: the whole frame header in the first piece
                pos = _HDR_LEN
            else:
                pos = _HDR_LEN - <Py_ssize_t>self._received
                if pos > n:
                    pos = n
                memcpy(self._head + self._received, data, pos)
                h = self._head
            self._received += pos
            if self._received < _HDR_LEN:
                if fin:
                    self._fail(f"stream ended after {self._received} of {_HDR_LEN} bytes")
                return None
            err = _header_error(h, self._max_message_size, self._max_kind)
            if err is not None:
                self._fail(err)
            lh = _get32(h + 2)
            ld = _get32(h + 6)
            self._lens[0] = lh
            self._lens[1] = ld
            self._lens[2] = _get32(h + 10)
            self._kind = h[14]
            self._total = _HDR_LEN + <int64_t>lh + ld + self._lens[2]
            self._seg = 0
            self._state = _BODY
            if fin and h == data and n == self._total:
                # The whole frame in one piece: copy the parts straight out of it.
                self._state = _DONE
                return (
                    self._kind,
                    PyBytes_FromStringAndSize(<const char*>data + _HDR_LEN, lh),
                    PyBytes_FromStringAndSize(<const char*>data + _HDR_LEN + lh, ld),
                    PyBytes_FromStringAndSize(<const char*>data + _HDR_LEN + lh + ld,
                                              self._lens[2]),
                )
        if pos < n:
            avail = n - pos
            if self._state == _COMPLETE:
                self._fail(f"{avail} bytes after the end of the frame")
            need = self._total - self._received
            if avail > need:
                self._fail(f"{avail - need} bytes after the end of the frame")
            self._store(data + pos, <Py_ssize_t>avail)
            self._received += avail
            if self._received == self._total:
                self._state = _COMPLETE
        if not fin:
            return None
        if self._state != _COMPLETE:
            self._fail(f"stream ended after {self._received} of {self._total} bytes")
        result = self._finish()
        self._state = _DONE
        return result


# --------------------------------------------------------------------------- routing

cdef object _dcid(const unsigned char* p, Py_ssize_t n, Py_ssize_t short_cid_len):
    cdef Py_ssize_t length
    if n == 0:
        return None
    if p[0] & 0x80:
        if n < 6:
            return None
        length = p[5]
        if length > _MAX_CID_LEN or n < 6 + length:
            return None
        return PyBytes_FromStringAndSize(<const char*>p + 6, length)
    if n < 1 + short_cid_len:
        return None
    return PyBytes_FromStringAndSize(<const char*>p + 1, short_cid_len)


cdef object _dcid_of(object datagram, Py_ssize_t short_cid_len):
    cdef Py_buffer view
    if type(datagram) is bytes:
        return _dcid(<const unsigned char*>PyBytes_AS_STRING(datagram),
                     PyBytes_GET_SIZE(datagram), short_cid_len)
    PyObject_GetBuffer(_bufobj(datagram), &view, PyBUF_SIMPLE)
    try:
        return _dcid(<const unsigned char*>view.buf, view.len, short_cid_len)
    finally:
        PyBuffer_Release(&view)


def parse_dcid(datagram, short_cid_len):
    """The destination connection ID of a QUIC packet (RFC 8999 invariants), or ``None``."""
    return _dcid_of(datagram, _cid_len(short_cid_len))


cdef class ConnectionTable:
    """Destination connection ID -> connection object, consulted for every datagram."""

    def __init__(self, short_cid_len):
        self._short_cid_len = _cid_len(short_cid_len)
        self._table = {}

    def add(self, cid, value):
        """Map ``cid`` to ``value`` (replacing any earlier value)."""
        self._table[cid] = value

    def remove(self, cid):
        """Forget ``cid``; no error if it is not there."""
        self._table.pop(cid, None)

    def get(self, cid):
        """The value for ``cid``, or ``None``."""
        return self._table.get(cid)

    def lookup(self, datagram):
        """The value for the destination connection ID of ``datagram``, or ``None``."""
        cid = _dcid_of(datagram, self._short_cid_len)
        if cid is None:
            return None
        return self._table.get(cid)

    def __len__(self):
        return len(self._table)

    def __contains__(self, cid):
        return cid in self._table


# --------------------------------------------------------------------------- batched UDP

# Feature state: probed once at import; GSO is switched off for good (and logged) the
# first time the kernel refuses it with EIO/EINVAL while plain sends work.
cdef bint _mmsg_ok = QP2P_HAVE_MMSG
cdef bint _gso_supported = False
cdef bint _gro_supported = False
cdef bint _gso_active = False
cdef bint _gro_active = False

cdef object _purepy = None
cdef object _socket_type = _socket.socket
cdef object _get_family = _socket.socket.family.__get__

# The receive buffers (_BATCH * _RECV_SLOT bytes) are reused from call to call. A call
# takes them and puts them back; a concurrent call (another thread, the GIL released
# around the system call) allocates its own.
cdef char* _recv_pool = NULL


cdef object _twin():
    global _purepy
    if _purepy is None:
        from qp2p import _purepy as module
        _purepy = module
    return _purepy


cdef bint _env_flag(str name):
    value = _os.environ.get(name, "")
    return value != "" and value != "0"


cdef void _probe() noexcept:
    """Which of UDP GSO and GRO the kernel supports, and whether the env allows them."""
    global _gso_supported, _gro_supported, _gso_active, _gro_active
    cdef int fd, value
    _gso_supported = False
    _gro_supported = False
    if QP2P_HAVE_MMSG:
        fd = socket(AF_INET, SOCK_DGRAM, 0)
        if fd >= 0:
            value = 1200
            _gso_supported = setsockopt(fd, SOL_UDP, UDP_SEGMENT, &value, sizeof(int)) == 0
            value = 1
            _gro_supported = setsockopt(fd, SOL_UDP, UDP_GRO, &value, sizeof(int)) == 0
            close(fd)
    disabled = _env_flag("QP2P_NO_GSO")
    _gso_active = _gso_supported and not disabled
    _gro_active = _gro_supported and not disabled


_probe()


def _reset_offload():
    """Probe GSO/GRO again and honour ``QP2P_NO_GSO`` anew (for tests)."""
    _probe()


def features():
    """Which kernel batching features this implementation uses right now."""
    return {
        "recvmmsg": bool(_mmsg_ok),
        "sendmmsg": bool(_mmsg_ok),
        "gso": bool(_gso_active),
        "gro": bool(_gro_active),
    }


def enable_gro(sock):
    """Turn on UDP GRO for ``sock`` (call once after binding); ``True`` if it is on."""
    cdef int value = 1
    cdef int fd
    if not _gro_active:
        return False
    fd = sock.fileno()
    return setsockopt(fd, SOL_UDP, UDP_GRO, &value, sizeof(int)) == 0


cdef inline bint _native(object sock) except -1:
    """Whether the fast code handles this socket (an AF_INET/AF_INET6 socket object)."""
    if not _mmsg_ok or not isinstance(sock, _socket_type):
        return False
    family = _get_family(sock)
    return family == AF_INET or family == AF_INET6


cdef object _addr_tuple(const qp2p_addr* a):
    """The address as ``socket.recvfrom`` gives it (CPython also formats with inet_ntop)."""
    cdef char buf[64]
    if a.sa.sa_family == AF_INET:
        inet_ntop(AF_INET, &a.v4.sin_addr, buf, sizeof(buf))
        return (PyUnicode_FromString(buf), ntohs(a.v4.sin_port))
    if a.sa.sa_family == AF_INET6:
        inet_ntop(AF_INET6, &a.v6.sin6_addr, buf, sizeof(buf))
        return (PyUnicode_FromString(buf), ntohs(a.v6.sin6_port),
                ntohl(a.v6.sin6_flowinfo), a.v6.sin6_scope_id)
    raise OSError(EAFNOSUPPORT, _os.strerror(EAFNOSUPPORT))


cdef int _batch_args(object max_datagrams, object bufsize,
                     Py_ssize_t* count_out, Py_ssize_t* size_out) except -1:
    count = PyNumber_Index(max_datagrams)
    if count < 1:
        raise ValueError(f"max_datagrams must be at least 1, got {count}")
    size = PyNumber_Index(bufsize)
    if size < 1:
        raise ValueError(f"bufsize must be at least 1, got {size}")
    count_out[0] = count if count < (1 << 62) else (1 << 62)
    size_out[0] = size if size < _RECV_SLOT else _RECV_SLOT
    return 0


cdef list _recv(int fd, Py_ssize_t count, Py_ssize_t size):
    global _recv_pool
    cdef mmsghdr msgs[_BATCH]
    cdef iovec iovs[_BATCH]
    cdef qp2p_addr addrs[_BATCH]
    cdef uint64_t ctrl[_BATCH][_CTRL_WORDS]
    cdef qp2p_addr last_addr
    cdef socklen_t last_len = 0
    cdef int vlen, rc, err, j, gso
    cdef Py_ssize_t length, off, seg
    cdef msghdr* m
    cdef cmsghdr* c
    cdef char* data
    cdef char* pool = _recv_pool
    _recv_pool = NULL
    if pool == NULL:
        pool = <char*>malloc(_BATCH * _RECV_SLOT)
        if pool == NULL:
            raise MemoryError()
    cdef list out = []
    last = None
    try:
        while count > 0:
            vlen = <int>(count if count < _BATCH else _BATCH)
            for j in range(vlen):
                iovs[j].iov_base = pool + <Py_ssize_t>j * _RECV_SLOT
                iovs[j].iov_len = _RECV_SLOT
                m = &msgs[j].msg_hdr
                m.msg_name = &addrs[j]
                m.msg_namelen = sizeof(qp2p_addr)
                m.msg_iov = &iovs[j]
                m.msg_iovlen = 1
                if _gro_supported:
                    m.msg_control = &ctrl[j][0]
                    m.msg_controllen = sizeof(ctrl[j])
                else:
                    m.msg_control = NULL
                    m.msg_controllen = 0
                m.msg_flags = 0
                msgs[j].msg_len = 0
            with nogil:
                rc = recvmmsg(fd, msgs, <unsigned int>vlen, MSG_DONTWAIT, NULL)
                err = errno
            if rc < 0:
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                if qp2p_would_block(err):
                    break
                if qp2p_recv_transient(err):
                    count -= 1
                    continue
                raise OSError(err, _os.strerror(err))
            for j in range(rc):
                m = &msgs[j].msg_hdr
                if (last is not None and m.msg_namelen == last_len
                        and memcmp(&addrs[j], &last_addr, last_len) == 0):
                    addr = last
                else:
                    addr = _addr_tuple(&addrs[j])
                    last = addr
                    last_len = m.msg_namelen
                    if last_len > sizeof(qp2p_addr):
                        last_len = sizeof(qp2p_addr)
                    memcpy(&last_addr, &addrs[j], last_len)
                data = pool + <Py_ssize_t>j * _RECV_SLOT
                length = msgs[j].msg_len
                gso = 0
                if m.msg_controllen:
                    c = CMSG_FIRSTHDR(m)
                    while c != NULL:
                        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                            memcpy(&gso, CMSG_DATA(c), sizeof(int))
                        c = CMSG_NXTHDR(m, c)
                if gso > 0 and length > gso:
                    # Coalesced by GRO: split back into the datagrams that were sent.
                    off = 0
                    while off < length:
                        seg = length - off
                        if seg > gso:
                            seg = gso
                        out.append((PyBytes_FromStringAndSize(data + off,
                                                              seg if seg < size else size),
                                    addr))
                        off += seg
                else:
                    out.append((PyBytes_FromStringAndSize(data,
                                                          length if length < size else size),
                                addr))
            count -= rc
            if rc < vlen:
                break
    finally:
        if _recv_pool == NULL:
            _recv_pool = pool
        else:
            free(pool)
    return out


def recv_batch(sock, max_datagrams=64, bufsize=65536):
    """Read up to ``max_datagrams`` waiting datagrams from a non-blocking UDP socket."""
    cdef Py_ssize_t count, size
    _batch_args(max_datagrams, bufsize, &count, &size)
    if not _native(sock):
        return _twin().recv_batch(sock, max_datagrams, bufsize)
    return _recv(sock.fileno(), count, size)


# Datagrams waiting to go out in one sendmmsg call. A message is one datagram, or (GSO)
# a run of datagrams to one address, all of one size but the last, which may be shorter.
cdef struct _Out:
    mmsghdr msgs[_BATCH]
    iovec iovs[_BATCH]
    qp2p_addr addrs[_BATCH]
    socklen_t alens[_BATCH]
    Py_ssize_t first[_BATCH]      # index in the caller's sequence of the message's first datagram
    int nseg[_BATCH]              # datagrams in the message
    size_t segsize[_BATCH]        # length of its first datagram (the GSO segment size)
    size_t runbytes[_BATCH]
    bint closed[_BATCH]           # its last datagram was shorter: nothing more may join
    uint64_t ctrl[_BATCH][_CTRL_WORDS]
    PyObject* refs[_BATCH]        # the (data, address) items, kept alive while in flight
    int nmsg
    int niov


cdef bint _fill_addr(object addr, int family, qp2p_addr* out, socklen_t* alen) except -1:
    """Convert the common address forms; ``False`` (no error) for anything else.

    Accepts what CPython would resolve with inet_pton alone: a numeric host (no scope
    suffix) as ``str``, ``int`` port in range, and for AF_INET6 optional ``int``
    flowinfo and scope id in range. Everything else goes to the twin (``sock.sendto``).
    """
    cdef Py_ssize_t na, slen
    cdef const char* s
    cdef char buf[64]
    cdef long port, flowinfo = 0, scope = 0
    cdef int overflow
    if type(addr) is not tuple:
        return False
    na = PyTuple_GET_SIZE(addr)
    if na < 2 or na > (2 if family == AF_INET else 4):
        return False
    host = <object>PyTuple_GET_ITEM(addr, 0)
    port_obj = <object>PyTuple_GET_ITEM(addr, 1)
    if type(host) is not str or type(port_obj) is not int:
        return False
    port = PyLong_AsLongAndOverflow(port_obj, &overflow)
    if overflow or port < 0 or port > 0xFFFF:
        return False
    if na >= 3:
        obj = <object>PyTuple_GET_ITEM(addr, 2)
        if type(obj) is not int:
            return False
        flowinfo = PyLong_AsLongAndOverflow(obj, &overflow)
        if overflow or flowinfo < 0 or flowinfo > 0xFFFFF:
            return False
    if na == 4:
        obj = <object>PyTuple_GET_ITEM(addr, 3)
        if type(obj) is not int:
            return False
        scope = PyLong_AsLongAndOverflow(obj, &overflow)
        if overflow or scope < 0 or scope > 0xFFFFFFFF:
            return False
    if not (<str>host).isascii():
        return False
    s = PyUnicode_AsUTF8AndSize(host, &slen)
    if slen == 0 or slen >= <Py_ssize_t>sizeof(buf) or <Py_ssize_t>strlen(s) != slen:
        return False
    memcpy(buf, s, slen + 1)
    memset(out, 0, sizeof(qp2p_addr))
    if family == AF_INET:
        if inet_pton(AF_INET, buf, &out.v4.sin_addr) != 1:
            return False
        out.v4.sin_family = AF_INET
        out.v4.sin_port = htons(<uint16_t>port)
        alen[0] = sizeof(sockaddr_in)
        return True
    if strchr(buf, b'%') != NULL or inet_pton(AF_INET6, buf, &out.v6.sin6_addr) != 1:
        return False
    out.v6.sin6_family = AF_INET6
    out.v6.sin6_port = htons(<uint16_t>port)
    out.v6.sin6_flowinfo = htonl(<uint32_t>flowinfo)
    out.v6.sin6_scope_id = <uint32_t>scope
    alen[0] = sizeof(sockaddr_in6)
    return True


cdef void _out_add(_Out* o, object item, object data, Py_ssize_t index,
                   const qp2p_addr* a, socklen_t alen) noexcept:
    cdef size_t length = <size_t>PyBytes_GET_SIZE(data)
    cdef iovec* iov = &o.iovs[o.niov]
    cdef int k = o.nmsg - 1
    cdef msghdr* m
    cdef cmsghdr* c
    cdef uint16_t segsize
    iov.iov_base = PyBytes_AS_STRING(data)
    iov.iov_len = length
    Py_INCREF(item)
    o.refs[o.niov] = <PyObject*>item
    o.niov += 1
    if (_gso_active and k >= 0 and not o.closed[k] and length > 0
            and length <= o.segsize[k] and o.nseg[k] < _GSO_MAX_SEGMENTS
            and o.runbytes[k] + length <= _GSO_MAX_BYTES
            and alen == o.alens[k] and memcmp(a, &o.addrs[k], alen) == 0):
        m = &o.msgs[k].msg_hdr
        m.msg_iovlen += 1
        o.nseg[k] += 1
        o.runbytes[k] += length
        if length < o.segsize[k]:
            o.closed[k] = True
        if o.nseg[k] == 2:
            memset(&o.ctrl[k][0], 0, sizeof(o.ctrl[k]))
            m.msg_control = &o.ctrl[k][0]
            m.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            c = CMSG_FIRSTHDR(m)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            segsize = <uint16_t>o.segsize[k]
            memcpy(CMSG_DATA(c), &segsize, sizeof(uint16_t))
        return
    k = o.nmsg
    o.nmsg += 1
    memcpy(&o.addrs[k], a, alen)
    o.alens[k] = alen
    o.first[k] = index
    o.nseg[k] = 1
    o.segsize[k] = length
    o.runbytes[k] = length
    o.closed[k] = length == 0
    m = &o.msgs[k].msg_hdr
    m.msg_name = &o.addrs[k]
    m.msg_namelen = alen
    m.msg_iov = iov
    m.msg_iovlen = 1
    m.msg_control = NULL
    m.msg_controllen = 0
    m.msg_flags = 0


cdef void _out_clear(_Out* o) noexcept:
    cdef int j
    for j in range(o.niov):
        Py_XDECREF(o.refs[j])
        o.refs[j] = NULL
    o.niov = 0
    o.nmsg = 0


cdef Py_ssize_t _send_each(_Out* o, int k, int fd, Py_ssize_t* errors, int gso_err) except -2:
    """Send the datagrams of GSO message ``k`` one by one after the kernel refused it."""
    global _gso_active
    cdef msghdr m
    cdef int j, err
    cdef ssize_t rc
    cdef Py_ssize_t stop = -1
    cdef int sent = 0
    memset(&m, 0, sizeof(msghdr))
    m.msg_name = &o.addrs[k]
    m.msg_namelen = o.alens[k]
    m.msg_iovlen = 1
    for j in range(o.nseg[k]):
        m.msg_iov = o.msgs[k].msg_hdr.msg_iov + j
        while True:
            with nogil:
                rc = sendmsg(fd, &m, MSG_DONTWAIT)
                err = errno
            if rc < 0 and err == EINTR:
                PyErr_CheckSignals()
                continue
            break
        if rc >= 0:
            sent += 1
        elif qp2p_send_stop(err):
            stop = o.first[k] + j
            break
        else:
            errors[0] += 1
    if sent and (gso_err == EIO or gso_err == EINVAL) and _gso_active:
        _gso_active = False
        _log.debug("UDP GSO refused by the kernel (%s); sending without it from now on",
                   _os.strerror(gso_err))
    return stop


cdef Py_ssize_t _flush(_Out* o, int fd, Py_ssize_t* errors) except -2:
    """Send everything queued; the index to resume from if the socket would block, else -1."""
    cdef int k = 0
    cdef int rc, err
    cdef Py_ssize_t stop = -1
    try:
        while k < o.nmsg:
            with nogil:
                rc = sendmmsg(fd, &o.msgs[k], <unsigned int>(o.nmsg - k), MSG_DONTWAIT)
                err = errno
            if rc > 0:
                k += rc
                continue
            if rc < 0 and err == EINTR:
                PyErr_CheckSignals()
                continue
            if rc == 0 or qp2p_send_stop(err):
                stop = o.first[k]
                break
            if o.nseg[k] > 1:
                stop = _send_each(o, k, fd, errors, err)
                if stop >= 0:
                    break
            else:
                errors[0] += 1
            k += 1
    finally:
        _out_clear(o)
    return stop


def send_batch(sock, datagrams, start=0):
    """Send ``datagrams[start:]`` (``(data, address)`` pairs) in order."""
    cdef Py_ssize_t n = len(datagrams)
    cdef Py_ssize_t i, stop
    cdef Py_ssize_t errors = 0
    cdef _Out out
    cdef qp2p_addr a
    cdef socklen_t alen = 0
    cdef int fd, family
    index = PyNumber_Index(start)
    if not 0 <= index <= n:
        raise ValueError(f"start {index} is out of range 0..{n}")
    if not _native(sock):
        return _twin().send_batch(sock, datagrams, start)
    i = index
    family = _get_family(sock)
    fd = sock.fileno()
    out.nmsg = 0
    out.niov = 0
    last_addr = None
    try:
        while i < n:
            try:
                item = datagrams[i]
            except BaseException:
                stop = _flush(&out, fd, &errors)
                if stop >= 0:
                    return (stop, errors)
                raise
            if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
                data = <object>PyTuple_GET_ITEM(item, 0)
                addr = <object>PyTuple_GET_ITEM(item, 1)
                if type(data) is bytes and (
                    addr is last_addr or _fill_addr(addr, family, &a, &alen)
                ):
                    last_addr = addr
                    if out.niov == _BATCH:
                        stop = _flush(&out, fd, &errors)
                        if stop >= 0:
                            return (stop, errors)
                    _out_add(&out, item, data, i, &a, alen)
                    i += 1
                    continue
            # Anything unusual: send it exactly as the twin does, after what is queued.
            last_addr = None
            stop = _flush(&out, fd, &errors)
            if stop >= 0:
                return (stop, errors)
            done, failed = _twin().send_batch(sock, (item,), 0)
            if done == 0:
                return (i, errors)
            errors += failed
            i += 1
        stop = _flush(&out, fd, &errors)
        if stop >= 0:
            return (stop, errors)
        return (n, errors)
    finally:
        _out_clear(&out)
