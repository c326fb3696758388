# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Moving pages between guest RAM, staging buffers and the RAM cache.

Primary side: `gather` copies the dirty pages (a list of page frame numbers) out of guest
RAM into one contiguous staging buffer while the vCPU is paused, and notes the zero pages
on the way (one read of each page, no second pass). Secondary side: `scatter` puts received
pages into the RAM cache, and later from the cache into guest RAM; `fill_zero` does the
same for pages that arrived as "zero".

Page frame numbers index the buffer given as `ram`/`dest` (page k starts at byte
k * 4096); for the RAM slot at guest-physical 0 they are the guest pfns. Page lists are
C-contiguous uint32 buffers (array.array('I'), the result of DirtyLog.harvest(), ...).
Every bound is checked before the copy loop starts: a bad list raises and writes nothing.
"""
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from colocore_ext.includes.bits cimport load64, PAGE_SIZE
from cpython cimport array
import array

PAGE = PAGE_SIZE

cdef extern from *:
    """
    #define CC_HASH_P1 0x9E3779B185EBCA87ULL
    #define CC_HASH_P2 0xC2B2AE3D27D4EB4FULL
    #define CC_HASH_P3 0x165667B19E3779F9ULL
    #define CC_HASH_P4 0x85EBCA77C2B2AE63ULL
    """
    const uint64_t P1 "CC_HASH_P1"
    const uint64_t P2 "CC_HASH_P2"
    const uint64_t P3 "CC_HASH_P3"
    const uint64_t P4 "CC_HASH_P4"


cdef bint page_is_zero(const uint8_t *p, size_t n) noexcept nogil:
    cdef size_t i = 0
    cdef uint64_t acc
    while i + 64 <= n:
        acc = (load64(p + i) | load64(p + i + 8) | load64(p + i + 16) | load64(p + i + 24) |
               load64(p + i + 32) | load64(p + i + 40) | load64(p + i + 48) | load64(p + i + 56))
        if acc:
            return False
        i += 64
    while i < n:
        if p[i]:
            return False
        i += 1
    return True


cdef extern from *:
    """
    #include <emmintrin.h>
    /* Copy one 4 KiB page and report whether it was all zero, in one pass. Stores to a
       16-byte aligned destination bypass the cache (the staging buffer is written once
       and read later by another stage; not polluting the cache with it is what lets the
       gather run near memcpy speed, which does the same for large copies). */
    static inline int cc_copy_page_is_zero(unsigned char *dst, const unsigned char *src) {
        __m128i acc = _mm_setzero_si128();
        int i;
        if (((uintptr_t)dst & 15) == 0) {
            for (i = 0; i < 4096; i += 64) {
                __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
                __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
                __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
                __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
                _mm_stream_si128((__m128i *)(dst + i), a);
                _mm_stream_si128((__m128i *)(dst + i + 16), b);
                _mm_stream_si128((__m128i *)(dst + i + 32), c);
                _mm_stream_si128((__m128i *)(dst + i + 48), d);
                acc = _mm_or_si128(acc, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
            }
        } else {
            for (i = 0; i < 4096; i += 64) {
                __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
                __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
                __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
                __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
                _mm_storeu_si128((__m128i *)(dst + i), a);
                _mm_storeu_si128((__m128i *)(dst + i + 16), b);
                _mm_storeu_si128((__m128i *)(dst + i + 32), c);
                _mm_storeu_si128((__m128i *)(dst + i + 48), d);
                acc = _mm_or_si128(acc, _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)));
            }
        }
        return _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) == 0xFFFF;
    }
    #define cc_store_fence() _mm_sfence()
    """
    bint cc_copy_page_is_zero(uint8_t *dst, const uint8_t *src) noexcept nogil
    void cc_store_fence() noexcept nogil


cdef bint copy_page_is_zero(uint8_t *dst, const uint8_t *src) noexcept nogil:
    return cc_copy_page_is_zero(dst, src)


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _round(uint64_t acc, uint64_t w) noexcept nogil:
    acc = acc + w * P2
    acc = _rotl(acc, 31)
    return acc * P1


cdef uint64_t hash_page(const uint8_t *p, size_t n) noexcept nogil:
    """A 64-bit xxh64-style hash (4 lanes over 32-byte stripes); n must be a multiple of 32.

    Not cryptographic: it tells a debug check that two copies of a page differ.
    """
    cdef uint64_t v1 = P1 + P2
    cdef uint64_t v2 = P2
    cdef uint64_t v3 = 0
    cdef uint64_t v4 = 0 - P1
    cdef size_t i
    cdef uint64_t h
    for i in range(0, n, 32):
        v1 = _round(v1, load64(p + i))
        v2 = _round(v2, load64(p + i + 8))
        v3 = _round(v3, load64(p + i + 16))
        v4 = _round(v4, load64(p + i + 24))
    h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    h = (h ^ _round(0, v1)) * P1 + P4
    h = (h ^ _round(0, v2)) * P1 + P4
    h = (h ^ _round(0, v3)) * P1 + P4
    h = (h ^ _round(0, v4)) * P1 + P4
    h += n
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


# ---- argument checks (with the GIL, before any copy) -------------------------------

cdef Py_ssize_t _page_count(Py_ssize_t nbytes, str what) except -1:
    if nbytes % PAGE_SIZE:
        raise ValueError("%s is %d bytes, not a whole number of %d-byte pages"
                         % (what, nbytes, PAGE_SIZE))
    return nbytes // PAGE_SIZE


cdef int _check_pfns(const uint32_t[::1] pfns, Py_ssize_t npages, str what) except -1:
    cdef Py_ssize_t k
    cdef Py_ssize_t n = pfns.shape[0]
    cdef uint32_t top = 0
    cdef Py_ssize_t bad = -1
    with nogil:
        for k in range(n):
            if pfns[k] > top:
                top = pfns[k]
    if n and top >= <uint64_t>npages:
        for k in range(n):
            if pfns[k] >= <uint64_t>npages:
                bad = k
                break
        raise IndexError("page list entry %d is pfn %d, outside %s (%d pages)"
                         % (bad, pfns[bad], what, npages))
    return 0


# ---- the Python API ------------------------------------------------------------------

def gather(const uint8_t[::1] ram not None, const uint32_t[::1] pfns not None,
           uint8_t[::1] staging not None):
    """Copy pages `pfns` of `ram` into `staging`, packing the non-zero pages.

    Returns (n_nonzero, zero_flags): the non-zero pages occupy the first n_nonzero pages
    of `staging` in list order; zero_flags[k] is 1 when page pfns[k] was all zero (it was
    not kept). `staging` must hold len(pfns) pages (any of them may be non-zero).
    """
    cdef Py_ssize_t npages = _page_count(ram.shape[0], "guest RAM")
    cdef Py_ssize_t n = pfns.shape[0]
    _page_count(staging.shape[0], "the staging buffer")
    if staging.shape[0] < n * PAGE_SIZE:
        raise ValueError("the staging buffer holds %d pages, the list has %d"
                         % (staging.shape[0] // PAGE_SIZE, n))
    _check_pfns(pfns, npages, "guest RAM")
    flags = PyByteArray_FromStringAndSize(NULL, n)
    cdef uint8_t[::1] zero_flags = flags
    cdef Py_ssize_t k
    cdef Py_ssize_t kept = 0
    cdef const uint8_t *src = &ram[0] if npages else NULL
    cdef uint8_t *dst = &staging[0] if staging.shape[0] else NULL
    cdef bint z
    with nogil:
        for k in range(n):
            # Copy first, decide after: a zero page is simply overwritten by the next one.
            z = copy_page_is_zero(dst + kept * PAGE_SIZE, src + <size_t>pfns[k] * PAGE_SIZE)
            zero_flags[k] = z
            if not z:
                kept += 1
        cc_store_fence()           # order the streaming stores before anyone reads staging
    return kept, flags


def scatter(uint8_t[::1] dest not None, const uint32_t[::1] pfns not None,
            const uint8_t[::1] src not None):
    """Copy page k of `src` to page pfns[k] of `dest`, for every k in the list."""
    cdef Py_ssize_t npages = _page_count(dest.shape[0], "the destination")
    cdef Py_ssize_t n = pfns.shape[0]
    if src.shape[0] < n * PAGE_SIZE:
        raise ValueError("the source holds %d bytes, %d pages need %d"
                         % (src.shape[0], n, n * PAGE_SIZE))
    _check_pfns(pfns, npages, "the destination")
    cdef Py_ssize_t k
    cdef uint8_t *d = &dest[0] if npages else NULL
    cdef const uint8_t *s = &src[0] if n else NULL
    with nogil:
        for k in range(n):
            memcpy(d + <size_t>pfns[k] * PAGE_SIZE, s + k * PAGE_SIZE, PAGE_SIZE)


def copy_pages(uint8_t[::1] dest not None, const uint8_t[::1] src not None,
               const uint32_t[::1] pfns not None):
    """Copy pages pfns[k] of `src` to the same pages of `dest` (two equal-sized memories:
    a COLO secondary puts back, from its RAM cache, the pages its own guest wrote)."""
    cdef Py_ssize_t npages = _page_count(dest.shape[0], "the destination")
    if src.shape[0] != dest.shape[0]:
        raise ValueError("copy_pages: source of %d bytes, destination of %d"
                         % (src.shape[0], dest.shape[0]))
    cdef Py_ssize_t n = pfns.shape[0]
    _check_pfns(pfns, npages, "the destination")
    cdef Py_ssize_t k
    cdef size_t off
    cdef uint8_t *d = &dest[0] if npages else NULL
    cdef const uint8_t *s = &src[0] if npages else NULL
    with nogil:
        for k in range(n):
            off = <size_t>pfns[k] * PAGE_SIZE
            memcpy(d + off, s + off, PAGE_SIZE)


def fill_zero(uint8_t[::1] dest not None, const uint32_t[::1] pfns not None):
    """Zero pages pfns[k] of `dest` (pages that were sent as "zero page")."""
    cdef Py_ssize_t npages = _page_count(dest.shape[0], "the destination")
    cdef Py_ssize_t n = pfns.shape[0]
    _check_pfns(pfns, npages, "the destination")
    cdef Py_ssize_t k
    cdef uint8_t *d = &dest[0] if npages else NULL
    with nogil:
        for k in range(n):
            memset(d + <size_t>pfns[k] * PAGE_SIZE, 0, PAGE_SIZE)


def is_zero_page(const uint8_t[::1] buf not None):
    """True when every byte of `buf` (a page, or any buffer) is zero."""
    cdef bint z
    cdef Py_ssize_t n = buf.shape[0]
    if n == 0:
        return True
    with nogil:
        z = page_is_zero(&buf[0], n)
    return z


def page_hashes(const uint8_t[::1] ram not None, const uint32_t[::1] pfns not None):
    """array('Q') of a fast 64-bit hash of each page pfns[k] of `ram` (debug RAM compare)."""
    cdef Py_ssize_t npages = _page_count(ram.shape[0], "guest RAM")
    cdef Py_ssize_t n = pfns.shape[0]
    _check_pfns(pfns, npages, "guest RAM")
    cdef array.array out = array.clone(array.array('Q'), n, zero=False)
    cdef uint64_t *h = <uint64_t *>out.data.as_voidptr
    cdef Py_ssize_t k
    cdef const uint8_t *src = &ram[0] if npages else NULL
    with nogil:
        for k in range(n):
            h[k] = hash_page(src + <size_t>pfns[k] * PAGE_SIZE, PAGE_SIZE)
    return out


def copy(uint8_t[::1] dst not None, const uint8_t[::1] src not None):
    """memcpy(dst, src, len(src)) without the GIL: the physical reference of the benchmark."""
    cdef Py_ssize_t n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError("copy: destination has %d bytes, source %d" % (dst.shape[0], n))
    if n == 0:
        return
    with nogil:
        memcpy(&dst[0], &src[0], n)
