# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The RAM half of a checkpoint pause: which dirty pages stay writable, which are copied
while the vCPU is stopped, which are write-protected and copied after it resumes, and
which were copied before the pause.

Four kinds of dirty page, decided at every pause (`pause_begin_nogil`/`pause_end_nogil`,
called on the vCPU thread right after KVM_RUN returned, or on the migration thread while
the vCPU is parked):

- **hot**: dirty in this checkpoint and the one before. Its bit in KVM's dirty log is
  never cleared (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: only KVM_CLEAR_DIRTY_LOG
  write-protects a page again), so the guest writes it at full speed, no fault per
  checkpoint, and KVM reports it dirty at every pause: it is copied in every pause.
  After the pause, `compare_hot` compares each hot page with its copy of the previous
  checkpoint (what the secondary holds now, exactly): an unchanged page is not sent, and
  one unchanged for `quiet_max` checkpoints in a row has cooled down: it leaves the set
  at the next pause (its dirty bit is cleared then). At most `hot_max` pages are hot.
- **pause**: copied during the pause and its dirty bit cleared before the vCPU resumes
  (every dirty page when copy-on-write is off: the engine's old behaviour).
- **cow** (copy-on-write): runs of at least `min_run` consecutive dirty pages that are not
  hot are write-protected with userfaultfd (UFFDIO_WRITEPROTECT) during the pause, and
  copied after the vCPU resumed by the copier thread, at memory speed, in batches: copy,
  clear the batch's dirty bits, un-protect. A write to such a page before the copier
  reached it (the guest, through KVM; or the VMM's own device emulation on the vCPU
  thread) blocks in the kernel until the fault-handler thread has copied that page and
  un-protected it. Both threads are plain pthreads that never touch Python: the vCPU
  thread may fault while it holds the GIL. Only long runs: a protect costs ~2.5 us per
  call + ~0.28 us per page here, against ~0.5-1 us to copy a cold page, but a write
  that finds its page protected costs the guest a round trip through the handler
  (~70-150 us on kvm_pvm); a long run of cold pages was written by something that has
  moved on (a log, a bulk load), a short one may be written again at once.
- **pre**: copied by `precopy()` between checkpoints, while the guest runs, and not
  written since (a page written again is copied anew at the pause, into its slot).

Orderings (each one is what keeps a write from being lost or a copy from being late):
1. A cow page's dirty bit is cleared after it was copied and *before* it is un-protected.
   A write can only happen after the un-protect, so it sets the bit again after the
   clear and shows up in the next checkpoint. (Clearing after the un-protect would
   erase a write made in between.) Hence the slot states PENDING -> COPYING -> CLEARED,
   and nobody un-protects a page that is not CLEARED. The fault handler does not clear
   at all: its page is being written, so leaving the bit set is exact, and cheaper.
2. Pause and hot pages: a hot page is copied in the pause and never cleared; a hot page
   that leaves the set is cleared in the pause that copies it for the last time (or made
   a cow page, whose clear follows rule 1).
3. The write-protection of a cow page is set in the pause, before the vCPU resumes, and
   after the page's slot, kind and state are published: the handler can be asked about
   it from the first write on.
4. The handler looks pages up under `fault_mu`, and the pause rewrites the lists under
   it: a fault message read late (the copier already woke the writer) is then answered
   against the lists of one checkpoint, never half of two.
5. The next pause waits for the copier of the previous one (normally done long before:
   the send waits for it), so a checkpoint's copies never mix with the next one's. The
   copier thread also helps copy inside the pause; the pause waits for its last chunk
   before the guest runs (a hot page copied after that would be a later state).
6. Copies use non-temporal stores: a store fence ends every batch before its pages are
   published (CLEARED, done).
7. Closing: wait for the copier, stop the handler, un-protect the whole of guest RAM,
   unregister. Pages protected but never copied keep their dirty bit: they are reported
   again, nothing is lost.
8. A pre-copy is the other way round from rule 1 (the page is writable): clear first,
   copy second. A write before the clear is in the copy; one after it sets the bit again
   and the pause copies the page anew. The VMM's marks are taken before the copy too:
   device emulation writes guest RAM first and marks it after.

Without MANUAL_DIRTY_LOG_PROTECT2 KVM_GET_DIRTY_LOG clears and re-protects every page
itself: nothing can stay hot and the copier has nothing to clear.
"""
from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcmp, memcpy
from posix.ioctl cimport ioctl
from posix.unistd cimport close, read
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC, O_NONBLOCK
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython cimport array

from colocore_ext.dirtylog cimport DirtyLog
from colocore_ext.includes.kvm cimport (kvm_dirty_log, kvm_clear_dirty_log, KVM_GET_DIRTY_LOG,
                                    KVM_CLEAR_DIRTY_LOG)
from colocore_ext.includes.bits cimport ctz64, popcount64, PAGE_SHIFT, PAGE_SIZE
from colocore_ext.pages cimport copy_page_is_zero
from colocore_ext.includes.pthread cimport (pthread_create, pthread_join, pthread_mutex_init,
                                         pthread_mutex_destroy, pthread_mutex_lock,
                                         pthread_mutex_unlock, pthread_cond_init,
                                         pthread_cond_destroy, pthread_cond_wait,
                                         pthread_cond_broadcast, pthread_cond_signal,
                                         sigset_t, sigfillset, pthread_sigmask, SIG_BLOCK)
from colocore_ext.includes.uffd cimport *

import array
import os

cdef extern from *:
    """
    #include <emmintrin.h>
    #include <poll.h>
    #include <sys/eventfd.h>
    #define cc_load8(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define cc_store8(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define cc_xchg64(p, v) __atomic_exchange_n((p), (v), __ATOMIC_ACQ_REL)
    #define cc_add64(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
    #define cc_claim(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)
    #define cc_take(p, keep) __atomic_fetch_and((p), (keep), __ATOMIC_ACQ_REL) & ~(keep)
    #define cc_or64(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)
    #define cc_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
    static inline int cc_cas8(unsigned char *p, unsigned char expect, unsigned char want) {
        return __atomic_compare_exchange_n(p, &expect, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    #define cc_sfence() _mm_sfence()
    """
    uint8_t cc_load8(uint8_t *p) noexcept nogil
    void cc_store8(uint8_t *p, uint8_t v) noexcept nogil
    uint64_t cc_xchg64(uint64_t *p, uint64_t v) noexcept nogil
    uint64_t cc_add64(uint64_t *p, uint64_t v) noexcept nogil
    Py_ssize_t cc_claim(Py_ssize_t *p, Py_ssize_t v) noexcept nogil
    uint64_t cc_take(uint64_t *p, uint64_t keep) noexcept nogil
    uint64_t cc_or64(uint64_t *p, uint64_t v) noexcept nogil
    void cc_prefetch(const void *p) noexcept nogil
    bint cc_cas8(uint8_t *p, uint8_t expect, uint8_t want) noexcept nogil
    void cc_sfence() noexcept nogil
    int clz64 "__builtin_clzll" (unsigned long long x) noexcept nogil
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout) noexcept nogil
    short POLLIN
    int eventfd(unsigned int initval, int flags) noexcept nogil
    int EFD_CLOEXEC
    int EFD_NONBLOCK
    ssize_t write(int fd, const void *buf, size_t n) noexcept nogil

cdef extern from "<sys/mman.h>" nogil:
    int MAP_NORESERVE

cdef extern from "<sched.h>" nogil:
    struct sched_param:
        int sched_priority
    int sched_setscheduler(int pid, int policy, const sched_param *param)
    int SCHED_BATCH

cdef enum:
    KIND_HOT = 1
    KIND_PAUSE = 2
    KIND_COW = 3
    KIND_PRE = 4                # pre-copied before the pause and not written since
    ST_PENDING = 0
    ST_COPYING = 1
    ST_CLEARED = 2              # copied, and un-protecting it loses no write (rule 1)
    # pages per KVM_CLEAR_DIRTY_LOG + un-protect in the copier (KVM_CLEAR_DIRTY_LOG flushes
    # the VM's TLBs at every call): fewer calls, against how long a writer may wait for
    # a page the copier holds (one batch: ~0.3-0.5 ms)
    COPIER_BATCH = 512
    PAUSE_CHUNK = 8             # pages per claim when two threads copy inside the pause
    MAX_MSGS = 32
    SEND_BATCH = 1024           # pages per RAM section (memory.BATCH_PAGES)

cdef uint32_t NO_SLOT = 0xFFFFFFFF

KINDS = {KIND_HOT: "hot", KIND_PAUSE: "pause", KIND_COW: "cow", KIND_PRE: "pre"}


cdef inline double _now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3


cdef inline int _wp(shared_t *s, uint64_t pfn, uint64_t npages, bint protect) noexcept nogil:
    """Write-protect (or un-protect and wake the writers of) pages [pfn, pfn + npages)."""
    cdef uffdio_writeprotect wp
    cdef int r, tries = 0
    while True:
        wp.range.start = s.ram_addr + (pfn << PAGE_SHIFT)
        wp.range.len = npages << PAGE_SHIFT
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        r = ioctl(s.uffd, UFFDIO_WRITEPROTECT, &wp)
        # EAGAIN: the mm is changing under us (mremap, fork events): try again
        if r == 0 or errno != EAGAIN or tries > 100:
            return r
        tries += 1


cdef inline void _unprotect(shared_t *s, uint64_t pfn, uint64_t npages) noexcept nogil:
    if _wp(s, pfn, npages, False) < 0 and s.unprotect_errno == 0:
        s.unprotect_errno = errno


cdef int _clear_span(shared_t *s, uint64_t *bits, Py_ssize_t first_w, Py_ssize_t last_w) noexcept nogil:
    """KVM_CLEAR_DIRTY_LOG of the bits set in words first_w..last_w of `bits`."""
    cdef kvm_clear_dirty_log clr
    cdef uint64_t end_page = <uint64_t>(last_w + 1) * 64
    if end_page > s.npages:
        end_page = s.npages
    memset(&clr, 0, sizeof(clr))
    clr.slot = s.slot
    clr.first_page = <uint64_t>first_w * 64
    clr.num_pages = <uint32_t>(end_page - clr.first_page)
    clr.dirty_bitmap = bits + first_w
    return ioctl(s.vm_fd, KVM_CLEAR_DIRTY_LOG, &clr)


cdef void _block_signals() noexcept nogil:
    # process-directed signals (SIGINT, SIGTERM, ...) go to Python's threads, not these
    cdef sigset_t all_signals
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)


# ---- the copier thread ---------------------------------------------------------------

cdef void _copier_flush(shared_t *s, Py_ssize_t nb, Py_ssize_t first_w, Py_ssize_t last_w) noexcept nogil:
    cdef int c = s.cur
    cdef uint32_t *pfns = s.pfns[c]
    cdef uint32_t *batch = s.batch
    cdef Py_ssize_t i, j
    cc_sfence()                       # the copies are in memory before anyone is told
    if s.manual:
        # rule 1: clear after the copy, before the un-protect; a failure leaves the bits
        # set: the pages are reported dirty again, which loses nothing
        if _clear_span(s, s.copier_bits, first_w, last_w) < 0 and s.copy_errno == 0:
            s.copy_errno = errno
    memset(s.copier_bits + first_w, 0, (last_w - first_w + 1) * sizeof(uint64_t))
    for i in range(nb):
        cc_store8(&s.state[batch[i]], ST_CLEARED)
    i = 0
    while i < nb:
        j = i
        while j + 1 < nb and pfns[batch[j + 1]] == pfns[batch[j]] + 1:
            j += 1
        _unprotect(s, pfns[batch[i]], j - i + 1)
        i = j + 1
    s.copier_pages += nb


cdef inline void _copy_slot(shared_t *s, int c, uint32_t k, uint32_t next_k) noexcept nogil:
    """Copy the page of slot k of list c to its staging slot (and note whether it was
    zero); start fetching the page of next_k, which is usually far away (cold)."""
    cdef const uint8_t *nxt = s.ram + (<size_t>s.pfns[c][next_k] << PAGE_SHIFT)
    cc_prefetch(nxt)
    cc_prefetch(nxt + 64)
    cc_prefetch(nxt + 128)
    cc_prefetch(nxt + 192)
    s.zero[c][k] = copy_page_is_zero(s.staging[c] + (<size_t>k << PAGE_SHIFT),
                                     s.ram + (<size_t>s.pfns[c][k] << PAGE_SHIFT))


cdef void _copy_pause_chunks(shared_t *s) noexcept nogil:
    """Claim and copy chunks of the pause's copy list until none is left (run by the
    vCPU thread and, when it is scheduled in time, by the copier thread: twice the
    memory bandwidth while the guest waits)."""
    cdef int c = s.cur
    cdef Py_ssize_t n = s.npcopy, i, j, end
    cdef uint32_t *lst = s.pcopy
    while True:
        i = cc_claim(&s.pnext, PAUSE_CHUNK)
        if i >= n:
            break
        end = i + PAUSE_CHUNK if i + PAUSE_CHUNK < n else n
        for j in range(i, end):
            _copy_slot(s, c, lst[j], lst[j + 1] if j + 1 < n else lst[j])
    cc_sfence()                      # rule 6: this thread's copies are in memory


cdef void _copy_cow_pages(shared_t *s) noexcept nogil:
    cdef int c = s.cur
    cdef Py_ssize_t n = s.ncow
    cdef uint32_t *lst = s.cow_list
    cdef uint32_t *pfns = s.pfns[c]
    cdef Py_ssize_t i, nb = 0, first_w = -1, last_w = -1, w
    cdef uint32_t k, pfn
    cdef double t0 = _now_us()
    for i in range(n):
        k = lst[i]
        if not cc_cas8(&s.state[k], ST_PENDING, ST_COPYING):
            continue                  # the fault handler copied it first
        _copy_slot(s, c, k, lst[i + 1] if i + 1 < n else k)
        s.batch[nb] = k
        nb += 1
        pfn = pfns[k]
        w = pfn >> 6
        s.copier_bits[w] |= (<uint64_t>1) << (pfn & 63)
        if first_w < 0:
            first_w = w
        last_w = w
        if nb == COPIER_BATCH:
            _copier_flush(s, nb, first_w, last_w)
            nb = 0
            first_w = -1
    if nb:
        _copier_flush(s, nb, first_w, last_w)
    s.copier_us = _now_us() - t0


cdef void *_copier_main(void *arg) noexcept nogil:
    cdef shared_t *s = <shared_t *>arg
    cdef sched_param prio
    _block_signals()
    # SCHED_BATCH: woken, this thread never preempts the one that woke it (the vCPU
    # thread in the pause, or the guest after it): it helps only on a core that is free,
    # so on a busy machine the pause is never longer than copying alone.
    prio.sched_priority = 0
    sched_setscheduler(0, SCHED_BATCH, &prio)
    while True:
        pthread_mutex_lock(&s.mu)
        while not s.pause_work and (not s.work or s.hold) and not s.stopping:
            pthread_cond_wait(&s.work_cv, &s.mu)
        if s.stopping:
            pthread_mutex_unlock(&s.mu)
            return NULL
        if s.pause_work:
            s.pause_work = 0          # taken: the pause now waits for this thread's chunk
            pthread_mutex_unlock(&s.mu)
            _copy_pause_chunks(s)
            pthread_mutex_lock(&s.mu)
            s.helping = 0
            pthread_cond_broadcast(&s.done_cv)
            pthread_mutex_unlock(&s.mu)
            continue
        s.work = 0
        pthread_mutex_unlock(&s.mu)
        _copy_cow_pages(s)
        pthread_mutex_lock(&s.mu)
        s.busy = 0
        pthread_cond_broadcast(&s.done_cv)
        pthread_mutex_unlock(&s.mu)


# ---- the fault-handler thread ----------------------------------------------------------

cdef void _handle_fault(shared_t *s, const uffd_msg *m) noexcept nogil:
    cdef uint64_t addr, pfn
    cdef int c
    cdef uint32_t k
    cdef double t0
    if m.event != UFFD_EVENT_PAGEFAULT:
        return
    addr = cc_uffd_fault_address(m)
    if addr < s.ram_addr:
        return
    pfn = (addr - s.ram_addr) >> PAGE_SHIFT
    if pfn >= s.npages:
        return
    cc_add64(&s.faults, 1)
    c = s.cur
    k = s.slot_of[c][pfn]
    if k == NO_SLOT or s.kind[c][k] != KIND_COW:
        # not protected by this checkpoint: a message read after the copier had already
        # woken its writer. Waking again is harmless.
        _unprotect(s, pfn, 1)
        return
    if cc_cas8(&s.state[k], ST_PENDING, ST_COPYING):
        s.zero[c][k] = copy_page_is_zero(s.staging[c] + (<size_t>k << PAGE_SHIFT),
                                         s.ram + (<size_t>pfn << PAGE_SHIFT))
        cc_sfence()
        # Its dirty bit is left set, not cleared (rule 1's other way out): this page is
        # being written right now, so the next checkpoint must carry it anyway, and a
        # KVM_CLEAR_DIRTY_LOG here would cost tens of microseconds per fault (it flushes
        # the TLBs of the VM).
        cc_store8(&s.state[k], ST_CLEARED)
        t0 = _now_us()
        _unprotect(s, pfn, 1)
        s.unprotect_us += _now_us() - t0
        cc_add64(&s.fault_copies, 1)
    elif cc_load8(&s.state[k]) == ST_CLEARED:
        _unprotect(s, pfn, 1)
    # else: the copier holds the page; its batch un-protect wakes this writer (rule 1)


cdef void *_handler_main(void *arg) noexcept nogil:
    cdef shared_t *s = <shared_t *>arg
    cdef pollfd fds[2]
    cdef uffd_msg msgs[MAX_MSGS]
    cdef ssize_t got
    cdef Py_ssize_t i
    cdef double t0
    _block_signals()
    fds[0].fd = s.uffd
    fds[0].events = POLLIN
    fds[1].fd = s.stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return NULL
        if fds[1].revents:
            return NULL
        got = read(s.uffd, msgs, sizeof(msgs))
        if got <= 0:
            continue                  # EAGAIN: another reader, or a spurious wake-up
        t0 = _now_us()
        pthread_mutex_lock(&s.fault_mu)       # rule 4
        for i in range(got // <ssize_t>sizeof(uffd_msg)):
            _handle_fault(s, &msgs[i])
        pthread_mutex_unlock(&s.fault_mu)
        s.handler_us += _now_us() - t0


# ---- userfaultfd set-up ------------------------------------------------------------------

cdef int _open_uffd(int *err, int *dev_err) noexcept nogil:
    # Kernel-mode faults must be trapped too (KVM writes guest RAM through get_user_pages),
    # so UFFD_USER_MODE_ONLY is not an option: that needs root, CAP_SYS_PTRACE,
    # vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd.
    cdef int fd = cc_userfaultfd(O_CLOEXEC | O_NONBLOCK)
    cdef int dev
    if fd >= 0:
        return fd
    err[0] = errno
    dev = c_open(b"/dev/userfaultfd", O_RDWR | O_CLOEXEC)
    if dev < 0:
        dev_err[0] = errno
        return -1
    fd = ioctl(dev, CC_USERFAULTFD_IOC_NEW, <unsigned long>(O_CLOEXEC | O_NONBLOCK))
    if fd < 0:
        dev_err[0] = errno
    close(dev)
    return fd


cdef str _open_error(int err, int dev_err):
    return ("userfaultfd() failed (%s) and so did /dev/userfaultfd (%s); it needs root with "
            "CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd"
            % (os.strerror(err), os.strerror(dev_err)))


def uffd_wp_support():
    """(available, features, reason): does this kernel offer userfaultfd write-protect
    to this process? Nothing is registered; `reason` says what is missing."""
    cdef int err = 0, dev_err = 0
    cdef uffdio_api api
    cdef int fd
    with nogil:
        fd = _open_uffd(&err, &dev_err)
    if fd < 0:
        return False, 0, _open_error(err, dev_err)
    memset(&api, 0, sizeof(api))
    api.api = UFFD_API
    if ioctl(fd, UFFDIO_API, &api) < 0:
        err = errno
        close(fd)
        return False, 0, "UFFDIO_API failed: %s" % os.strerror(err)
    close(fd)
    if not api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
        return False, api.features, ("the kernel's userfaultfd has no write-protect mode "
                                     "(UFFD_FEATURE_PAGEFAULT_FLAG_WP)")
    return True, api.features, ""


# ---- the capture -------------------------------------------------------------------------

cdef uint8_t *_map(size_t size) except NULL:
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p == MAP_FAILED:
        raise MemoryError("cannot map %d bytes of staging memory: %s" % (size, os.strerror(errno)))
    return <uint8_t *>p


cdef class Capture:
    """The pause's RAM capture for one guest RAM slot (see the module doc).

    Capture(log, cow=True, hot_max=16384, min_run=32, quiet_max=2)
    `log` is the slot's DirtyLog (its bitmaps are shared: nothing else may harvest the
    slot while a Capture is in use). `cow` asks for copy-on-write; `cow_ready` says
    whether this host gives it (userfaultfd write-protect), `cow_reason` why not.
    """

    def __cinit__(self):
        self.s = NULL
        self.threads_started = False
        self.handler_started = False

    def __init__(self, DirtyLog log not None, bint cow=True, Py_ssize_t hot_max=16384,
                 int min_run=32, int quiet_max=2):
        cdef shared_t *s
        cdef int p
        if min_run < 1 or quiet_max < 1 or hot_max < 0:
            raise ValueError("Capture: min_run and quiet_max must be >= 1, hot_max >= 0")
        self.log = log
        self.kb = log.kvm_bitmap
        self.sb = log.soft_bitmap
        self.cow = cow
        self.hot_max = hot_max
        self.min_run = min_run
        self.quiet_max = quiet_max
        self.precopy_min = 256
        self.cow_ready = False
        self.cow_reason = "copy-on-write was not asked for"
        s = <shared_t *>calloc(1, sizeof(shared_t))
        if s == NULL:
            raise MemoryError()
        self.s = s
        s.vm_fd = log.vm_fd
        s.slot = log.slot
        s.manual = log.manual_protect
        s.ram = <uint8_t *><size_t>log.host_addr
        s.ram_addr = log.host_addr
        s.npages = log.npages
        s.nwords = log.nwords
        s.uffd = -1
        s.stop_fd = -1
        s.cur = 1                     # the first pause fills parity 0
        pthread_mutex_init(&s.mu, NULL)
        pthread_cond_init(&s.work_cv, NULL)
        pthread_cond_init(&s.done_cv, NULL)
        pthread_mutex_init(&s.fault_mu, NULL)
        for p in range(2):
            s.pfns[p] = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
            s.zero[p] = <uint8_t *>calloc(s.npages, 1)
            s.kind[p] = <uint8_t *>calloc(s.npages, 1)
            s.slot_of[p] = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
            if s.pfns[p] == NULL or s.zero[p] == NULL or s.kind[p] == NULL or s.slot_of[p] == NULL:
                raise MemoryError("Capture: cannot allocate page lists for %d pages" % s.npages)
            memset(s.slot_of[p], 0xFF, s.npages * sizeof(uint32_t))
            s.staging[p] = _map(s.npages << PAGE_SHIFT)
        s.state = <uint8_t *>calloc(s.npages, 1)
        s.copier_bits = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        s.batch = <uint32_t *>calloc(COPIER_BATCH, sizeof(uint32_t))
        s.cow_list = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
        s.pcopy = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
        self.pre_bits = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        self.hot = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        self.prev_dirty = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        self.demote = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        self.clear_bits = <uint64_t *>calloc(s.nwords, sizeof(uint64_t))
        self.quiet = <uint8_t *>calloc(s.npages, 1)
        self.skip = <uint8_t *>calloc(s.npages, 1)
        self.send_pfns = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
        self.send_slots = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
        self.zero_pfns = <uint32_t *>calloc(s.npages, sizeof(uint32_t))
        self.scratch = _map(SEND_BATCH << PAGE_SHIFT)
        if (s.state == NULL or s.copier_bits == NULL or s.batch == NULL or self.hot == NULL
                or s.cow_list == NULL or s.pcopy == NULL or self.pre_bits == NULL
                or self.prev_dirty == NULL or self.demote == NULL or self.clear_bits == NULL
                or self.quiet == NULL or self.skip == NULL or self.send_pfns == NULL
                or self.send_slots == NULL or self.zero_pfns == NULL):
            raise MemoryError("Capture: cannot allocate bitmaps for %d pages" % s.npages)
        # the copier copies cow pages after the pause, and helps copy inside it
        if pthread_create(&self.copier_thread, NULL, _copier_main, s) != 0:
            raise OSError(errno, "Capture: cannot start the copier thread")
        self.threads_started = True
        if cow:
            self._setup_uffd()

    cdef _setup_uffd(self):
        cdef shared_t *s = self.s
        cdef int err = 0, dev_err = 0
        cdef uffdio_api api
        cdef uffdio_register reg
        ok, features, reason = uffd_wp_support()
        if not ok:
            self.cow_reason = reason
            return
        with nogil:
            s.uffd = _open_uffd(&err, &dev_err)
        if s.uffd < 0:
            self.cow_reason = _open_error(err, dev_err)
            return
        memset(&api, 0, sizeof(api))
        api.api = UFFD_API
        # WP_UNPOPULATED where offered: a page that is not present (never the case for a
        # page that was just written, but the kernel may reclaim) is protected too.
        api.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | (features & CC_UFFD_FEATURE_WP_UNPOPULATED)
        if ioctl(s.uffd, UFFDIO_API, &api) < 0:
            self.cow_reason = "UFFDIO_API with write-protect failed: %s" % os.strerror(errno)
            self._close_uffd()
            return
        self.uffd_features = api.features
        memset(&reg, 0, sizeof(reg))
        reg.range.start = s.ram_addr
        reg.range.len = s.npages << PAGE_SHIFT
        reg.mode = UFFDIO_REGISTER_MODE_WP
        if ioctl(s.uffd, UFFDIO_REGISTER, &reg) < 0:
            self.cow_reason = ("UFFDIO_REGISTER of guest RAM in write-protect mode failed: %s"
                               % os.strerror(errno))
            self._close_uffd()
            return
        if not (reg.ioctls >> _UFFDIO_WRITEPROTECT) & 1:
            self.cow_reason = "the kernel offers no UFFDIO_WRITEPROTECT for anonymous guest RAM"
            self._unregister()
            self._close_uffd()
            return
        s.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if s.stop_fd < 0:
            self.cow_reason = "eventfd: %s" % os.strerror(errno)
            self._unregister()
            self._close_uffd()
            return
        if pthread_create(&self.handler_thread, NULL, _handler_main, s) != 0:
            self.cow_reason = "cannot start the fault-handler thread"
            self._unregister()
            self._close_uffd()
            return
        self.handler_started = True
        self.cow_ready = True
        self.cow_reason = ""

    cdef _unregister(self):
        cdef uffdio_range rng
        rng.start = self.s.ram_addr
        rng.len = self.s.npages << PAGE_SHIFT
        ioctl(self.s.uffd, UFFDIO_UNREGISTER, &rng)

    cdef _close_uffd(self):
        if self.s.uffd >= 0:
            close(self.s.uffd)
            self.s.uffd = -1
        if self.s.stop_fd >= 0:
            close(self.s.stop_fd)
            self.s.stop_fd = -1

    # ---- the pause -----------------------------------------------------------------------

    cdef int pause_nogil(self) noexcept nogil:
        """The RAM part of a pause in one go (begin + end). Only while the vCPU is
        stopped. 0, or -1 when KVM_GET_DIRTY_LOG failed (err_errno; nothing changed)."""
        if self.pause_begin_nogil() < 0:
            return -1
        self.pause_end_nogil()
        return 0

    cdef void _open_next(self) noexcept nogil:
        """Start the next checkpoint's lists: forget the ones of two checkpoints ago."""
        cdef shared_t *s = self.s
        cdef int nx = s.cur ^ 1
        cdef Py_ssize_t k
        if self.open_next:
            return
        for k in range(s.count[nx]):
            s.slot_of[nx][s.pfns[nx][k]] = NO_SLOT
        s.count[nx] = 0
        self.open_next = True

    cdef int pause_begin_nogil(self) noexcept nogil:
        """Everything of the pause but the copying: read the dirty log, decide what is
        hot, build the lists, write-protect the cow runs, re-arm the dirty log of the
        pages to be copied, hand half of the copying to the copier thread. The vCPU
        state can be read while that thread copies; pause_end_nogil() finishes."""
        cdef shared_t *s = self.s
        cdef uint64_t *kb = self.kb
        cdef uint64_t *sb = self.sb
        cdef Py_ssize_t nwords = s.nwords
        cdef Py_ssize_t w, k, n, i, run, first_w, last_w, nc, npc
        cdef uint64_t d, h, p, bits, room, total, b
        cdef int nx
        cdef uint32_t pfn, slot, run_start
        cdef uint32_t *pfns
        cdef uint32_t *slot_of
        cdef uint8_t *kind
        cdef bint hot_on = s.manual and self.hot_max > 0
        cdef bint cow_on = self.cow and self.cow_ready
        cdef Py_ssize_t nhot = 0, ncow = 0, npause = 0, nruns = 0, promoted = 0, demoted = 0
        cdef kvm_dirty_log get
        cdef double t0, t1, t2, t3
        t0 = _now_us()
        self.t_begin = t0
        # rule 5: the copier of the previous checkpoint is done
        pthread_mutex_lock(&s.mu)
        while s.busy:
            pthread_cond_wait(&s.done_cv, &s.mu)
        pthread_mutex_unlock(&s.mu)
        memset(&get, 0, sizeof(get))
        get.slot = s.slot
        get.dirty_bitmap = kb
        if ioctl(s.vm_fd, KVM_GET_DIRTY_LOG, &get) < 0:
            self.err_errno = errno
            return -1
        t1 = _now_us()
        # -- merge the VMM's writes, then decide what is hot --------------------------
        total = 0
        for w in range(nwords):
            if sb[w]:
                kb[w] |= cc_xchg64(&sb[w], 0)
            d = kb[w]
            h = self.hot[w]
            if h:
                demoted += popcount64(h & self.demote[w])
                # A hot page is never cleared, so it is dirty here; one that is not was
                # cleared by someone else (a plain harvest): it simply leaves the set.
                h &= d & ~self.demote[w]
                self.hot[w] = h
                total += popcount64(h)
        if not hot_on and total:
            for w in range(nwords):
                self.hot[w] = 0
            total = 0
        if total > <uint64_t>self.hot_max:
            # the bound was lowered: the pages at the top of RAM leave first
            w = nwords - 1
            while total > <uint64_t>self.hot_max and w >= 0:
                while self.hot[w] and total > <uint64_t>self.hot_max:
                    self.hot[w] &= ~((<uint64_t>1) << (63 - clz64(self.hot[w])))
                    total -= 1
                    demoted += 1
                w -= 1
        room = self.hot_max - total if hot_on else 0
        for w in range(nwords):
            d = kb[w]
            if room:
                # dirty in this checkpoint and the one before; a page leaving the set in
                # this pause stays out
                p = d & self.prev_dirty[w] & ~self.hot[w] & ~self.demote[w]
                while p and room:
                    b = p & (0 - p)
                    self.hot[w] |= b
                    p ^= b
                    room -= 1
                    promoted += 1
            # "dirty in this checkpoint" includes what a pre-copy took before the pause
            self.prev_dirty[w] = d | self.pre_bits[w]
            self.pre_bits[w] = 0
            self.demote[w] = 0
        # -- the new lists (rule 4: the handler waits while they change) ----------------
        pthread_mutex_lock(&s.fault_mu)
        self._open_next()
        nx = s.cur ^ 1
        pfns = s.pfns[nx]
        slot_of = s.slot_of[nx]
        kind = s.kind[nx]
        n = s.count[nx]                 # pages pre-copied since the last pause come first
        for w in range(nwords):
            bits = kb[w]
            h = self.hot[w]
            while bits:
                b = ctz64(bits)
                bits &= bits - 1
                pfn = <uint32_t>(w * 64 + b)
                slot = slot_of[pfn]
                if slot == NO_SLOT:     # else a pre-copied page written again: copy anew
                    slot = <uint32_t>n
                    pfns[n] = pfn
                    slot_of[pfn] = slot
                    n += 1
                if (h >> b) & 1:
                    kind[slot] = KIND_HOT
                    nhot += 1
                else:
                    kind[slot] = KIND_PAUSE
        s.count[nx] = n
        # The handler answers from these lists from now on; it is locked out until the
        # write-protections below are in place (rule 3).
        s.cur = nx
        t2 = _now_us()
        self._nc = 0
        self._npc = 0
        self._fw = -1
        self._lw = -1
        self._ncow = 0
        self._nruns = 0
        self._npause = 0
        run = 0
        run_start = 0
        for w in range(nwords):
            bits = kb[w]
            h = self.hot[w]
            while bits:
                b = ctz64(bits)
                bits &= bits - 1
                pfn = <uint32_t>(w * 64 + b)
                if (h >> b) & 1:
                    self._run(run_start, run, cow_on)
                    run = 0
                    s.pcopy[self._npc] = slot_of[pfn]
                    self._npc += 1
                elif run and pfn == run_start + run:
                    run += 1
                else:
                    self._run(run_start, run, cow_on)
                    run_start = pfn
                    run = 1
        self._run(run_start, run, cow_on)
        s.ncow = self._nc
        s.npcopy = self._npc
        s.pnext = 0
        pthread_mutex_unlock(&s.fault_mu)
        t3 = _now_us()
        if self._npc > PAUSE_CHUNK and self.threads_started:
            # the copier thread copies along while this thread reads the vCPU state
            pthread_mutex_lock(&s.mu)
            s.pause_work = 1
            s.helping = 1
            pthread_cond_signal(&s.work_cv)
            pthread_mutex_unlock(&s.mu)
        if self._nc:
            # busy now (rule 5); the copier starts on them once the guest runs
            pthread_mutex_lock(&s.mu)
            s.busy = 1
            pthread_mutex_unlock(&s.mu)
        # rule 2: re-arm dirty logging of the cold pages copied in this pause. The guest
        # is stopped, so before or after their copy is the same.
        if self._fw >= 0:
            # A failure leaves the bits set: the pages are reported (and copied) again
            # next time, nothing is lost; take_copy_error() reports it.
            if s.manual and _clear_span(s, self.clear_bits, self._fw, self._lw) < 0 \
                    and s.copy_errno == 0:
                s.copy_errno = errno
            memset(self.clear_bits + self._fw, 0, (self._lw - self._fw + 1) * sizeof(uint64_t))
        self.open_next = False
        self.seq += 1
        self.last_dirty = n
        self.last_hot = nhot
        self.last_cow = self._ncow
        self.last_in_pause = self._npause
        self.last_runs = self._nruns
        self.last_promoted = promoted
        self.last_demoted = demoted
        self.last_precopied = self.interval_precopied
        self.interval_precopied = 0
        self.faults_at_pause = s.faults
        self.last_get_us = t1 - t0
        self.last_classify_us = t2 - t1
        self.last_wp_us = t3 - t2
        self.last_clear_us = _now_us() - t3
        return 0

    cdef void _run(self, uint32_t start, Py_ssize_t length, bint cow_on) noexcept nogil:
        """A run of consecutive cold dirty pages: write-protect it for the copier, or
        copy it in the pause (short, or write-protect refused)."""
        cdef shared_t *s = self.s
        cdef uint32_t *slot_of = s.slot_of[s.cur]
        cdef Py_ssize_t i
        cdef uint32_t k, pfn
        cdef Py_ssize_t w
        if length == 0:
            return
        if cow_on and length >= self.min_run:
            for i in range(length):
                k = slot_of[start + i]
                s.kind[s.cur][k] = KIND_COW
                s.state[k] = ST_PENDING
                s.cow_list[self._nc + i] = k
            if _wp(s, start, length, True) == 0:
                self._nc += length
                self._ncow += length
                self._nruns += 1
                return
            _wp(s, start, length, False)         # copy it now instead
        for i in range(length):
            pfn = start + <uint32_t>i
            k = slot_of[pfn]
            s.kind[s.cur][k] = KIND_PAUSE
            s.pcopy[self._npc] = k
            self._npc += 1
            w = pfn >> 6
            self.clear_bits[w] |= (<uint64_t>1) << (pfn & 63)
            if self._fw < 0:
                self._fw = w
            self._lw = w
        self._npause += length

    cdef void pause_end_nogil(self) noexcept nogil:
        """The copying of the pause: this thread and (if it came) the copier thread
        take chunks until none is left; returns when every page is in staging."""
        cdef shared_t *s = self.s
        cdef double t0 = _now_us()
        _copy_pause_chunks(s)
        pthread_mutex_lock(&s.mu)
        if s.pause_work:                 # the copier thread did not come in time
            s.pause_work = 0
            s.helping = 0
        while s.helping:                 # it holds one chunk at most
            pthread_cond_wait(&s.done_cv, &s.mu)
        pthread_mutex_unlock(&s.mu)
        self.last_end_us = _now_us() - t0
        self.last_copy_us = self.last_end_us
        self.last_pause_us = _now_us() - self.t_begin

    def precopy(self):
        """Between checkpoints, guest running: copy the cold dirty pages now (after
        re-arming their dirty log), so that the next pause only handles what is
        written after this. Acts when at least `precopy_min` pages wait. Returns the
        pages copied. Only after the last checkpoint was sent (plan_send)."""
        cdef shared_t *s = self.s
        cdef uint64_t *kb = self.kb
        cdef uint64_t *sb = self.sb
        cdef Py_ssize_t nwords = s.nwords, w, n, count = 0, first_w = -1, last_w = -1
        cdef uint64_t t, keep, cand, bits, b
        cdef int nx
        cdef uint32_t pfn, slot
        cdef kvm_dirty_log get
        cdef bint manual = s.manual
        cdef int r = 0, e = 0
        cdef double t0
        if self.s == NULL:
            raise ValueError("Capture: closed")
        if self.sent_seq != self.seq or s.busy:
            return 0                      # the last checkpoint is still being sent
        with nogil:
            t0 = _now_us()
            memset(&get, 0, sizeof(get))
            get.slot = s.slot
            get.dirty_bitmap = kb
            r = ioctl(s.vm_fd, KVM_GET_DIRTY_LOG, &get)
            e = errno
            if r == 0:
                for w in range(nwords):
                    count += popcount64((kb[w] | sb[w]) & ~self.hot[w])
        if r < 0:
            raise OSError(e, "KVM_GET_DIRTY_LOG on memslot %d failed in a pre-copy: %s"
                          % (s.slot, os.strerror(e)))
        if count < self.precopy_min:
            return 0
        with nogil:
            self._open_next()
            nx = s.cur ^ 1
            n = s.count[nx]
            for w in range(nwords):
                t = kb[w]
                if sb[w]:
                    # take the VMM's marks of cold pages only: a hot page's mark stays for
                    # the pause (hot pages are not pre-copied)
                    t |= cc_take(&sb[w], self.hot[w])
                cand = t & ~self.hot[w]
                self.clear_bits[w] = cand
                if cand:
                    if first_w < 0:
                        first_w = w
                    last_w = w
            # Re-arm first, copy second: a write after the clear shows up in the next
            # pause (which copies the page again); one before it is in this copy.
            if first_w >= 0 and manual:
                r = _clear_span(s, self.clear_bits, first_w, last_w)
                e = errno
            count = 0
            if r < 0:
                # nothing was copied: hand every taken page to the pause as dirty (the
                # VMM marks taken above would be lost otherwise)
                for w in range(first_w, last_w + 1):
                    if self.clear_bits[w]:
                        cc_or64(&sb[w], self.clear_bits[w])
                if s.copy_errno == 0:
                    s.copy_errno = e
            else:
                for w in range(first_w if first_w >= 0 else 0, last_w + 1):
                    bits = self.clear_bits[w]
                    while bits:
                        b = ctz64(bits)
                        bits &= bits - 1
                        pfn = <uint32_t>(w * 64 + b)
                        slot = s.slot_of[nx][pfn]
                        if slot == NO_SLOT:
                            slot = <uint32_t>n
                            s.pfns[nx][n] = pfn
                            s.slot_of[nx][pfn] = slot
                            n += 1
                        s.kind[nx][slot] = KIND_PRE
                        s.zero[nx][slot] = copy_page_is_zero(
                            s.staging[nx] + (<size_t>slot << PAGE_SHIFT),
                            s.ram + (<size_t>pfn << PAGE_SHIFT))
                        count += 1
                    self.pre_bits[w] |= self.clear_bits[w]
                cc_sfence()
                s.count[nx] = n
            if first_w >= 0:
                memset(self.clear_bits + first_w, 0, (last_w - first_w + 1) * sizeof(uint64_t))
            self.interval_precopied += count
            self.last_precopy_us = _now_us() - t0
        return count

    cdef void start_copier_nogil(self) noexcept nogil:
        """After the pause: let the copier copy the cow pages (no-op when there are none)."""
        cdef shared_t *s = self.s
        pthread_mutex_lock(&s.mu)
        if s.busy:
            s.work = 1
            pthread_cond_signal(&s.work_cv)
        pthread_mutex_unlock(&s.mu)

    def pause(self):
        """The RAM part of a pause on this thread (the vCPU must be parked); call
        start_copier() once the guest runs again."""
        cdef int r
        with nogil:
            r = self.pause_nogil()
        if r < 0:
            self.raise_error()

    def start_copier(self):
        with nogil:
            self.start_copier_nogil()

    def raise_error(self):
        """Raise the OSError of the last failed pause."""
        e = self.err_errno
        self.err_errno = 0
        raise OSError(e, "KVM_GET_DIRTY_LOG on memslot %d failed during the checkpoint "
                      "pause: %s" % (self.s.slot, os.strerror(e)))

    # ---- after the pause -----------------------------------------------------------------

    def wait_copied(self):
        """Block (without the GIL) until the copier has copied every cow page of the
        last pause. Raises OSError if an un-protect failed (the guest may be stuck)."""
        cdef shared_t *s = self.s
        with nogil:
            pthread_mutex_lock(&s.mu)
            while s.busy:
                pthread_cond_wait(&s.done_cv, &s.mu)
            pthread_mutex_unlock(&s.mu)
        self.last_faults = s.faults - self.faults_at_pause
        if s.unprotect_errno:
            e = s.unprotect_errno
            s.unprotect_errno = 0
            self._unprotect_all()
            raise OSError(e, "un-protecting copied guest pages failed: %s; every page was "
                             "un-protected again" % os.strerror(e))

    def take_copy_error(self):
        """errno of a KVM_CLEAR_DIRTY_LOG that failed after the pause (0: none). Such pages
        keep their dirty bit: they are sent again, nothing is lost."""
        e = self.s.copy_errno
        self.s.copy_errno = 0
        return e

    def compare_hot(self):
        """Mark the hot pages whose copy equals the previous checkpoint's: not sent.
        A page unchanged `quiet_max` times in a row leaves the hot set at the next pause.
        Call after wait_copied(). Returns the number of pages not to send."""
        cdef shared_t *s = self.s
        cdef int c = s.cur
        cdef int pc = c ^ 1
        cdef Py_ssize_t n = s.count[c], k, skipped = 0
        cdef uint32_t pfn, pk
        cdef bint have_prev = self.seq >= 2
        cdef uint8_t qmax = <uint8_t>min(self.quiet_max, 255)
        with nogil:
            for k in range(n):
                self.skip[k] = 0
                if s.kind[c][k] != KIND_HOT:
                    continue
                pfn = s.pfns[c][k]
                pk = s.slot_of[pc][pfn] if have_prev else NO_SLOT
                # The previous copy is exactly what the secondary holds: it was sent, or
                # it was equal to the one before it, which was (induction).
                if pk == NO_SLOT or memcmp(s.staging[c] + (<size_t>k << PAGE_SHIFT),
                                           s.staging[pc] + (<size_t>pk << PAGE_SHIFT), PAGE_SIZE):
                    self.quiet[pfn] = 0
                    continue
                self.skip[k] = 1
                skipped += 1
                if self.quiet[pfn] < 255:
                    self.quiet[pfn] += 1
                if self.quiet[pfn] >= qmax:
                    self.quiet[pfn] = 0
                    self.demote[pfn >> 6] |= (<uint64_t>1) << (pfn & 63)
        self.last_skipped = skipped
        return skipped

    def plan_send(self):
        """(non-zero pfns, zero pfns) to send for the last pause, list order, skipped
        hot pages left out. Page i of the first list is `batch(i, ...)`'s page."""
        cdef shared_t *s = self.s
        cdef int c = s.cur
        cdef Py_ssize_t n = s.count[c], k, nn = 0, nz = 0
        with nogil:
            for k in range(n):
                if self.skip[k]:
                    continue
                if s.zero[c][k]:
                    self.zero_pfns[nz] = s.pfns[c][k]
                    nz += 1
                else:
                    self.send_pfns[nn] = s.pfns[c][k]
                    self.send_slots[nn] = <uint32_t>k
                    nn += 1
        self.n_send = nn
        self.n_zero = nz
        self.sent_seq = self.seq          # pre-copies for the next pause may begin
        cdef array.array out = array.clone(array.array('I'), nn, zero=False)
        cdef array.array zout = array.clone(array.array('I'), nz, zero=False)
        if nn:
            memcpy(out.data.as_voidptr, self.send_pfns, nn * sizeof(uint32_t))
        if nz:
            memcpy(zout.data.as_voidptr, self.zero_pfns, nz * sizeof(uint32_t))
        return out, zout

    def batch(self, Py_ssize_t start, Py_ssize_t count):
        """The bytes of non-zero pages start..start+count of plan_send()'s list, as one
        contiguous buffer: the staging memory itself when their slots are consecutive,
        else a copy packed into a scratch buffer (valid until the next call)."""
        cdef shared_t *s = self.s
        cdef int c = s.cur
        cdef Py_ssize_t i
        cdef uint8_t *base
        if start < 0 or count < 0 or start + count > self.n_send or count > SEND_BATCH:
            raise IndexError("batch %d+%d outside the %d pages to send (at most %d at once)"
                             % (start, count, self.n_send, SEND_BATCH))
        if count == 0:
            return memoryview(b"")
        if self.send_slots[start + count - 1] - self.send_slots[start] == count - 1:
            base = s.staging[c] + (<size_t>self.send_slots[start] << PAGE_SHIFT)
        else:
            with nogil:
                for i in range(count):
                    memcpy(self.scratch + (i << PAGE_SHIFT),
                           s.staging[c] + (<size_t>self.send_slots[start + i] << PAGE_SHIFT),
                           PAGE_SIZE)
            base = self.scratch
        return memoryview(<uint8_t[:count << PAGE_SHIFT]>base)

    def pfns(self):
        """array('I') of the last pause's dirty pages."""
        cdef shared_t *s = self.s
        cdef Py_ssize_t n = s.count[s.cur]
        cdef array.array out = array.clone(array.array('I'), n, zero=False)
        if n:
            memcpy(out.data.as_voidptr, s.pfns[s.cur], n * sizeof(uint32_t))
        return out

    def kinds(self):
        """bytes: the kind of each page of pfns() (see KINDS)."""
        cdef shared_t *s = self.s
        return (<char *>s.kind[s.cur])[:s.count[s.cur]]

    def page(self, Py_ssize_t k):
        """A copy of the staged page of slot k of the last pause (tests, debugging)."""
        cdef shared_t *s = self.s
        if not 0 <= k < s.count[s.cur]:
            raise IndexError("slot %d outside the last pause's %d pages" % (k, s.count[s.cur]))
        return (<char *>(s.staging[s.cur] + (<size_t>k << PAGE_SHIFT)))[:PAGE_SIZE]

    def hot_pages(self):
        """How many pages are hot now."""
        cdef Py_ssize_t w, n = 0
        for w in range(self.s.nwords):
            n += popcount64(self.hot[w])
        return n

    def reserve(self, Py_ssize_t npages):
        """Off the pause path: touch the first `npages` pages of both staging buffers, so
        that a pause that copies as many takes no page fault on them."""
        cdef Py_ssize_t p, k
        cdef shared_t *s = self.s
        if npages > <Py_ssize_t>s.npages:
            npages = s.npages
        with nogil:
            for p in range(2):
                k = self.touched[p]
                while k < npages:
                    s.staging[p][k << PAGE_SHIFT] = 0
                    k += 1
                if npages > self.touched[p]:
                    self.touched[p] = npages

    def time_write_protect(self, uint64_t first, uint64_t npages):
        """Profiling: write-protect pages [first, first + npages) and un-protect them
        again; returns the two times in microseconds. Only while nothing writes them
        and no copy-on-write is under way (the guest stopped, the copier idle)."""
        cdef shared_t *s = self.s
        cdef double t0, t1, t2
        cdef int r1, r2
        if not self.cow_ready:
            raise ValueError("time_write_protect: no userfaultfd here (%s)" % self.cow_reason)
        if s.busy or first + npages > s.npages or npages == 0:
            raise ValueError("time_write_protect: copier busy or pages %d+%d outside the slot"
                             % (first, npages))
        with nogil:
            t0 = _now_us()
            r1 = _wp(s, first, npages, True)
            t1 = _now_us()
            r2 = _wp(s, first, npages, False)
            t2 = _now_us()
        if r1 < 0 or r2 < 0:
            raise OSError(errno, "UFFDIO_WRITEPROTECT failed: %s" % os.strerror(errno))
        return t1 - t0, t2 - t1

    def hold_copier(self, bint hold):
        """Tests: keep the copier from starting (faults are still served). Release it
        before the next pause, which waits for the copier."""
        cdef shared_t *s = self.s
        with nogil:
            pthread_mutex_lock(&s.mu)
            s.hold = hold
            pthread_cond_broadcast(&s.work_cv)
            pthread_mutex_unlock(&s.mu)

    property copier_busy:
        def __get__(self):
            return bool(self.s.busy)

    property faults:
        """Write-protect faults the handler read since the capture began."""
        def __get__(self):
            return self.s.faults

    property fault_copies:
        def __get__(self):
            return self.s.fault_copies

    property copier_us:
        def __get__(self):
            return self.s.copier_us

    property handler_us:
        """Time the fault handler spent answering faults since the capture began."""
        def __get__(self):
            return self.s.handler_us

    property unprotect_us:
        """Of handler_us, the time in UFFDIO_WRITEPROTECT un-protecting the copied page."""
        def __get__(self):
            return self.s.unprotect_us

    cdef _unprotect_all(self):
        if self.s.uffd >= 0:
            _wp(self.s, 0, self.s.npages, False)

    def close(self):
        """Wait for the copier, stop both threads, un-protect guest RAM, unregister."""
        cdef shared_t *s = self.s
        if s == NULL:
            return
        if self.threads_started:
            with nogil:
                pthread_mutex_lock(&s.mu)
                s.hold = 0
                pthread_cond_broadcast(&s.work_cv)
                while s.busy:
                    pthread_cond_wait(&s.done_cv, &s.mu)
                s.stopping = 1
                pthread_cond_broadcast(&s.work_cv)
                pthread_mutex_unlock(&s.mu)
                pthread_join(self.copier_thread, NULL)
            self.threads_started = False
        if self.handler_started:
            with nogil:
                write(s.stop_fd, b"\1\0\0\0\0\0\0\0", 8)
                pthread_join(self.handler_thread, NULL)
            self.handler_started = False
        if s.uffd >= 0:
            self._unprotect_all()
            self._unregister()
        self._close_uffd()
        self.cow_ready = False
        self._free()

    cdef _free(self):
        cdef shared_t *s = self.s
        cdef int p
        if s == NULL:
            return
        for p in range(2):
            free(s.pfns[p])
            free(s.zero[p])
            free(s.kind[p])
            free(s.slot_of[p])
            if s.staging[p] != NULL:
                munmap(s.staging[p], s.npages << PAGE_SHIFT)
        free(s.state)
        free(s.copier_bits)
        free(s.batch)
        free(s.cow_list)
        free(s.pcopy)
        free(self.pre_bits)
        self.pre_bits = NULL
        pthread_mutex_destroy(&s.mu)
        pthread_mutex_destroy(&s.fault_mu)
        pthread_cond_destroy(&s.work_cv)
        pthread_cond_destroy(&s.done_cv)
        free(s)
        self.s = NULL
        free(self.hot)
        free(self.prev_dirty)
        free(self.demote)
        free(self.clear_bits)
        free(self.quiet)
        free(self.skip)
        free(self.send_pfns)
        free(self.send_slots)
        free(self.zero_pfns)
        self.hot = self.prev_dirty = self.demote = self.clear_bits = NULL
        self.quiet = self.skip = NULL
        self.send_pfns = self.send_slots = self.zero_pfns = NULL
        if self.scratch != NULL:
            munmap(self.scratch, SEND_BATCH << PAGE_SHIFT)
            self.scratch = NULL

    def __dealloc__(self):
        # close() is the way out; this only runs if it was never called (the threads
        # must not outlive the lists they read)
        if self.s != NULL:
            try:
                self.close()
            except Exception:
                pass
