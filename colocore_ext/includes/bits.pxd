# cython: language_level=3
"""Bit and page helpers every colocore_ext module uses (all inline, all nogil)."""
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    PAGE_SHIFT = 12
    PAGE_SIZE = 4096

cdef extern from *:
    int ctz64 "__builtin_ctzll" (unsigned long long x) nogil
    int popcount64 "__builtin_popcountll" (unsigned long long x) nogil


cdef inline uint64_t load64(const uint8_t *p) noexcept nogil:
    """An unaligned 8-byte load (gcc turns the memcpy into one mov)."""
    cdef uint64_t w
    memcpy(&w, p, 8)
    return w


cdef inline void store64(uint8_t *p, uint64_t w) noexcept nogil:
    memcpy(p, &w, 8)
