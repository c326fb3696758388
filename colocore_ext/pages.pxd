# cython: language_level=3
"""What pages.pyx exports to the other colocore_ext modules (capture.pyx copies pages
and detects zero pages with these)."""
from libc.stdint cimport uint8_t, uint64_t

cdef bint copy_page_is_zero(uint8_t *dst, const uint8_t *src) noexcept nogil
