# cython: language_level=3, boundscheck=True, wraparound=False, cdivision=False
"""gRPC over HTTP/2 for the CA's ports: an asyncio protocol on libnghttp2.

The transport (uvloop's, with or without TLS) hands this protocol bytes;
nghttp2 turns them into frames and headers and calls back here; this
module turns those into ``Call`` objects, frames and unframes gRPC
messages, and hands each call to its method's handler (fastca.frontend.
native). What the handler answers goes back through nghttp2 into one
write per flush. It is a state machine with no I/O of its own, as
asyncpg's protocol core is.

What a client can make it do is bounded here, before anything reaches a
handler: concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS, refused by
nghttp2 beyond it), the header list per stream, each metadata key and
value, the announced message length (checked on the 5-byte prefix, before
the body is buffered), the number of messages of a unary call, and
SETTINGS/PING/RST_STREAM floods (nghttp2's options: outbound ACK queue,
settings per frame, the stream-reset rate limit of CVE-2023-44487, the
number of CONTINUATION frames).

Status and message of a failed call go in trailers (``grpc-status``,
``grpc-message`` percent-encoded); a call that fails before any response
was sent gets a trailers-only response (one HEADERS frame with END_STREAM).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy

from ._nghttp2 cimport *

import binascii
import time

# gRPC status codes (google.rpc.Code).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14
UNIMPLEMENTED = 12
UNAUTHENTICATED = 16

cdef enum:
    PREFIX_BYTES = 5
    MAX_STATUS_MESSAGE = 1024

# Call states.
cdef enum CallState:
    RECEIVING = 0        # headers in, request still arriving
    HANDLING = 1         # handed to its handler
    ANSWERED = 2         # a final status has been submitted
    CLOSED = 3           # the stream is gone

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_SAFE_MESSAGE_BYTES = frozenset(range(0x20, 0x7F)) - {0x25}


def percent_encode(str text):
    """grpc-message encoding: UTF-8, then every byte outside printable ASCII
    (and '%' itself) as %XX."""
    raw = text.encode("utf-8", "replace")[:MAX_STATUS_MESSAGE]
    if all(b in _SAFE_MESSAGE_BYTES for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _SAFE_MESSAGE_BYTES else b"%%%02X" % b for b in raw)


def parse_timeout(bytes value):
    """Seconds of a grpc-timeout value ("<1-8 digits><H|M|S|m|u|n>"), or None if malformed."""
    cdef Py_ssize_t size = len(value)
    if not 2 <= size <= 9:
        return None
    digits, unit = value[:size - 1], value[size - 1:]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


cdef class Limits:
    """What one connection accepts (set from [server] by the front end)."""
    cdef public Py_ssize_t max_message_bytes
    cdef public Py_ssize_t max_concurrent_streams
    cdef public Py_ssize_t max_header_list_bytes      # per stream, names + values
    cdef public Py_ssize_t max_metadata_key_bytes
    cdef public Py_ssize_t max_metadata_value_bytes
    cdef public Py_ssize_t max_metadata_entries

    def __init__(self, *, max_message_bytes=256 * 1024, max_concurrent_streams=100,
                 max_header_list_bytes=16 * 1024, max_metadata_key_bytes=256,
                 max_metadata_value_bytes=16 * 1024, max_metadata_entries=64):
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_bytes = max_header_list_bytes
        self.max_metadata_key_bytes = max_metadata_key_bytes
        self.max_metadata_value_bytes = max_metadata_value_bytes
        self.max_metadata_entries = max_metadata_entries


cdef class Call:
    """One gRPC call (one HTTP/2 stream). Handlers read ``path``, ``metadata``,
    ``message``, ``deadline`` (monotonic seconds, 0 for none) and
    ``connection``, and finish it with ``respond`` (unary), or ``send`` +
    ``finish`` (streaming), or ``fail``. ``on_cancel`` (set by a handler) runs
    once if the call goes away first: the client reset the stream, the
    connection closed, or the deadline passed."""

    cdef readonly int32_t stream_id
    cdef readonly Connection connection
    cdef readonly str path
    cdef readonly dict metadata
    cdef readonly object message
    cdef readonly double deadline
    cdef readonly double started
    cdef public object handler
    cdef public object on_cancel
    cdef public object context          # the handler's own per-call state
    cdef int state
    cdef int headers_sent
    cdef int status
    cdef bytes status_message
    cdef bytearray inbound
    cdef Py_ssize_t expected            # length of the message being received; -1: prefix not seen
    cdef int messages
    cdef list outbound                  # framed messages waiting for nghttp2's read callback
    cdef Py_ssize_t out_offset
    cdef int deferred                   # the data provider is waiting for more
    cdef Py_ssize_t header_bytes
    cdef int refused                    # a header limit was crossed: answer at END_HEADERS
    cdef bytes method
    cdef bytes content_type
    cdef bytes te
    cdef bytes encoding
    cdef bytes timeout
    cdef object timer
    cdef int remote_ended               # the client half-closed (END_STREAM seen)

    def __cinit__(self):
        self.metadata = {}
        self.inbound = bytearray()
        self.expected = -1
        self.outbound = []
        self.status = -1
        self.path = ""

    @property
    def answered(self):
        return self.state >= ANSWERED

    @property
    def status_code(self):
        """The status answered (-1: none; the call was reset or cut off)."""
        return self.status

    @property
    def closed(self):
        return self.state == CLOSED

    @property
    def receiving(self):
        """Headers in, the request not yet complete (nothing handed to a handler)."""
        return self.state == RECEIVING

    def expire(self, str message):
        """End a call that took too long to arrive: DEADLINE_EXCEEDED."""
        if self.state >= ANSWERED:
            return
        self._gone()
        self.fail(DEADLINE_EXCEEDED, message)

    def respond(self, bytes message not None):
        """Unary success: headers, the message, trailers with status 0."""
        if self.state >= ANSWERED:
            return
        self._queue(message)
        self.finish(OK, "")

    def send(self, bytes message not None):
        """Streaming: one more response message (headers first if not sent)."""
        if self.state >= ANSWERED:
            return
        self._queue(message)
        self.connection._start_or_resume(self)

    def finish(self, int code, str message=""):
        """The final status, in trailers after whatever was sent."""
        if self.state >= ANSWERED:
            return
        if not self.headers_sent and not self.outbound:
            self.fail(code, message)
            return
        self.state = ANSWERED
        self.status = code
        self.status_message = percent_encode(message) if message else b""
        self._cancel_timer()
        self.connection._start_or_resume(self)

    def fail(self, int code, str message=""):
        """An error status: trailers-only if nothing was sent yet."""
        if self.state >= ANSWERED:
            return
        if self.headers_sent or self.outbound:
            self.outbound.clear()
            self.finish(code, message)
            return
        self.state = ANSWERED
        self.status = code
        self.status_message = percent_encode(message) if message else b""
        self._cancel_timer()
        self.connection._trailers_only(self)

    cdef _queue(self, bytes message):
        cdef Py_ssize_t size = PyBytes_GET_SIZE(message)
        prefix = PyBytes_FromStringAndSize(NULL, PREFIX_BYTES)
        cdef char* p = PyBytes_AS_STRING(prefix)
        p[0] = 0
        p[1] = <char>((size >> 24) & 0xFF)
        p[2] = <char>((size >> 16) & 0xFF)
        p[3] = <char>((size >> 8) & 0xFF)
        p[4] = <char>(size & 0xFF)
        self.outbound.append(prefix + message)

    cdef _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _deadline_passed(self):
        self.timer = None
        if self.state >= ANSWERED:
            return
        self._gone()
        self.fail(DEADLINE_EXCEEDED, "deadline exceeded")
        self.connection._flush()

    cdef _gone(self):
        callback, self.on_cancel = self.on_cancel, None
        if callback is not None:
            try:
                callback()
            except Exception as error:  # noqa: BLE001 - a handler bug must not break the connection
                self.connection.endpoint.handler_error(self, error)

    def __repr__(self):
        return f"Call(stream={self.stream_id}, path={self.path!r}, state={self.state})"


cdef nghttp2_session_callbacks* _callbacks = NULL


cdef inline nghttp2_nv _nv(const char* name, size_t name_size, const char* value, size_t value_size) noexcept:
    cdef nghttp2_nv nv
    nv.name = <uint8_t*>name
    nv.namelen = name_size
    nv.value = <uint8_t*>value
    nv.valuelen = value_size
    nv.flags = NGHTTP2_NV_FLAG_NO_COPY_NAME
    return nv


cdef class Connection:
    """One client connection: an asyncio protocol on an nghttp2 server session.

    ``endpoint`` is the Python side (fastca.frontend.native.Endpoint): it
    routes paths to handlers, holds the limits and the loop, and hears about
    connections coming and going. Per-connection state a handler keeps (the
    client certificate's verdict) goes in ``cache``."""

    cdef nghttp2_session* session
    cdef readonly object transport
    cdef readonly object endpoint
    cdef readonly Limits limits
    cdef readonly dict calls
    cdef readonly str peer
    cdef readonly object peer_certificate      # leaf DER the TLS layer verified, or None
    cdef public object cache
    cdef public int unauthenticated            # calls refused for authentication on this connection
    cdef public double last_active
    cdef readonly int closing
    cdef readonly Py_ssize_t received_bytes
    cdef object _routes
    cdef int _in_recv
    cdef list _resets                          # streams answered before the client finished sending
    cdef int32_t _last_stream                  # announced in the final GOAWAY; later streams are not served

    def __cinit__(self, endpoint):
        global _callbacks
        cdef nghttp2_option* option = NULL
        if _callbacks == NULL:
            if nghttp2_session_callbacks_new(&_callbacks) != 0:
                raise MemoryError()
            nghttp2_session_callbacks_set_on_begin_headers_callback(_callbacks, _on_begin_headers)
            nghttp2_session_callbacks_set_on_header_callback(_callbacks, _on_header)
            nghttp2_session_callbacks_set_on_frame_recv_callback(_callbacks, _on_frame_recv)
            nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_callbacks, _on_data_chunk)
            nghttp2_session_callbacks_set_on_stream_close_callback(_callbacks, _on_stream_close)
        if nghttp2_option_new(&option) != 0:
            raise MemoryError()
        try:
            # Floods: at most this many SETTINGS/PING ACKs queued before the
            # peer is cut off, entries per SETTINGS frame, CONTINUATIONs per
            # header block, and resets (rapid reset) at a sustained rate.
            nghttp2_option_set_max_outbound_ack(option, 100)
            nghttp2_option_set_max_settings(option, 32)
            nghttp2_option_set_max_continuations(option, 8)
            nghttp2_option_set_stream_reset_rate_limit(option, 200, 50)
            nghttp2_option_set_max_deflate_dynamic_table_size(option, 4096)
            if nghttp2_session_server_new2(&self.session, _callbacks, <void*>self, option) != 0:
                raise MemoryError()
        finally:
            nghttp2_option_del(option)
        self.endpoint = endpoint
        self.limits = endpoint.limits
        self._routes = endpoint.routes
        self.calls = {}
        self._resets = []
        self.peer = ""
        self.last_active = time.monotonic()

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport):
        cdef nghttp2_settings_entry settings[4]
        self.transport = transport
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host, port = peername[0], peername[1]
            self.peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer_certificate = ssl_object.getpeercert(binary_form=True)
        settings[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        settings[0].value = <uint32_t>self.limits.max_concurrent_streams
        settings[1].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        # Advertised above the per-stream limit, so a client sends what it has
        # and gets a status that says what is wrong instead of failing locally.
        settings[1].value = <uint32_t>(self.limits.max_header_list_bytes * 4)
        settings[2].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
        settings[2].value = 0
        settings[3].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        settings[3].value = 1 << 20
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, settings, 4)
        self._flush()
        self.endpoint.connection_made(self)

    def data_received(self, bytes data):
        cdef ssize_t consumed
        self.last_active = time.monotonic()
        self.received_bytes += PyBytes_GET_SIZE(data)
        self._in_recv = 1
        try:
            consumed = nghttp2_session_mem_recv(self.session, <const uint8_t*>PyBytes_AS_STRING(data),
                                                <size_t>PyBytes_GET_SIZE(data))
        finally:
            self._in_recv = 0
        if consumed < 0:
            # A protocol error (or a flood nghttp2 refused): it has queued a
            # GOAWAY where it could; send it, then close.
            self._flush()
            self.endpoint.protocol_error(self, nghttp2_strerror(<int>consumed).decode())
            self._close_transport()
            return
        self._flush()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.transport = None
        self.closing = 1
        calls, self.calls = self.calls, {}
        for call in calls.values():
            (<Call>call).state = CLOSED
            (<Call>call)._cancel_timer()
            (<Call>call)._gone()
        self.endpoint.connection_lost(self)

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    # -- lifecycle, from the front end ------------------------------------------

    def shutdown_notice(self):
        """First half of a graceful GOAWAY: new streams may still be on the
        way; the final GOAWAY (``goaway``) follows once they had time to arrive."""
        if self.transport is None or self.closing:
            return
        nghttp2_submit_shutdown_notice(self.session)
        self._flush()

    def goaway(self, int error_code=0):
        """The final GOAWAY: streams up to the last one seen finish; then close."""
        if self.transport is None:
            return
        self._last_stream = nghttp2_session_get_last_proc_stream_id(self.session)
        nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE, self._last_stream, <uint32_t>error_code, NULL, 0)
        self.closing = 1
        self._flush()
        self._close_if_done()

    def abort(self):
        """Close now (after GOAWAY, for a peer over its limits)."""
        self.goaway(NGHTTP2_ENHANCE_YOUR_CALM)
        self._close_transport()

    @property
    def active_calls(self):
        return len(self.calls)

    # -- sending ---------------------------------------------------------------

    def flush(self):
        self._flush()

    cdef _flush(self):
        cdef const uint8_t* out
        cdef ssize_t n
        if self.transport is None or self._in_recv:
            return               # data_received flushes once nghttp2 is done with the input
        chunks = []
        while True:
            n = nghttp2_session_mem_send(self.session, &out)
            if n > 0:
                chunks.append(PyBytes_FromStringAndSize(<const char*>out, n))
                continue
            if not self._resets:
                break
            # A call answered while its client was still sending: now that the
            # answer is out, the rest of the request is refused (RST_STREAM
            # NO_ERROR, as gRPC servers do), so a huge upload stops here.
            for stream_id in self._resets:
                nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_NO_ERROR)
            self._resets.clear()
        if chunks:
            self.transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        self._close_if_done()

    cdef _close_if_done(self):
        # Called once everything nghttp2 had to send was written: the transport
        # sends what it buffered, then closes. A client that got GOAWAY on a
        # fresh connection (nothing sent yet) must see the close to retry.
        if self.closing and not self.calls and self.transport is not None and not self._in_recv:
            self._close_transport()

    cdef _close_transport(self):
        if self.transport is not None:
            if self.received_bytes == 0:
                # Nothing came from the client yet (it may not even have
                # finished the handshake on its side): no TLS goodbye to wait for.
                self.transport.abort()
            else:
                self.transport.close()

    cdef _start_or_resume(self, Call call):
        cdef nghttp2_nv headers[2]
        cdef nghttp2_data_provider provider
        if call.state == CLOSED:
            return
        if not call.headers_sent:
            call.headers_sent = 1
            headers[0] = _nv(":status", 7, "200", 3)
            headers[1] = _nv("content-type", 12, "application/grpc", 16)
            provider.source.ptr = <void*>call
            provider.read_callback = _read_data
            nghttp2_submit_response(self.session, call.stream_id, headers, 2, &provider)
        elif call.deferred:
            call.deferred = 0
            nghttp2_session_resume_data(self.session, call.stream_id)
        self._flush()

    cdef _trailers_only(self, Call call):
        cdef nghttp2_nv headers[4]
        cdef bytes status = str(call.status).encode()
        cdef bytes message = call.status_message
        if call.state == CLOSED:
            return
        headers[0] = _nv(":status", 7, "200", 3)
        headers[1] = _nv("content-type", 12, "application/grpc", 16)
        headers[2] = _nv("grpc-status", 11, PyBytes_AS_STRING(status), <size_t>PyBytes_GET_SIZE(status))
        n = 3
        if message:
            headers[3] = _nv("grpc-message", 12, PyBytes_AS_STRING(message), <size_t>PyBytes_GET_SIZE(message))
            n = 4
        # nghttp2 copies names and values unless told not to: the bytes here may go.
        for i in range(n):
            headers[i].flags = NGHTTP2_NV_FLAG_NONE
        call.headers_sent = 1
        nghttp2_submit_headers(self.session, NGHTTP2_FLAG_END_STREAM, call.stream_id, NULL, headers, n, NULL)
        if not call.remote_ended:
            self._resets.append(call.stream_id)
        self._flush()

    cdef _trailers(self, Call call):
        cdef nghttp2_nv trailers[2]
        cdef bytes status = str(call.status).encode()
        cdef bytes message = call.status_message
        trailers[0] = _nv("grpc-status", 11, PyBytes_AS_STRING(status), <size_t>PyBytes_GET_SIZE(status))
        trailers[0].flags = NGHTTP2_NV_FLAG_NONE
        n = 1
        if message:
            trailers[1] = _nv("grpc-message", 12, PyBytes_AS_STRING(message), <size_t>PyBytes_GET_SIZE(message))
            trailers[1].flags = NGHTTP2_NV_FLAG_NONE
            n = 2
        nghttp2_submit_trailer(self.session, call.stream_id, trailers, n)

    # -- receiving (from the callbacks) -------------------------------------------

    cdef int _begin(self, int32_t stream_id) except -1:
        cdef Call call
        if self.closing and stream_id > self._last_stream:
            # After the final GOAWAY: the client knows this stream was not
            # served and retries it elsewhere; it must not hold the connection.
            return 0
        call = Call.__new__(Call)
        call.stream_id = stream_id
        call.connection = self
        call.started = time.monotonic()
        self.calls[stream_id] = call
        return 0

    cdef int _header(self, int32_t stream_id, const uint8_t* name, size_t name_size, const uint8_t* value,
                     size_t value_size) except -1:
        cdef Call call = self.calls.get(stream_id)
        if call is None or call.refused:
            return 0
        call.header_bytes += name_size + value_size + 32
        if call.header_bytes > self.limits.max_header_list_bytes:
            call.refused = RESOURCE_EXHAUSTED
            return 0
        if name_size > 0 and name[0] == b':':
            if name_size == 5 and name[1] == b'p':              # :path
                call.path = (<const char*>value)[:value_size].decode("latin-1")
            elif name_size == 7 and name[1] == b'm':            # :method
                call.method = (<const char*>value)[:value_size]
            return 0
        key = (<const char*>name)[:name_size]
        if key == b"content-type":
            call.content_type = (<const char*>value)[:value_size]
        elif key == b"te":
            call.te = (<const char*>value)[:value_size]
        elif key == b"grpc-timeout":
            call.timeout = (<const char*>value)[:value_size]
        elif key == b"grpc-encoding":
            call.encoding = (<const char*>value)[:value_size]
        elif key.startswith(b"grpc-"):
            return 0                                            # grpc-accept-encoding and the like
        else:
            if name_size > <size_t>self.limits.max_metadata_key_bytes \
                    or value_size > <size_t>self.limits.max_metadata_value_bytes \
                    or len(call.metadata) >= self.limits.max_metadata_entries:
                call.refused = INVALID_ARGUMENT
                return 0
            text = key.decode("latin-1")
            if text in call.metadata:                           # the first value of each key counts
                return 0
            raw = (<const char*>value)[:value_size]
            if text.endswith("-bin"):
                # Binary values travel base64-encoded, padded or not.
                try:
                    call.metadata[text] = binascii.a2b_base64(raw + b"=" * ((4 - len(raw) % 4) % 4))
                except binascii.Error:
                    call.refused = INVALID_ARGUMENT
            else:
                call.metadata[text] = raw.decode("latin-1")
        return 0

    cdef int _headers_done(self, int32_t stream_id, bint end_stream) except -1:
        cdef Call call = self.calls.get(stream_id)
        cdef double seconds
        if call is None:
            return 0
        if end_stream:
            call.remote_ended = 1
        if call.refused:
            call.fail(call.refused, "request metadata too large: keys up to "
                      f"{self.limits.max_metadata_key_bytes} bytes, values up to "
                      f"{self.limits.max_metadata_value_bytes}, {self.limits.max_metadata_entries} entries, "
                      f"{self.limits.max_header_list_bytes} bytes in all")
            return 0
        if call.method != b"POST":
            call.fail(UNIMPLEMENTED, "gRPC calls are POST requests")
            return 0
        if not call.content_type or not call.content_type.startswith(b"application/grpc"):
            call.fail(UNIMPLEMENTED, "content-type must be application/grpc")
            return 0
        if call.encoding and call.encoding != b"identity":
            call.fail(UNIMPLEMENTED, "grpc-encoding " + call.encoding.decode("latin-1")[:32]
                      + " is not supported: send uncompressed messages (identity)")
            return 0
        handler = self._routes.get(call.path)
        if handler is None:
            call.fail(UNIMPLEMENTED, "unknown method " + call.path[:200])
            return 0
        call.handler = handler
        if call.timeout:
            timeout = parse_timeout(call.timeout)
            if timeout is None:
                call.fail(INVALID_ARGUMENT, "malformed grpc-timeout header")
                return 0
            call.deadline = call.started + timeout
            call.timer = self.endpoint.loop.call_later(timeout, call._deadline_passed)
        if not handler.accepts(call):
            return 0                      # refused it already (overload, shutdown)
        if handler.streaming:
            call.state = HANDLING
            handler.start(call)
        if end_stream:
            self._end(call)
        return 0

    cdef int _data(self, int32_t stream_id, const uint8_t* data, size_t size) except -1:
        cdef Call call = self.calls.get(stream_id)
        cdef Py_ssize_t length
        cdef size_t take
        if call is None or call.state >= ANSWERED or call.handler is None:
            return 0
        while size > 0:
            if call.expected < 0:
                take = min(size, <size_t>(PREFIX_BYTES - len(call.inbound)))
                call.inbound += (<const char*>data)[:take]
                data += take
                size -= take
                if len(call.inbound) < PREFIX_BYTES:
                    return 0
                if call.inbound[0] != 0:
                    call.fail(UNIMPLEMENTED if call.inbound[0] == 1 else INTERNAL,
                              "compressed messages are not supported: send identity-encoded messages")
                    return 0
                length = <Py_ssize_t>((<uint32_t>call.inbound[1] << 24) | (<uint32_t>call.inbound[2] << 16)
                                      | (<uint32_t>call.inbound[3] << 8) | <uint32_t>call.inbound[4])
                if length > self.limits.max_message_bytes:
                    call.fail(RESOURCE_EXHAUSTED, f"request message of {length} bytes is larger than the "
                              f"{self.limits.max_message_bytes} this server accepts")
                    return 0
                if call.messages and not call.handler.streaming:
                    call.fail(UNIMPLEMENTED, "more than one request message in a unary call")
                    return 0
                call.expected = length
                call.inbound = bytearray()
            take = min(size, <size_t>(call.expected - len(call.inbound)))
            call.inbound += (<const char*>data)[:take]
            data += take
            size -= take
            if len(call.inbound) == call.expected:
                call.messages += 1
                message = bytes(call.inbound)
                call.inbound = bytearray()
                call.expected = -1
                if call.handler.streaming:
                    call.handler.message(call, message)
                    if call.state >= ANSWERED:
                        return 0
                else:
                    call.message = message
        return 0

    cdef int _end(self, Call call) except -1:
        """The client half-closed the stream (END_STREAM)."""
        call.remote_ended = 1
        if call.state >= ANSWERED or call.handler is None:
            return 0
        if call.expected >= 0 or len(call.inbound):
            call.fail(INTERNAL, "the request ended inside a message")
            return 0
        if call.handler.streaming:
            call.handler.half_close(call)
            return 0
        if call.message is None:
            call.fail(UNIMPLEMENTED, "a unary call needs exactly one request message")
            return 0
        call.state = HANDLING
        call.handler.handle(call)
        return 0

    cdef int _stream_closed(self, int32_t stream_id) except -1:
        call = self.calls.pop(stream_id, None)
        if call is not None:
            answered = (<Call>call).state >= ANSWERED
            (<Call>call).state = CLOSED
            (<Call>call)._cancel_timer()
            if not answered:
                (<Call>call)._gone()
            self.endpoint.call_closed(self, call, answered)
        self.last_active = time.monotonic()
        return 0


# -- nghttp2's callbacks ---------------------------------------------------------------
# Each returns 0, or NGHTTP2_ERR_CALLBACK_FAILURE (which ends the session)
# if the protocol code itself failed; a handler's exception is reported to
# the endpoint and answered as INTERNAL instead.

cdef int _on_begin_headers(nghttp2_session* session, const nghttp2_frame* frame, void* user) noexcept with gil:
    cdef Connection connection = <Connection>user
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    try:
        connection._begin(frame.hd.stream_id)
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_header(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name, size_t name_size,
                    const uint8_t* value, size_t value_size, uint8_t flags, void* user) noexcept with gil:
    cdef Connection connection = <Connection>user
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0        # request trailers carry nothing a unary call needs
    try:
        connection._header(frame.hd.stream_id, name, name_size, value, value_size)
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_recv(nghttp2_session* session, const nghttp2_frame* frame, void* user) noexcept with gil:
    cdef Connection connection = <Connection>user
    cdef Call call
    cdef bint end_stream = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    try:
        if frame.hd.type == NGHTTP2_HEADERS:
            if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
                _safely(connection, frame.hd.stream_id, True, end_stream)
            elif end_stream:
                _safely(connection, frame.hd.stream_id, False, True)
        elif frame.hd.type == NGHTTP2_DATA and end_stream:
            _safely(connection, frame.hd.stream_id, False, True)
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef _safely(Connection connection, int32_t stream_id, bint headers, bint end_stream):
    call = connection.calls.get(stream_id)
    if call is None:
        return
    try:
        if headers:
            connection._headers_done(stream_id, end_stream)
        elif end_stream:
            connection._end(<Call>call)
    except Exception as error:  # a handler bug: this call fails, the connection goes on
        connection.endpoint.handler_error(call, error)
        (<Call>call).fail(INTERNAL, "internal error")


cdef int _on_data_chunk(nghttp2_session* session, uint8_t flags, int32_t stream_id, const uint8_t* data,
                        size_t size, void* user) noexcept with gil:
    cdef Connection connection = <Connection>user
    call = connection.calls.get(stream_id)
    try:
        connection._data(stream_id, data, size)
    except Exception as error:
        connection.endpoint.handler_error(call, error)
        if call is not None:
            (<Call>call).fail(INTERNAL, "internal error")
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_stream_close(nghttp2_session* session, int32_t stream_id, uint32_t error_code,
                          void* user) noexcept with gil:
    cdef Connection connection = <Connection>user
    try:
        connection._stream_closed(stream_id)
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _read_data(nghttp2_session* session, int32_t stream_id, uint8_t* buf, size_t length,
                        uint32_t* data_flags, nghttp2_data_source* source, void* user) noexcept with gil:
    cdef Call call = <Call>source.ptr
    cdef Connection connection = <Connection>user
    cdef bytes chunk
    cdef Py_ssize_t remaining, n
    cdef size_t written = 0
    try:
        while call.outbound and written < length:
            chunk = call.outbound[0]
            remaining = PyBytes_GET_SIZE(chunk) - call.out_offset
            n = remaining if <size_t>remaining <= length - written else <Py_ssize_t>(length - written)
            memcpy(buf + written, PyBytes_AS_STRING(chunk) + call.out_offset, n)
            written += n
            call.out_offset += n
            if call.out_offset == PyBytes_GET_SIZE(chunk):
                call.outbound.pop(0)
                call.out_offset = 0
        if not call.outbound:
            if call.state >= ANSWERED and call.status >= 0:
                data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
                connection._trailers(call)
            elif written == 0:
                call.deferred = 1
                return NGHTTP2_ERR_DEFERRED
        return <ssize_t>written
    except BaseException as error:
        connection.endpoint.core_error(connection, error)
        return NGHTTP2_ERR_CALLBACK_FAILURE
