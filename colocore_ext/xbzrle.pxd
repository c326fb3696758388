# cython: language_level=3
"""XBZRLE page delta: C-level entry points for other colocore_ext modules."""
from libc.stdint cimport uint8_t

# Encode `new` against `old` (n bytes each) into out[0:limit]; the byte count, 0 for an
# unchanged page, -1 when the delta would need more than `limit` bytes.
cdef Py_ssize_t xbzrle_encode(const uint8_t *new, const uint8_t *old, Py_ssize_t n,
                              uint8_t *out, Py_ssize_t limit) noexcept nogil
# Check a delta for a page of n bytes: 0 when well formed, else a negative error code.
cdef int xbzrle_check(const uint8_t *delta, Py_ssize_t dlen, Py_ssize_t n) noexcept nogil
# Apply a delta already accepted by xbzrle_check.
cdef void xbzrle_apply(const uint8_t *delta, Py_ssize_t dlen, uint8_t *page) noexcept nogil
