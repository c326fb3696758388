# cython: language_level=3
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from colocore_ext.dirtylog cimport DirtyLog
from colocore_ext.includes.pthread cimport pthread_t, pthread_mutex_t, pthread_cond_t


cdef struct shared_t:
    # what the copier and fault-handler threads share with the pause (no Python objects)
    int vm_fd
    uint32_t slot
    int manual                 # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on: clearing is ours
    uint8_t *ram
    uint64_t ram_addr
    uint64_t npages
    Py_ssize_t nwords
    int uffd
    int stop_fd                # eventfd: the handler thread ends when it is written
    int cur                    # parity of the current checkpoint's lists
    uint32_t *pfns[2]          # per parity: the dirty pages, ascending
    uint8_t *zero[2]           # per parity and slot: the page was all zero
    uint8_t *kind[2]           # per parity and slot: KIND_HOT / KIND_PAUSE / KIND_COW
    uint32_t *slot_of[2]       # per parity and pfn: its slot, or NO_SLOT
    uint8_t *staging[2]        # per parity: page k of the list is copied to page k here
    Py_ssize_t count[2]
    uint8_t *state             # per slot of the current list: ST_* (atomic)
    uint32_t *cow_list         # the current list's cow slots, in page order
    Py_ssize_t ncow
    uint32_t *pcopy            # slots copied inside the pause (hot and short runs)
    Py_ssize_t npcopy
    Py_ssize_t pnext           # next pcopy index to claim (atomic): the pause's two copiers
    pthread_mutex_t mu         # guards work/busy/stopping/hold/pause_work/helping
    pthread_cond_t work_cv
    pthread_cond_t done_cv
    int work
    int busy
    int stopping
    int hold
    int pause_work             # the pause has pages for the copier thread to help with
    int helping                # the copier thread is copying pause pages
    pthread_mutex_t fault_mu   # the handler's lookups vs the pause rewriting the lists
    uint64_t *copier_bits      # the copier's KVM_CLEAR_DIRTY_LOG bitmap
    uint32_t *batch
    uint64_t faults            # write-protect fault messages read (all checkpoints)
    uint64_t fault_copies      # pages the handler copied before the copier got there
    uint64_t copier_pages
    int copy_errno             # first failed KVM_CLEAR_DIRTY_LOG (0: none; nothing lost)
    int unprotect_errno        # first failed un-protect (the guest could hang: reported)
    double copier_us
    double handler_us          # time the handler spent on fault messages (all checkpoints)
    double unprotect_us        # of which in UFFDIO_WRITEPROTECT un-protecting single pages


cdef class Capture:
    cdef DirtyLog log
    cdef shared_t *s
    cdef pthread_t copier_thread
    cdef pthread_t handler_thread
    cdef bint threads_started      # the copier thread
    cdef bint handler_started
    cdef uint64_t *hot
    cdef uint64_t *prev_dirty
    cdef uint64_t *demote
    cdef uint64_t *clear_bits
    cdef uint64_t *pre_bits         # pages pre-copied for the next pause (still valid unless dirty)
    cdef bint open_next             # the next checkpoint's lists were started by a pre-copy
    cdef uint64_t sent_seq          # the checkpoint whose send was planned (pre-copy may follow)
    cdef public Py_ssize_t precopy_min
    cdef readonly Py_ssize_t last_precopied, interval_precopied
    cdef readonly double last_precopy_us
    cdef uint8_t *quiet
    cdef uint8_t *skip
    cdef uint32_t *send_pfns
    cdef uint32_t *send_slots
    cdef uint32_t *zero_pfns
    cdef Py_ssize_t n_send, n_zero
    cdef uint8_t *scratch
    cdef Py_ssize_t touched[2]
    cdef readonly bint cow_ready
    cdef readonly str cow_reason
    cdef readonly uint64_t uffd_features
    cdef public bint cow
    cdef public Py_ssize_t hot_max
    cdef public int min_run
    cdef public int quiet_max
    cdef readonly uint64_t seq
    cdef int err_errno
    cdef uint64_t *kb               # the DirtyLog's bitmaps (it outlives this capture)
    cdef uint64_t *sb
    # figures of the last pause (and of the copy that followed it)
    cdef readonly Py_ssize_t last_dirty, last_hot, last_cow, last_in_pause, last_promoted
    cdef readonly Py_ssize_t last_demoted, last_skipped, last_runs
    cdef readonly uint64_t last_faults
    cdef uint64_t faults_at_pause
    cdef readonly double last_get_us, last_classify_us, last_wp_us, last_copy_us
    cdef readonly double last_clear_us, last_pause_us, last_end_us
    cdef double t_begin

    cdef int pause_nogil(self) noexcept nogil
    cdef int pause_begin_nogil(self) noexcept nogil
    cdef void pause_end_nogil(self) noexcept nogil
    cdef void _open_next(self) noexcept nogil
    cdef void _run(self, uint32_t start, Py_ssize_t length, bint cow_on) noexcept nogil
    # the pause's accumulators (pause_begin_nogil and _run)
    cdef Py_ssize_t _nc, _npc, _fw, _lw, _ncow, _nruns, _npause
    cdef void start_copier_nogil(self) noexcept nogil
    cdef _setup_uffd(self)
    cdef _unregister(self)
    cdef _close_uffd(self)
    cdef _unprotect_all(self)
    cdef _free(self)
