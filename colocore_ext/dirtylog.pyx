# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Which pages of a memslot were written since the last checkpoint.

Two sources are merged at every harvest:
- KVM's dirty log of the memslot (guest writes): KVM_GET_DIRTY_LOG. With
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled (see `enable_manual_protect`), GET only
  copies the bitmap and the pages are write-protected again by KVM_CLEAR_DIRTY_LOG,
  issued once over the span of words that had bits (the kernel skips zero words); without
  it, GET clears and re-protects the whole slot itself.
- a software bitmap of pages the VMM wrote into guest memory itself (device emulation:
  virtqueue used rings, receive buffers). KVM never sees those writes.

Who does what: the engine creates the memslot (KVM_SET_USER_MEMORY_REGION with
KVM_MEM_LOG_DIRTY_PAGES); `enable_manual_protect(vm_fd)` must be called before that, and
its result passed here as `manual_protect`. DirtyLog never changes the memslot.

Page frame numbers are relative to the slot (page k = bytes k*4096.. of the slot's
memory); for the RAM slot at guest-physical 0 they are the guest pfns.

Threads: `mark`/`mark_range` (or `mark_nogil` from Cython) run on the vCPU thread while
the guest runs; `harvest` runs only while the vCPU is paused. Marks use an atomic OR, and
harvest takes the software words with an atomic exchange, so a mark racing a harvest is
never lost (it shows up in this harvest or the next).
"""
from cpython cimport array
from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.ioctl cimport ioctl
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from colocore_ext.includes.kvm cimport (kvm_dirty_log, kvm_clear_dirty_log, kvm_enable_cap,
                                    KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_ENABLE_CAP,
                                    KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                                    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                                    KVM_DIRTY_LOG_INITIALLY_SET)
from colocore_ext.includes.bits cimport ctz64, popcount64, PAGE_SHIFT, PAGE_SIZE
import array
import os

cdef extern from *:
    """
    #define cc_atomic_or(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)
    #define cc_atomic_xchg(p, v) __atomic_exchange_n((p), (v), __ATOMIC_ACQ_REL)
    """
    uint64_t cc_atomic_or(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t cc_atomic_xchg(uint64_t *p, uint64_t v) noexcept nogil

MAX_SLOT_SIZE = 1 << 44       # 2**32 pages: the most a u32 pfn list can name


def enable_manual_protect(int vm_fd):
    """Turn on manual dirty-log protection (MANUAL_PROTECT_ENABLE | INITIALLY_SET).

    Call it on the VM fd before creating any memslot with dirty logging. Returns False
    (and changes nothing) where the kernel lacks the capability; DirtyLog then works with
    plain KVM_GET_DIRTY_LOG. With INITIALLY_SET every page starts out dirty (the first
    harvest returns the whole slot) and the kernel need not write-protect the slot up front.
    """
    cdef kvm_enable_cap cap
    cdef int avail = ioctl(vm_fd, KVM_CHECK_EXTENSION,
                           <unsigned long>KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    if avail <= 0:
        return False
    memset(&cap, 0, sizeof(cap))
    cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if avail & KVM_DIRTY_LOG_INITIALLY_SET:
        cap.args[0] |= KVM_DIRTY_LOG_INITIALLY_SET
    return ioctl(vm_fd, KVM_ENABLE_CAP, &cap) == 0


cdef inline double _now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3


cdef class DirtyLog:
    """The dirty pages of one memslot: KVM's log plus the VMM's own writes.

    DirtyLog(vm_fd, slot, host_addr, size, manual_protect=False, gpa_base=0)
    `size` must be a whole number of pages; `host_addr` is where the slot is mapped in
    this process (kept for the engine; DirtyLog does not touch guest memory).
    """

    def __cinit__(self):
        self.kvm_bitmap = NULL
        self.soft_bitmap = NULL

    def __init__(self, int vm_fd, uint32_t slot, uint64_t host_addr, uint64_t size,
                 bint manual_protect=False, uint64_t gpa_base=0):
        if vm_fd < 0:
            raise ValueError("DirtyLog: vm_fd %d is not an open VM file descriptor" % vm_fd)
        if size == 0 or size % PAGE_SIZE or size > MAX_SLOT_SIZE:
            raise ValueError("DirtyLog: slot size %d is not a whole number of 4 KiB pages "
                             "between 4 KiB and 16 TiB" % size)
        if host_addr % PAGE_SIZE or gpa_base % PAGE_SIZE:
            raise ValueError("DirtyLog: host address 0x%x and guest address 0x%x must be "
                             "page aligned" % (host_addr, gpa_base))
        self.vm_fd = vm_fd
        self.slot = slot
        self.host_addr = host_addr
        self.size = size
        self.gpa_base = gpa_base
        self.npages = size >> PAGE_SHIFT
        self.manual_protect = manual_protect
        self.nwords = (self.npages + 63) // 64
        # KVM copies ALIGN(npages, 64) bits: whole u64 words, as allocated here.
        self.kvm_bitmap = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        self.soft_bitmap = <uint64_t *>calloc(self.nwords, sizeof(uint64_t))
        if self.kvm_bitmap == NULL or self.soft_bitmap == NULL:
            raise MemoryError("DirtyLog: cannot allocate bitmaps for %d pages" % self.npages)

    def __dealloc__(self):
        free(self.kvm_bitmap)
        free(self.soft_bitmap)

    # ---- the VMM's own writes ----------------------------------------------------------

    cdef void mark_nogil(self, uint64_t pfn) noexcept nogil:
        if pfn < self.npages:
            cc_atomic_or(&self.soft_bitmap[pfn >> 6], (<uint64_t>1) << (pfn & 63))

    cdef void mark_range_nogil(self, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef uint64_t first, last, p
        if length == 0 or gpa < self.gpa_base:
            return
        first = (gpa - self.gpa_base) >> PAGE_SHIFT
        last = (gpa - self.gpa_base + length - 1) >> PAGE_SHIFT
        if last >= self.npages:
            last = self.npages - 1
        p = first
        while p <= last:
            cc_atomic_or(&self.soft_bitmap[p >> 6], (<uint64_t>1) << (p & 63))
            p += 1

    def mark(self, uint64_t pfn):
        """Record that the VMM wrote page `pfn` (slot relative)."""
        if pfn >= self.npages:
            raise IndexError("DirtyLog.mark: pfn %d is outside the slot (%d pages)"
                             % (pfn, self.npages))
        self.mark_nogil(pfn)

    def mark_range(self, uint64_t gpa, uint64_t length):
        """Record that the VMM wrote guest-physical bytes [gpa, gpa + length)."""
        if length == 0:
            return
        if (gpa < self.gpa_base or length > self.size
                or gpa - self.gpa_base > self.size - length):
            raise IndexError("DirtyLog.mark_range: [0x%x, 0x%x) is outside the slot "
                             "[0x%x, 0x%x)" % (gpa, gpa + length, self.gpa_base,
                                               self.gpa_base + self.size))
        self.mark_range_nogil(gpa, length)

    def count(self):
        """Pages marked by the VMM since the last harvest (KVM's part is unknown until then)."""
        cdef Py_ssize_t k
        cdef uint64_t n = 0
        with nogil:
            for k in range(self.nwords):
                n += popcount64(self.soft_bitmap[k])
        return n

    # ---- harvest -----------------------------------------------------------------------

    def harvest(self):
        """array('I') of the slot-relative pfns written since the last harvest, ascending.

        Fetches KVM's bitmap, re-protects what it reported (manual protect: one
        KVM_CLEAR_DIRTY_LOG over the words that had bits), merges and clears the software
        bitmap, and turns the bits into pfns a word at a time (count trailing zeros).
        Call it only while the vCPU is paused. Timings of the last call: last_get_us,
        last_clear_us, last_convert_us.
        """
        cdef kvm_dirty_log log
        cdef kvm_clear_dirty_log clr
        cdef Py_ssize_t k, first = -1, last = -1
        cdef Py_ssize_t nwords = self.nwords
        cdef uint64_t *kb = self.kvm_bitmap
        cdef uint64_t *sb = self.soft_bitmap
        cdef uint64_t w, count = 0, end_page
        cdef int r = 0, e = 0
        cdef bint clearing = False
        cdef double t0, t1, t2
        memset(&log, 0, sizeof(log))
        log.slot = self.slot
        log.dirty_bitmap = kb
        with nogil:
            t0 = _now_us()
            r = ioctl(self.vm_fd, KVM_GET_DIRTY_LOG, &log)
            e = errno
            t1 = _now_us()
            if r == 0 and self.manual_protect:
                for k in range(nwords):
                    if kb[k]:
                        if first < 0:
                            first = k
                        last = k
                if first >= 0:
                    # first_page must be 64-aligned; num_pages a multiple of 64 unless
                    # the range ends at the end of the slot.
                    end_page = <uint64_t>(last + 1) * 64
                    if end_page > self.npages:
                        end_page = self.npages
                    memset(&clr, 0, sizeof(clr))
                    clr.slot = self.slot
                    clr.first_page = <uint64_t>first * 64
                    clr.num_pages = <uint32_t>(end_page - clr.first_page)
                    clr.dirty_bitmap = kb + first
                    clearing = True
                    r = ioctl(self.vm_fd, KVM_CLEAR_DIRTY_LOG, &clr)
                    e = errno
        if r < 0:
            what = "KVM_CLEAR_DIRTY_LOG" if clearing else "KVM_GET_DIRTY_LOG"
            hint = ""
            if e == 2:    # ENOENT
                hint = " (is KVM_MEM_LOG_DIRTY_PAGES set on the memslot?)"
            raise OSError(e, "%s on memslot %d failed: %s%s"
                          % (what, self.slot, os.strerror(e), hint))
        with nogil:
            t2 = _now_us()
            for k in range(nwords):
                if sb[k]:
                    kb[k] |= cc_atomic_xchg(&sb[k], 0)
                count += popcount64(kb[k])
        cdef array.array out = array.clone(array.array('I'), count, zero=False)
        cdef uint32_t *pfns = <uint32_t *>out.data.as_voidptr
        cdef uint64_t base
        cdef Py_ssize_t j = 0
        with nogil:
            for k in range(nwords):
                w = kb[k]
                if w:
                    base = <uint64_t>k * 64
                    while w:
                        pfns[j] = <uint32_t>(base + ctz64(w))
                        j += 1
                        w &= w - 1
            self.last_convert_us = _now_us() - t2
        self.last_get_us = t1 - t0
        self.last_clear_us = t2 - t1
        self.last_count = count
        return out
