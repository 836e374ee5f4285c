# Declarations of the compiled fast path's classes (asyncpg style: fields here,
# code in _fastpath.pyx). The public interface is in _fastpath.pyi.

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint32_t


cdef enum _AssemblerState:
    _HEAD = 0       # collecting the 16 frame-header bytes
    _BODY = 1       # collecting header, dst and payload
    _COMPLETE = 2   # every byte is in; waiting for the end of the stream
    _DONE = 3       # the frame was returned
    _FAILED = 4     # a ProtocolError was raised; every later feed raises it again


cdef class CorePuller:
    cdef public int64_t pulled
    cdef public object receiver, datagram_receiver
    cdef:
        set _unfinished, _created, _fin_pulled
        dict _rejected, _peer_streams
        long _peer_parity


cdef class DirtySet:
    cdef public dict dirty
    cdef public bint scheduled
    cdef object _call_soon, _flush


cdef class MessageSink:
    cdef public object inbox
    cdef public Py_ssize_t inbox_bytes
    cdef public list receipts
    cdef public int receipts_mode
    cdef public Py_ssize_t unreleased
    cdef:
        object _fallback, _conn, _mark_dirty, _notify
        dict _stats, _assemblers, _rejected, _starved
        Py_ssize_t _window, _release_batch
        int64_t _max_frame_size
        int _max_kind
        long _peer_parity
        Py_ssize_t _max_receipts

    cdef _hand_over(self, sid, data, fin)


cdef class PendingSend:
    cdef public object frame, future
    cdef public Py_ssize_t size
    cdef public int64_t stream_id
    cdef public bint receipt, control, stalled
    cdef public int resends


cdef class Outbox:
    cdef public object queue_uni, queue_bidi, queue_reply
    cdef public dict unacked, sending
    cdef public Py_ssize_t unacked_bytes, sending_bytes, send_limit
    cdef public int64_t last_large
    cdef public bint open, receipts
    cdef:
        object _quic, _create_future, _mark_dirty, _conn
        bint _credit_tracked
        Py_ssize_t _max_pending, _large_frame, _min_sweep, _sweep_at

    cdef bint _start_at_once(self, PendingSend pending) except -1
    cdef int _started(self, PendingSend pending, object stream_id, bint awaits_ack) except -1
    cdef bint _credit_covers(self, Py_ssize_t size) except -1
    cdef int _sweep(self) except -1


cdef class FrameAssembler:
    cdef:
        int64_t _max_message_size
        int _max_kind
        _AssemblerState _state
        int _kind
        int64_t _received           # stream bytes taken so far (frame header included)
        int64_t _total              # frame length; 16 until the frame header is in
        unsigned char _head[16]     # the frame header while it is incomplete
        uint32_t _lens[3]           # lengths of header, dst, payload
        int _seg                    # segment being filled: 0 header, 1 dst, 2 payload
        # Each segment is a bytes object grown in place (_PyBytes_Resize) as data
        # arrives, so the finished part is handed out without another copy. Memory
        # follows what has arrived (at most 64 KiB or twice that), never what the
        # frame header claims.
        PyObject* _parts[3]
        Py_ssize_t _part_len[3]
        Py_ssize_t _part_cap[3]
        str _error

    cdef int _fail(self, str message) except -1
    cdef int _store(self, const unsigned char* data, Py_ssize_t n) except -1
    cdef int _reserve(self, int seg, Py_ssize_t extra) except -1
    cdef object _feed(self, const unsigned char* data, Py_ssize_t n, bint fin)
    cdef object _finish(self)
    cdef void _release(self) noexcept


cdef class ConnectionTable:
    cdef:
        dict _table
        Py_ssize_t _short_cid_len
