# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""XBZRLE-style page delta: what changed in a page since the copy the secondary already has.

Format (the one QEMU's XBZRLE uses): a sequence of records
    ULEB128 zero_run, ULEB128 change_run, change_run bytes of the new page
where zero_run counts bytes equal to the old copy and change_run the bytes that differ
(copied verbatim). Only the first record may have zero_run == 0; change_run is never 0;
trailing unchanged bytes are not encoded, so an unchanged page encodes to nothing.
A change run ends at the first byte that equals the old copy again.

Encoding compares 8 bytes at a time (32 in the common all-equal stretch) and finds run
edges with count-trailing-zeros; a delta that would not be smaller than the page is
abandoned as soon as it grows past the limit (-1: send the whole page).
Decoding validates the whole delta before writing anything, so a malformed delta raises
ValueError and leaves the page untouched; no write ever leaves the page.

`XbzrleCache` keeps the last-sent copy of pages, keyed by pfn, in a fixed,
direct-mapped table (`xbzrle-cache-size` bytes, a power of two), like QEMU's page cache:
a slot held by a page sent in the last two generations (checkpoints) is not evicted.
"""
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset
from colocore_ext.includes.bits cimport load64, ctz64, PAGE_SIZE

MAX_PAGE = 1 << 20           # longest page the codec accepts (ULEB lengths <= 3 bytes)
MIN_CACHE_SIZE = 16 * PAGE_SIZE
CACHED_PAGE_LIFETIME = 2

cdef enum:
    _MAX_PAGE = 1 << 20
    _LIFETIME = 2

cdef extern from *:
    """
    #define CC_ONES  0x0101010101010101ULL
    #define CC_HIGHS 0x8080808080808080ULL
    """
    const uint64_t ONES "CC_ONES"
    const uint64_t HIGHS "CC_HIGHS"


cdef inline Py_ssize_t _uleb_size(Py_ssize_t v) noexcept nogil:
    if v < 0x80:
        return 1
    if v < 0x4000:
        return 2
    return 3


cdef inline Py_ssize_t _uleb_put(uint8_t *p, Py_ssize_t v) noexcept nogil:
    if v < 0x80:
        p[0] = <uint8_t>v
        return 1
    if v < 0x4000:
        p[0] = <uint8_t>(v | 0x80)
        p[1] = <uint8_t>(v >> 7)
        return 2
    p[0] = <uint8_t>(v | 0x80)
    p[1] = <uint8_t>((v >> 7) | 0x80)
    p[2] = <uint8_t>(v >> 14)
    return 3


cdef extern from *:
    """
    #include <emmintrin.h>
    /* First index >= i where a and b differ, or n: 64 bytes per step while they are equal
       (the common case: most of a page is unchanged), then the exact byte from the mask. */
    static inline Py_ssize_t cc_find_diff(const unsigned char *a, const unsigned char *b,
                                          Py_ssize_t i, Py_ssize_t n) {
        unsigned int m;
        while (i + 64 <= n) {
            __m128i e0 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + i)),
                                        _mm_loadu_si128((const __m128i *)(b + i)));
            __m128i e1 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + i + 16)),
                                        _mm_loadu_si128((const __m128i *)(b + i + 16)));
            __m128i e2 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + i + 32)),
                                        _mm_loadu_si128((const __m128i *)(b + i + 32)));
            __m128i e3 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + i + 48)),
                                        _mm_loadu_si128((const __m128i *)(b + i + 48)));
            m = (unsigned int)_mm_movemask_epi8(_mm_and_si128(_mm_and_si128(e0, e1),
                                                               _mm_and_si128(e2, e3)));
            if (m != 0xFFFF) {
                m = (unsigned int)_mm_movemask_epi8(e0) ^ 0xFFFF;
                if (m) return i + __builtin_ctz(m);
                m = (unsigned int)_mm_movemask_epi8(e1) ^ 0xFFFF;
                if (m) return i + 16 + __builtin_ctz(m);
                m = (unsigned int)_mm_movemask_epi8(e2) ^ 0xFFFF;
                if (m) return i + 32 + __builtin_ctz(m);
                m = (unsigned int)_mm_movemask_epi8(e3) ^ 0xFFFF;
                return i + 48 + __builtin_ctz(m);
            }
            i += 64;
        }
        while (i + 16 <= n) {
            m = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(
                    _mm_loadu_si128((const __m128i *)(a + i)),
                    _mm_loadu_si128((const __m128i *)(b + i)))) ^ 0xFFFF;
            if (m) return i + __builtin_ctz(m);
            i += 16;
        }
        while (i < n && a[i] == b[i]) i++;
        return i;
    }
    """
    Py_ssize_t cc_find_diff(const uint8_t *a, const uint8_t *b, Py_ssize_t i, Py_ssize_t n) noexcept nogil


cdef inline Py_ssize_t _find_diff(const uint8_t *a, const uint8_t *b, Py_ssize_t i,
                                  Py_ssize_t n) noexcept nogil:
    """First index >= i where a and b differ, or n."""
    return cc_find_diff(a, b, i, n)


cdef inline Py_ssize_t _find_equal(const uint8_t *a, const uint8_t *b, Py_ssize_t i,
                                   Py_ssize_t n) noexcept nogil:
    """First index >= i where a and b are equal, or n."""
    cdef uint64_t x
    cdef uint64_t m
    while i + 8 <= n:
        x = load64(a + i) ^ load64(b + i)
        # lowest zero byte of x (exact for the lowest one; borrows only disturb higher bytes)
        m = (x - ONES) & ~x & HIGHS
        if m:
            return i + (ctz64(m) >> 3)
        i += 8
    while i < n and a[i] != b[i]:
        i += 1
    return i


cdef Py_ssize_t xbzrle_encode(const uint8_t *new, const uint8_t *old, Py_ssize_t n,
                              uint8_t *out, Py_ssize_t limit) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t d = 0
    cdef Py_ssize_t start
    cdef Py_ssize_t zrun
    cdef Py_ssize_t nzrun
    while True:
        start = i
        i = _find_diff(new, old, i, n)
        if i >= n:
            return d
        zrun = i - start
        start = i
        i = _find_equal(new, old, i, n)
        nzrun = i - start
        if d + _uleb_size(zrun) + _uleb_size(nzrun) + nzrun > limit:
            return -1
        d += _uleb_put(out + d, zrun)
        d += _uleb_put(out + d, nzrun)
        if nzrun <= 16 and d + 16 <= limit and start + 16 <= n:
            memcpy(out + d, new + start, 16)     # fixed size: one 16-byte move, no call
        else:
            memcpy(out + d, new + start, nzrun)
        d += nzrun


cdef enum:
    ERR_LENGTH = -1      # a ULEB128 length is truncated, too long or not minimal
    ERR_ZERO_RUN = -2    # a zero-length run where one is not allowed
    ERR_PAST_PAGE = -3   # a run reaches past the end of the page
    ERR_TRUNCATED = -4   # the delta ends inside a record


cdef inline int _uleb_get(const uint8_t *p, Py_ssize_t dlen, Py_ssize_t *i,
                          Py_ssize_t *value) noexcept nogil:
    cdef Py_ssize_t j = i[0]
    cdef Py_ssize_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        if j >= dlen:
            return ERR_TRUNCATED
        b = p[j]
        j += 1
        v |= <Py_ssize_t>(b & 0x7f) << shift
        if not (b & 0x80):
            if b == 0 and shift:
                return ERR_LENGTH          # non-minimal encoding
            break
        shift += 7
        if shift > 14:
            return ERR_LENGTH              # longer than any page length
    i[0] = j
    value[0] = v
    return 0


cdef int _check(const uint8_t *delta, Py_ssize_t dlen, Py_ssize_t n,
                Py_ssize_t *where) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t d = 0
    cdef Py_ssize_t v = 0
    cdef int r
    while i < dlen:
        where[0] = i
        r = _uleb_get(delta, dlen, &i, &v)
        if r:
            return r
        if v == 0 and where[0] != 0:
            return ERR_ZERO_RUN
        if v > n - d:
            return ERR_PAST_PAGE
        d += v
        where[0] = i
        r = _uleb_get(delta, dlen, &i, &v)
        if r:
            return r
        if v == 0:
            return ERR_ZERO_RUN
        if v > n - d:
            return ERR_PAST_PAGE
        if v > dlen - i:
            return ERR_TRUNCATED
        i += v
        d += v
    return 0


cdef int xbzrle_check(const uint8_t *delta, Py_ssize_t dlen, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t where
    return _check(delta, dlen, n, &where)


cdef void xbzrle_apply(const uint8_t *delta, Py_ssize_t dlen, uint8_t *page) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t d = 0
    cdef Py_ssize_t v = 0
    while i < dlen:
        _uleb_get(delta, dlen, &i, &v)
        d += v
        _uleb_get(delta, dlen, &i, &v)
        memcpy(page + d, delta + i, v)
        i += v
        d += v


cdef object _error(int code, Py_ssize_t where, Py_ssize_t n, str what):
    reason = {ERR_LENGTH: "a malformed ULEB128 length",
              ERR_ZERO_RUN: "a zero-length run",
              ERR_PAST_PAGE: "a run past the end of the %d-byte page" % n,
              ERR_TRUNCATED: "a truncated record"}.get(code, "error %d" % code)
    return ValueError("malformed page delta%s: %s at byte %d" % (what, reason, where))


cdef Py_ssize_t _page_len(Py_ssize_t n) except -1:
    if n <= 0 or n > _MAX_PAGE:
        raise ValueError("page length %d is outside 1..%d bytes" % (n, _MAX_PAGE))
    return n


# ---- single pages ----------------------------------------------------------------------

def encode(const uint8_t[::1] new_page not None, const uint8_t[::1] old_page not None,
           uint8_t[::1] out not None):
    """Encode `new_page` against `old_page` into `out`.

    Returns the delta length (0: unchanged page), or -1 when the delta would not be
    smaller than the page or would not fit in `out` (then send the whole page).
    """
    cdef Py_ssize_t n = _page_len(new_page.shape[0])
    if old_page.shape[0] != n:
        raise ValueError("xbzrle.encode: pages differ in length (%d and %d bytes)"
                         % (n, old_page.shape[0]))
    cdef Py_ssize_t limit = min(out.shape[0], n - 1)
    cdef Py_ssize_t r
    cdef uint8_t dummy
    cdef uint8_t *o = &out[0] if out.shape[0] else &dummy
    with nogil:
        r = xbzrle_encode(&new_page[0], &old_page[0], n, o, limit)
    return r


def decode(const uint8_t[::1] delta not None, uint8_t[::1] page not None):
    """Apply `delta` onto `page` in place; ValueError (page untouched) if malformed."""
    cdef Py_ssize_t n = _page_len(page.shape[0])
    cdef Py_ssize_t dlen = delta.shape[0]
    cdef Py_ssize_t where = 0
    cdef int r
    if dlen == 0:
        return
    with nogil:
        r = _check(&delta[0], dlen, n, &where)
        if r == 0:
            xbzrle_apply(&delta[0], dlen, &page[0])
    if r:
        raise _error(r, where, n, "")


# ---- batches (one call per checkpoint, not per page) ------------------------------------

cdef int _check_batch_args(Py_ssize_t n, Py_ssize_t pages_len, Py_ssize_t other_len,
                           Py_ssize_t lengths_len, str what) except -1:
    if pages_len % n:
        raise ValueError("%s: the page buffer (%d bytes) is not a whole number of %d-byte pages"
                         % (what, pages_len, n))
    if other_len < pages_len:
        raise ValueError("%s: the second page buffer has %d bytes, needs %d"
                         % (what, other_len, pages_len))
    if lengths_len < pages_len // n:
        raise ValueError("%s: lengths has room for %d pages, needs %d"
                         % (what, lengths_len, pages_len // n))
    return 0


def encode_batch(const uint8_t[::1] new_pages not None, const uint8_t[::1] old_pages not None,
                 uint8_t[::1] out not None, int32_t[::1] lengths not None,
                 Py_ssize_t page_size=PAGE_SIZE):
    """Encode page k of `new_pages` against page k of `old_pages`, deltas packed in `out`.

    lengths[k] receives the delta length of page k (0 unchanged, -1 send it whole; a page
    also gets -1 when `out` has no room left for its delta). Returns the bytes used in out.
    """
    cdef Py_ssize_t n = _page_len(page_size)
    _check_batch_args(n, new_pages.shape[0], old_pages.shape[0], lengths.shape[0],
                      "xbzrle.encode_batch")
    cdef Py_ssize_t count = new_pages.shape[0] // n
    cdef Py_ssize_t k
    cdef Py_ssize_t d = 0
    cdef Py_ssize_t r
    cdef Py_ssize_t room = out.shape[0]
    cdef uint8_t dummy
    cdef uint8_t *o = &out[0] if room else &dummy
    if count == 0:
        return 0
    with nogil:
        for k in range(count):
            r = xbzrle_encode(&new_pages[k * n], &old_pages[k * n], n, o + d,
                              min(n - 1, room - d))
            lengths[k] = <int32_t>r
            if r > 0:
                d += r
    return d


def decode_batch(const uint8_t[::1] deltas not None, const int32_t[::1] lengths not None,
                 uint8_t[::1] pages not None, Py_ssize_t page_size=PAGE_SIZE):
    """Apply the packed deltas (lengths[k] bytes each; -1 = skip) onto page k of `pages`.

    Every delta is validated first: a malformed one raises ValueError and no page changes.
    """
    cdef Py_ssize_t n = _page_len(page_size)
    if pages.shape[0] % n:
        raise ValueError("xbzrle.decode_batch: the page buffer is not a whole number of pages")
    cdef Py_ssize_t count = lengths.shape[0]
    if count > pages.shape[0] // n:
        raise ValueError("xbzrle.decode_batch: %d deltas for %d pages" % (count, pages.shape[0] // n))
    cdef Py_ssize_t k
    cdef Py_ssize_t off = 0
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t where = 0
    cdef Py_ssize_t bad = -1
    cdef int r = 0
    for k in range(count):
        if lengths[k] > 0:
            total += lengths[k]
        elif lengths[k] < -1:
            raise ValueError("xbzrle.decode_batch: delta %d has length %d" % (k, lengths[k]))
    if total != deltas.shape[0]:
        raise ValueError("xbzrle.decode_batch: the lengths add up to %d bytes, the deltas are %d"
                         % (total, deltas.shape[0]))
    if total == 0:
        return
    cdef const uint8_t *src = &deltas[0]
    with nogil:
        for k in range(count):
            if lengths[k] > 0:
                r = _check(src + off, lengths[k], n, &where)
                if r:
                    bad = k
                    break
                off += lengths[k]
        if bad < 0:
            off = 0
            for k in range(count):
                if lengths[k] > 0:
                    xbzrle_apply(src + off, lengths[k], &pages[k * n])
                    off += lengths[k]
    if bad >= 0:
        raise _error(r, where, n, " %d" % bad)


# ---- the cache of last-sent pages -------------------------------------------------------

cdef class XbzrleCache:
    """Last-sent copies of pages, keyed by pfn; `size_bytes` (a power of two) bounds it.

    Direct mapped: pfn p lives in slot p & (slots - 1). Call `advance()` once per
    checkpoint; a slot whose page was sent in the last two generations is not evicted
    by a different pfn (hot pages keep their copy, as in QEMU).
    """
    cdef uint8_t *data
    cdef uint64_t *keys
    cdef uint64_t *ages
    cdef readonly Py_ssize_t size_bytes
    cdef readonly Py_ssize_t slots
    cdef readonly Py_ssize_t page_size
    cdef public uint64_t generation
    cdef readonly uint64_t hits, misses, overflows, kept_fresh
    cdef uint64_t mask

    def __cinit__(self):
        self.data = NULL
        self.keys = NULL
        self.ages = NULL

    def __init__(self, size_bytes, Py_ssize_t page_size=PAGE_SIZE):
        if not isinstance(size_bytes, int) or isinstance(size_bytes, bool):
            raise TypeError("xbzrle-cache-size must be an integer number of bytes")
        _page_len(page_size)
        if page_size & (page_size - 1):
            raise ValueError("page size %d is not a power of two" % page_size)
        if size_bytes < max(MIN_CACHE_SIZE, 16 * page_size):
            raise ValueError("xbzrle-cache-size %d is too small: at least %d bytes (16 pages)"
                             % (size_bytes, max(MIN_CACHE_SIZE, 16 * page_size)))
        if size_bytes & (size_bytes - 1):
            raise ValueError("xbzrle-cache-size %d is not a power of two (e.g. %d)"
                             % (size_bytes, 1 << (size_bytes.bit_length() - 1)))
        if size_bytes > (1 << 40):
            raise ValueError("xbzrle-cache-size %d is larger than 1 TiB" % size_bytes)
        self.size_bytes = size_bytes
        self.page_size = page_size
        self.slots = size_bytes // page_size
        self.mask = self.slots - 1
        self.data = <uint8_t *>PyMem_Malloc(size_bytes)
        self.keys = <uint64_t *>PyMem_Malloc(self.slots * sizeof(uint64_t))
        self.ages = <uint64_t *>PyMem_Malloc(self.slots * sizeof(uint64_t))
        if self.data == NULL or self.keys == NULL or self.ages == NULL:
            raise MemoryError("cannot allocate an xbzrle cache of %d bytes" % size_bytes)
        self.clear()

    def __dealloc__(self):
        PyMem_Free(self.data)
        PyMem_Free(self.keys)
        PyMem_Free(self.ages)

    def clear(self):
        memset(self.keys, 0xff, self.slots * sizeof(uint64_t))   # all slots empty
        memset(self.ages, 0, self.slots * sizeof(uint64_t))
        self.generation = 0
        self.hits = self.misses = self.overflows = self.kept_fresh = 0

    def advance(self):
        """Start a new generation (call once per checkpoint)."""
        self.generation += 1

    def __len__(self):
        cdef Py_ssize_t k, used = 0
        for k in range(self.slots):
            if self.keys[k] != <uint64_t>-1:
                used += 1
        return used

    def __contains__(self, pfn):
        cdef uint64_t p = pfn
        return self.keys[p & self.mask] == p

    def lookup(self, uint64_t pfn):
        """The cached copy of page `pfn` (a view, valid until the next insert) or None."""
        cdef Py_ssize_t slot = pfn & self.mask
        if self.keys[slot] != pfn:
            return None
        return memoryview(<uint8_t[:self.page_size]>(self.data + slot * self.page_size))

    cdef inline bint _store(self, uint64_t pfn, const uint8_t *page) noexcept nogil:
        cdef Py_ssize_t slot = pfn & self.mask
        cdef uint64_t held = self.keys[slot]
        if held != pfn and held != <uint64_t>-1 and self.ages[slot] + _LIFETIME > self.generation:
            return False                      # another page, sent recently: keep it
        memcpy(self.data + slot * self.page_size, page, self.page_size)
        self.keys[slot] = pfn
        self.ages[slot] = self.generation
        return True

    def insert(self, uint64_t pfn, const uint8_t[::1] page not None):
        """Remember `page` as the last-sent copy of `pfn`; False if the slot was kept."""
        if page.shape[0] != self.page_size:
            raise ValueError("XbzrleCache.insert: page is %d bytes, the cache holds %d-byte pages"
                             % (page.shape[0], self.page_size))
        cdef bint ok
        with nogil:
            ok = self._store(pfn, &page[0])
        if not ok:
            self.kept_fresh += 1
        return ok

    def encode_pages(self, const uint32_t[::1] pfns not None, const uint8_t[::1] pages not None,
                     uint8_t[::1] out not None, int32_t[::1] lengths not None):
        """Delta-encode page k of `pages` (page pfns[k]) against its cached copy.

        lengths[k] = delta length (0 unchanged), or -1: send page k whole (cache miss, the
        delta would not pay, or `out` is full). Deltas are packed into `out`; the cache is
        updated with every page (they are all about to be sent). Returns bytes used in out.
        """
        cdef Py_ssize_t n = self.page_size
        cdef Py_ssize_t count = pfns.shape[0]
        if pages.shape[0] < count * n:
            raise ValueError("XbzrleCache.encode_pages: %d pfns, the page buffer holds %d pages"
                             % (count, pages.shape[0] // n))
        if lengths.shape[0] < count:
            raise ValueError("XbzrleCache.encode_pages: lengths has room for %d pages, needs %d"
                             % (lengths.shape[0], count))
        cdef Py_ssize_t k, slot, r
        cdef Py_ssize_t d = 0
        cdef Py_ssize_t room = out.shape[0]
        cdef uint8_t dummy
        cdef uint8_t *o = &out[0] if room else &dummy
        cdef const uint8_t *page
        cdef uint64_t pfn
        if count == 0:
            return 0
        with nogil:
            for k in range(count):
                pfn = pfns[k]
                page = &pages[k * n]
                slot = pfn & self.mask
                if self.keys[slot] == pfn:
                    r = xbzrle_encode(page, self.data + slot * n, n, o + d, min(n - 1, room - d))
                    if r < 0:
                        self.overflows += 1
                    else:
                        self.hits += 1
                        d += r
                    lengths[k] = <int32_t>r
                    if r != 0:
                        memcpy(self.data + slot * n, page, n)
                    self.ages[slot] = self.generation
                else:
                    self.misses += 1
                    lengths[k] = -1
                    if not self._store(pfn, page):
                        self.kept_fresh += 1
        return d
