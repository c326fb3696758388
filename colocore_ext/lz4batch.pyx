# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""lz4 for batches of pages, called without the GIL.

Where lz4 comes from (decided and measured, see the report in bench_pipeline): the `lz4`
package (python-lz4, a pip dependency of colocore) statically links liblz4 into its
`lz4.block._block` extension and exports the LZ4_* C API from it. This module dlopen()s
that extension (already loaded by `import lz4.block`) and calls LZ4_compress_default /
LZ4_decompress_safe through function pointers inside `with nogil:`. So: no vendored lz4
source, no liblz4-dev at build time, a plain `pip install` works, and the call costs the
same as python-lz4's own call on the same buffer (same code, no per-page Python objects).
If the symbols cannot be found (a python-lz4 built against a system liblz4 exports them
through its dependency, which dlsym also searches; failing that liblz4.so.1 is tried) the
import fails with a clear message: colocore has no silent slow fallback.

Blob format: an 8-byte header, then the payload.
    b"L4", kind (0 = raw, 1 = lz4 block), 0, u32 little-endian uncompressed length
A batch whose lz4 block would not be smaller than the input is stored raw.
"""
from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, free

cdef extern from "Python.h":
    PyObject *PyBytes_FromStringAndSize(const char *v, Py_ssize_t n)
    char *PyBytes_AS_STRING(PyObject *o)

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_LOCAL
    int RTLD_NOLOAD

ctypedef int (*compress_continue_t)(void *stream, const char *src, char *dst, int src_size,
                                    int dst_capacity, int acceleration) noexcept nogil
ctypedef void *(*init_stream_t)(void *buffer, size_t size) noexcept nogil
ctypedef int (*sizeof_state_t)() noexcept nogil
ctypedef int (*decompress_safe_t)(const char *src, char *dst, int compressed_size,
                                  int dst_capacity) noexcept nogil
ctypedef int (*compress_bound_t)(int input_size) noexcept nogil
ctypedef int (*version_number_t)() noexcept nogil

cdef compress_continue_t _compress_continue = NULL
cdef init_stream_t _init_stream = NULL
cdef sizeof_state_t _sizeof_state = NULL
cdef decompress_safe_t _decompress_safe = NULL
cdef compress_bound_t _compress_bound = NULL
cdef version_number_t _version_number = NULL

HEADER_SIZE = 8
KIND_RAW = 0
KIND_LZ4 = 1
MAX_INPUT_SIZE = 0x7E000000        # LZ4_MAX_INPUT_SIZE
cdef enum:
    _HEADER = 8
    _MAX_INPUT = 0x7E000000
    _KIND_RAW = 0
    _KIND_LZ4 = 1

LIBRARY = None                       # the file the LZ4 symbols were taken from


cdef bint _resolve(bytes path):
    global _compress_continue, _init_stream, _sizeof_state
    global _decompress_safe, _compress_bound, _version_number
    cdef void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL)
    if h == NULL:
        return False
    _compress_continue = <compress_continue_t>dlsym(h, b"LZ4_compress_fast_continue")
    _init_stream = <init_stream_t>dlsym(h, b"LZ4_initStream")
    _sizeof_state = <sizeof_state_t>dlsym(h, b"LZ4_sizeofState")
    _decompress_safe = <decompress_safe_t>dlsym(h, b"LZ4_decompress_safe")
    _compress_bound = <compress_bound_t>dlsym(h, b"LZ4_compressBound")
    _version_number = <version_number_t>dlsym(h, b"LZ4_versionNumber")
    return (_compress_continue != NULL and _init_stream != NULL and _sizeof_state != NULL and _decompress_safe != NULL and _compress_bound != NULL
            and _version_number != NULL)


def _load():
    global LIBRARY
    candidates = []
    try:
        import lz4.block._block as _block
        candidates.append(_block.__file__)
    except ImportError:
        pass
    candidates += ["liblz4.so.1", "liblz4.so"]
    for path in candidates:
        if _resolve(path.encode()):
            LIBRARY = path
            return
    raise ImportError("colocore_ext.lz4batch: cannot find the LZ4 C API (LZ4_compress_fast_continue, LZ4_initStream, "
                      "LZ4_decompress_safe) in python-lz4 or liblz4.so.1; "
                      "install it with `pip install lz4` (tried: %s)" % ", ".join(candidates))

_load()
LZ4_VERSION = _version_number()


def compress(const uint8_t[::1] buf not None, int acceleration=1):
    """Compress a batch (any buffer) into header + lz4 block, or header + raw bytes."""
    cdef Py_ssize_t n = buf.shape[0]
    if n > _MAX_INPUT:
        raise ValueError("lz4batch.compress: %d bytes is more than one lz4 block takes (%d)"
                         % (n, _MAX_INPUT))
    if acceleration < 1:
        raise ValueError("lz4batch.compress: acceleration must be >= 1")
    cdef int bound = _compress_bound(<int>n)
    # Compress into a malloc'd scratch block, then copy the (smaller) result into the
    # bytes object: malloc hands the same warm block back call after call, whereas a
    # bound-sized bytes object would be a fresh mapping whose pages fault on first write.
    cdef int state_size = _sizeof_state()
    cdef uint8_t *scratch = <uint8_t *>malloc(bound if bound > 0 else 1)
    cdef void *state = malloc(state_size)
    if scratch == NULL or state == NULL:
        free(scratch)
        free(state)
        raise MemoryError()
    cdef const uint8_t *src = &buf[0] if n else scratch
    cdef int c = 0
    cdef PyObject *res
    cdef uint8_t *out
    try:
        if n:
            with nogil:
                # A fresh stream and one "continue" call = one independent block. It
                # runs ~30% faster on compressible pages than LZ4_compress_fast (measured
                # here), and it is the path python-lz4 itself takes.
                c = _compress_continue(_init_stream(state, state_size), <const char *>src,
                                       <char *>scratch, <int>n, bound, acceleration)
        if not (c > 0 and c < n):
            c = 0                    # did not shrink (or empty): the batch goes raw
        res = PyBytes_FromStringAndSize(NULL, _HEADER + (c if c else n))
        if res == NULL:
            raise MemoryError()
        out = <uint8_t *>PyBytes_AS_STRING(res)
        out[0] = 0x4c     # 'L'
        out[1] = 0x34     # '4'
        out[2] = _KIND_LZ4 if c else _KIND_RAW
        out[3] = 0
        out[4] = <uint8_t>n
        out[5] = <uint8_t>(n >> 8)
        out[6] = <uint8_t>(n >> 16)
        out[7] = <uint8_t>(n >> 24)
        with nogil:
            if c:
                memcpy(out + _HEADER, scratch, c)
            elif n:
                memcpy(out + _HEADER, src, n)
    finally:
        free(scratch)
        free(state)
    ret = <object>res
    Py_XDECREF(res)
    return ret


cdef Py_ssize_t _parse_header(const uint8_t[::1] blob, Py_ssize_t expected,
                              int *kind) except -1:
    if blob.shape[0] < _HEADER:
        raise ValueError("lz4 batch: %d bytes is shorter than the %d-byte header"
                         % (blob.shape[0], _HEADER))
    if blob[0] != 0x4c or blob[1] != 0x34 or blob[3] != 0:
        raise ValueError("lz4 batch: bad header %r" % bytes(blob[:4]))
    if blob[2] != _KIND_RAW and blob[2] != _KIND_LZ4:
        raise ValueError("lz4 batch: unknown kind %d" % blob[2])
    cdef Py_ssize_t n = (<Py_ssize_t>blob[4] | (<Py_ssize_t>blob[5] << 8) |
                         (<Py_ssize_t>blob[6] << 16) | (<Py_ssize_t>blob[7] << 24))
    if n != expected:
        raise ValueError("lz4 batch: the header says %d bytes, %d were expected" % (n, expected))
    kind[0] = blob[2]
    if kind[0] == _KIND_RAW and blob.shape[0] - _HEADER != n:
        raise ValueError("lz4 batch: raw payload is %d bytes, the header says %d"
                         % (blob.shape[0] - _HEADER, n))
    if kind[0] == _KIND_LZ4 and (blob.shape[0] == _HEADER or blob.shape[0] - _HEADER > _MAX_INPUT):
        raise ValueError("lz4 batch: bad lz4 payload length %d" % (blob.shape[0] - _HEADER))
    return n


cdef int _decompress(const uint8_t[::1] blob, uint8_t *dst, Py_ssize_t n, int kind) except -1:
    cdef int r = 0
    cdef Py_ssize_t clen = blob.shape[0] - _HEADER
    if n == 0:
        return 0
    with nogil:
        if kind == _KIND_RAW:
            memcpy(dst, &blob[_HEADER], n)
            r = <int>n
        else:
            # LZ4_decompress_safe never writes past dst_capacity and never reads past
            # compressed_size, whatever the input.
            r = _decompress_safe(<const char *>&blob[_HEADER], <char *>dst, <int>clen, <int>n)
    if r != n:
        raise ValueError("lz4 batch: malformed lz4 data (decoded %d of %d bytes)" % (r, n))
    return 0


def decompress(const uint8_t[::1] blob not None, Py_ssize_t expected_size):
    """The batch that `compress` produced; ValueError if malformed or not expected_size long."""
    cdef int kind
    if expected_size < 0 or expected_size > _MAX_INPUT:
        raise ValueError("lz4 batch: expected size %d is out of range" % expected_size)
    cdef Py_ssize_t n = _parse_header(blob, expected_size, &kind)
    cdef PyObject *res = PyBytes_FromStringAndSize(NULL, n)
    if res == NULL:
        raise MemoryError()
    ret = <object>res
    Py_XDECREF(res)
    _decompress(blob, <uint8_t *>PyBytes_AS_STRING(res), n, kind)
    return ret


def decompress_into(const uint8_t[::1] blob not None, uint8_t[::1] out not None):
    """Decompress into `out` (exactly len(out) bytes expected); returns len(out).

    On malformed input ValueError is raised; bytes of `out` may have been written (never
    any outside it).
    """
    cdef int kind
    cdef Py_ssize_t n = _parse_header(blob, out.shape[0], &kind)
    if n:
        _decompress(blob, &out[0], n, kind)
    return n
