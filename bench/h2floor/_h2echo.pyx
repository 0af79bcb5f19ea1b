# cython: language_level=3, boundscheck=False, wraparound=False
# The smallest gRPC-over-HTTP/2 server core we could write on nghttp2: an
# asyncio protocol (TLS comes from the event loop) that hands each complete
# unary request to a Python callable and answers with its bytes and
# grpc-status 0. It exists to measure the per-call floor of a native front
# end against grpc.aio's (bench/front_end_floor.py); it is not product code:
# no flow-control tuning, no deadlines, no error statuses, no limits.
from libc.stdint cimport uint8_t, int32_t, uint32_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef struct nghttp2_headers:
        int cat
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef union nghttp2_data_source:
        int fd
        void *ptr
    ctypedef ssize_t (*read_cb)(nghttp2_session*, int32_t, uint8_t*, size_t, uint32_t*, nghttp2_data_source*, void*)
    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        read_cb read_callback
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value
    ctypedef int (*frame_recv_cb)(nghttp2_session*, const nghttp2_frame*, void*)
    ctypedef int (*chunk_cb)(nghttp2_session*, uint8_t, int32_t, const uint8_t*, size_t, void*)
    ctypedef int (*close_cb)(nghttp2_session*, int32_t, uint32_t, void*)
    ctypedef int (*header_cb)(nghttp2_session*, const nghttp2_frame*, const uint8_t*, size_t, const uint8_t*, size_t, uint8_t, void*)
    int NGHTTP2_FLAG_END_STREAM
    int NGHTTP2_FLAG_NONE
    int NGHTTP2_DATA
    int NGHTTP2_HEADERS
    int NGHTTP2_DATA_FLAG_EOF
    int NGHTTP2_DATA_FLAG_NO_END_STREAM
    int NGHTTP2_NV_FLAG_NONE
    int NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
    int NGHTTP2_ERR_CALLBACK_FAILURE
    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks*, frame_recv_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks*, chunk_cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks*, close_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks*, header_cb)
    int nghttp2_session_server_new(nghttp2_session **, const nghttp2_session_callbacks *, void *)
    void nghttp2_session_del(nghttp2_session*)
    ssize_t nghttp2_session_mem_recv(nghttp2_session*, const uint8_t*, size_t)
    ssize_t nghttp2_session_mem_send(nghttp2_session*, const uint8_t**)
    int nghttp2_submit_settings(nghttp2_session*, uint8_t, const nghttp2_settings_entry*, size_t)
    int nghttp2_submit_response(nghttp2_session*, int32_t, const nghttp2_nv*, size_t, const nghttp2_data_provider*)
    int nghttp2_submit_trailer(nghttp2_session*, int32_t, const nghttp2_nv*, size_t)

cdef nghttp2_session_callbacks *_callbacks = NULL

cdef nghttp2_nv _nv(const char *name, size_t nl, const char *value, size_t vl):
    cdef nghttp2_nv nv
    nv.name = <uint8_t*>name
    nv.namelen = nl
    nv.value = <uint8_t*>value
    nv.valuelen = vl
    nv.flags = NGHTTP2_NV_FLAG_NONE
    return nv

cdef class H2Connection:
    cdef nghttp2_session *session
    cdef object transport
    cdef object handler
    cdef dict bodies      # stream id -> bytearray of request DATA
    cdef dict paths       # stream id -> :path
    cdef dict auth        # stream id -> authorization
    cdef dict responses   # stream id -> [bytes, offset]

    def __cinit__(self, handler):
        global _callbacks
        if _callbacks == NULL:
            nghttp2_session_callbacks_new(&_callbacks)
            nghttp2_session_callbacks_set_on_frame_recv_callback(_callbacks, _on_frame_recv)
            nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_callbacks, _on_chunk)
            nghttp2_session_callbacks_set_on_stream_close_callback(_callbacks, _on_close)
            nghttp2_session_callbacks_set_on_header_callback(_callbacks, _on_header)
        nghttp2_session_server_new(&self.session, _callbacks, <void*>self)
        self.handler = handler
        self.bodies = {}
        self.paths = {}
        self.auth = {}
        self.responses = {}

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)

    # asyncio protocol
    def connection_made(self, transport):
        cdef nghttp2_settings_entry entry
        self.transport = transport
        entry.settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        entry.value = 100
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, &entry, 1)
        self._flush()

    def data_received(self, bytes data):
        cdef ssize_t n = nghttp2_session_mem_recv(self.session, <const uint8_t*>PyBytes_AS_STRING(data),
                                                  PyBytes_GET_SIZE(data))
        if n < 0:
            self.transport.close()
            return
        self._flush()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.transport = None

    cdef _flush(self):
        cdef const uint8_t *out
        cdef ssize_t n
        chunks = []
        while True:
            n = nghttp2_session_mem_send(self.session, &out)
            if n <= 0:
                break
            chunks.append(PyBytes_FromStringAndSize(<const char*>out, n))
        if chunks and self.transport is not None:
            self.transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    cdef int _request_done(self, int32_t stream_id) except -1:
        body = self.bodies.pop(stream_id, b"")
        path = self.paths.pop(stream_id, b"")
        token = self.auth.pop(stream_id, b"")
        message = self.handler(path, token, bytes(body[5:]))
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        self.responses[stream_id] = [framed, 0]
        cdef nghttp2_nv hdrs[2]
        hdrs[0] = _nv(":status", 7, "200", 3)
        hdrs[1] = _nv("content-type", 12, "application/grpc", 16)
        cdef nghttp2_data_provider provider
        provider.source.ptr = NULL
        provider.read_callback = _read
        nghttp2_submit_response(self.session, stream_id, hdrs, 2, &provider)
        return 0

cdef int _on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t nl,
                    const uint8_t *value, size_t vl, uint8_t flags, void *user) noexcept with gil:
    cdef H2Connection conn = <H2Connection>user
    if nl == 5 and name[0] == b':' and name[1] == b'p':
        conn.paths[frame.hd.stream_id] = PyBytes_FromStringAndSize(<const char*>value, vl)
    elif nl == 13 and name[0] == b'a':
        conn.auth[frame.hd.stream_id] = PyBytes_FromStringAndSize(<const char*>value, vl)
    return 0

cdef int _on_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t length,
                   void *user) noexcept with gil:
    cdef H2Connection conn = <H2Connection>user
    buf = conn.bodies.get(stream_id)
    if buf is None:
        buf = conn.bodies[stream_id] = bytearray()
    buf += PyBytes_FromStringAndSize(<const char*>data, length)
    return 0

cdef int _on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user) noexcept with gil:
    cdef H2Connection conn = <H2Connection>user
    if (frame.hd.type == NGHTTP2_DATA or frame.hd.type == NGHTTP2_HEADERS) and (frame.hd.flags & NGHTTP2_FLAG_END_STREAM):
        try:
            conn._request_done(frame.hd.stream_id)
        except Exception:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0

cdef int _on_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *user) noexcept with gil:
    cdef H2Connection conn = <H2Connection>user
    conn.responses.pop(stream_id, None)
    conn.bodies.pop(stream_id, None)
    conn.paths.pop(stream_id, None)
    conn.auth.pop(stream_id, None)
    return 0

cdef ssize_t _read(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length, uint32_t *data_flags,
                   nghttp2_data_source *source, void *user) noexcept with gil:
    cdef H2Connection conn = <H2Connection>user
    entry = conn.responses[stream_id]
    cdef bytes framed = entry[0]
    cdef Py_ssize_t offset = entry[1]
    cdef Py_ssize_t remaining = PyBytes_GET_SIZE(framed) - offset
    cdef Py_ssize_t n = remaining if <size_t>remaining <= length else <Py_ssize_t>length
    memcpy(buf, PyBytes_AS_STRING(framed) + offset, n)
    entry[1] = offset + n
    cdef nghttp2_nv trailers[1]
    if offset + n == PyBytes_GET_SIZE(framed):
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
        trailers[0] = _nv("grpc-status", 11, "0", 1)
        nghttp2_submit_trailer(s, stream_id, trailers, 1)
    return n
