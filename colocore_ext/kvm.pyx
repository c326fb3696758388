# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The KVM VM and vCPU: memslots, the KVM_RUN loop, exit decoding, vCPU state.

The run loop lives here so that the vCPU thread spends its time in KVM_RUN without the
GIL; Python only sees device calls (`bus.mmio_read(addr, size)`, `bus.mmio_write(addr,
size, value)`, `bus.pio_read(port, size)`, `bus.pio_write(port, size, value)`) and the
reason the loop stopped ("kicked", "halt", "shutdown", "fail").

Stopping a spinning guest: `kick()` sets kvm_run.immediate_exit and sends a signal whose
handler does nothing (installed without SA_RESTART) to the vCPU thread, so KVM_RUN
returns EINTR at once. A pending MMIO/PIO read is completed by that re-entry before
KVM_RUN returns (KVM API: "re-enter with immediate_exit set to complete pending
operations"), so the state read after a kick is always consistent.

A checkpoint capture is served inside the run loop (`capture_begin` / `capture_wait`):
the loop, back from KVM_RUN with EINTR, runs the RAM capture and reads the vCPU state in
C without the GIL (regs, sregs and events come for free in kvm_run's sync area,
KVM_CAP_SYNC_REGS), runs one Python callable for the device state, and re-enters
KVM_RUN without ever leaving the loop: no thread hand-off while the guest is stopped.
"""
from libc.errno cimport errno, EINTR, EAGAIN
from libc.string cimport memcpy, memset, strerror
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free, calloc
from posix.ioctl cimport ioctl
from posix.fcntl cimport open as c_open, O_RDWR, O_CLOEXEC
from posix.unistd cimport close
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from posix.signal cimport sigaction_t, sigaction, sigemptyset
from colocore_ext.includes.kvm cimport *

import os

from colocore_ext.dirtylog import enable_manual_protect

from colocore_ext.capture cimport Capture
from colocore_ext.includes.pthread cimport (pthread_t, pthread_self, pthread_kill, pthread_mutex_t,
                                         pthread_cond_t, pthread_mutex_init, pthread_mutex_lock,
                                         pthread_mutex_unlock, pthread_cond_init,
                                         pthread_cond_wait, pthread_cond_broadcast)
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from *:
    """
    #define cc_full_fence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
    """
    void cc_full_fence() noexcept nogil

cdef enum:
    CAP_IDLE = 0
    CAP_REQUESTED = 1
    CAP_RUNNING = 2
    CAP_DONE = 3
    CAP_DECLINED = 4
    HAVE_XCRS = 1
    HAVE_DEBUGREGS = 2
    MAX_MSRS = 64


cdef inline double _now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3

cdef extern from "<signal.h>" nogil:
    int SIGRTMIN_ "SIGRTMIN"

cdef extern from "<sys/mman.h>" nogil:
    int MAP_NORESERVE
    int madvise(void *addr, size_t length, int advice)
    int MADV_DONTDUMP

KICK_SIGNAL = SIGRTMIN_ + 3

cdef void _kick_handler(int sig) noexcept nogil:
    pass   # only there so that KVM_RUN returns EINTR

cdef bint _handler_installed = False

cdef _install_kick_handler():
    global _handler_installed
    cdef sigaction_t sa
    if _handler_installed:
        return
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = _kick_handler
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0          # no SA_RESTART: the ioctl must return EINTR
    if sigaction(SIGRTMIN_ + 3, &sa, NULL) != 0:
        raise OSError(errno, "sigaction for the vCPU kick signal failed")
    _handler_installed = True


class KvmError(OSError):
    pass


cdef _raise(str what):
    cdef int e = errno
    raise KvmError(e, "%s: %s" % (what, os.strerror(e)))


EXIT_NAMES = {KVM_EXIT_HLT: "halt", KVM_EXIT_SHUTDOWN: "shutdown",
              KVM_EXIT_FAIL_ENTRY: "fail-entry", KVM_EXIT_INTERNAL_ERROR: "internal-error"}

# MSRs saved with the vCPU, when the host lists them (KVM_GET_MSR_INDEX_LIST).
_WANTED_MSRS = (0x174, 0x175, 0x176,            # SYSENTER_CS/ESP/EIP
                0x277,                          # PAT
                0x10,                           # TSC
                0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,   # STAR LSTAR CSTAR SFMASK
                0xC0000102,                     # KERNEL_GS_BASE
                0xC0000103,                     # TSC_AUX
                0x1A0)                          # MISC_ENABLE


def open_kvm(path="/dev/kvm"):
    """Open /dev/kvm with a message that says what to do when it fails."""
    cdef bytes p = path.encode()
    cdef int fd = c_open(p, O_RDWR | O_CLOEXEC)
    if fd < 0:
        e = errno
        if e == 2:
            raise KvmError(e, "cannot open %s: no such device; load the kvm module "
                              "(modprobe kvm_intel / kvm_amd) or run on a host with KVM" % path)
        if e == 13:
            raise KvmError(e, "cannot open %s: permission denied; run as root or join "
                              "the kvm group" % path)
        raise KvmError(e, "cannot open %s: %s" % (path, os.strerror(e)))
    cdef int version = ioctl(fd, KVM_GET_API_VERSION, 0)
    if version != 12:
        close(fd)
        raise KvmError(0, "%s speaks KVM API %d, colocore needs 12" % (path, version))
    return fd


cdef enum:
    MAX_EXTRA_SLOTS = 4         # add_slot() memslots a Vm may have besides slot 0


cdef class Vm:
    """One KVM VM with its guest RAM in memslot 0 (dirty logging on)."""
    cdef public int kvm_fd
    cdef public int fd
    cdef public uint64_t mem_size
    cdef uint8_t *mem
    cdef public bint manual_protect
    cdef public bint dirty_log
    cdef object _view
    cdef uint8_t *extra_mem[MAX_EXTRA_SLOTS]    # add_slot()'s mappings
    cdef uint64_t extra_size[MAX_EXTRA_SLOTS]
    cdef int nextra

    def __cinit__(self):
        self.kvm_fd = -1
        self.fd = -1
        self.mem = NULL
        self.nextra = 0

    def __init__(self, uint64_t mem_size, bint dirty_log=True, str kvm_path="/dev/kvm"):
        if mem_size == 0 or mem_size % (2 << 20):
            raise ValueError("guest memory must be a non-zero multiple of 2 MiB, got %d" % mem_size)
        self.kvm_fd = open_kvm(kvm_path)
        self.mem_size = mem_size
        self.fd = ioctl(self.kvm_fd, KVM_CREATE_VM, 0)
        if self.fd < 0:
            _raise("KVM_CREATE_VM")
        # A TSS region is required by VMX hosts before the first KVM_RUN; harmless elsewhere.
        ioctl(self.fd, KVM_SET_TSS_ADDR, <unsigned long>0xfffbd000)
        self.manual_protect = False
        self.dirty_log = False
        if dirty_log:
            # before the memslot exists, as KVM requires
            self.manual_protect = enable_manual_protect(self.fd)
        cdef void *p = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            _raise("cannot allocate %d bytes of guest memory" % mem_size)
        self.mem = <uint8_t *>p
        cdef kvm_userspace_memory_region region
        memset(&region, 0, sizeof(region))
        region.slot = 0
        region.flags = KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0
        region.guest_phys_addr = 0
        region.memory_size = mem_size
        region.userspace_addr = <uint64_t>p
        if ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, &region) < 0:
            _raise("KVM_SET_USER_MEMORY_REGION")
        self.dirty_log = dirty_log      # the kernel accepted KVM_MEM_LOG_DIRTY_PAGES

    property mem_addr:
        def __get__(self):
            return <uint64_t>self.mem

    def add_slot(self, uint32_t slot, uint64_t gpa, uint64_t size, bint dirty_log=False):
        """Another memslot: `size` bytes of fresh anonymous memory (MAP_NORESERVE) at
        guest-physical `gpa`, unmapped with the VM. Returns (host address, writable
        memoryview). The engine's guests have one slot; the pipeline benchmark measures
        the dirty-log harvest of a large sparse slot this way."""
        if self.nextra == MAX_EXTRA_SLOTS:
            raise ValueError("at most %d extra memslots" % MAX_EXTRA_SLOTS)
        if size == 0 or size % 4096 or gpa % 4096:
            raise ValueError("a memslot is a non-zero number of whole pages at a page boundary")
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if p == MAP_FAILED:
            _raise("cannot allocate %d bytes for memslot %d" % (size, slot))
        cdef kvm_userspace_memory_region region
        memset(&region, 0, sizeof(region))
        region.slot = slot
        region.flags = KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = <uint64_t>p
        if ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, &region) < 0:
            munmap(p, size)
            _raise("KVM_SET_USER_MEMORY_REGION (slot %d)" % slot)
        self.extra_mem[self.nextra] = <uint8_t *>p
        self.extra_size[self.nextra] = size
        self.nextra += 1
        return <uint64_t>p, memoryview(<uint8_t[:size]><uint8_t *>p)

    def memory(self):
        """A writable memoryview of guest RAM (shares the mapping)."""
        if self._view is None:
            self._view = memoryview(<uint8_t[:self.mem_size]>self.mem)
        return self._view

    cdef void _unmap_extra(self) noexcept:
        cdef int i
        for i in range(self.nextra):
            munmap(self.extra_mem[i], self.extra_size[i])
        self.nextra = 0

    def close(self):
        """Unmap the memory and close the VM: memoryviews of it must be gone by now."""
        self._view = None
        self._unmap_extra()
        if self.mem != NULL:
            munmap(self.mem, self.mem_size)
            self.mem = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.kvm_fd >= 0:
            close(self.kvm_fd)
            self.kvm_fd = -1

    def __dealloc__(self):
        self._unmap_extra()
        if self.mem != NULL:
            munmap(self.mem, self.mem_size)
        if self.fd >= 0:
            close(self.fd)
        if self.kvm_fd >= 0:
            close(self.kvm_fd)


cdef class Vcpu:
    """vCPU 0 of a Vm: the run loop, kicks, and complete state save/restore."""
    cdef public int fd
    cdef kvm_run *run
    cdef size_t run_size
    cdef Vm vm
    cdef pthread_t thread
    cdef volatile bint in_run_loop
    cdef public uint64_t exits
    cdef object msr_indices
    # the in-loop capture: cap_state changes under cap_mu only
    cdef pthread_mutex_t cap_mu
    cdef pthread_cond_t cap_cv
    cdef volatile int cap_state
    cdef volatile int park_req
    cdef Capture cap_ram
    cdef object cap_py
    cdef object cap_exc
    cdef int cap_ram_status
    cdef bint sync_regs
    cdef kvm_mp_state c_mp
    cdef kvm_regs c_regs
    cdef kvm_sregs c_sregs
    cdef kvm_vcpu_events c_events
    cdef kvm_xsave *c_xsave
    cdef kvm_xcrs c_xcrs
    cdef kvm_debugregs c_dregs
    cdef kvm_msrs *c_msrs
    cdef int c_nmsrs
    cdef int c_have
    cdef int c_errno
    cdef const char *c_err_what
    cdef readonly double t_request, t_exit, t_ram, t_vcpu, t_gil, t_dev, t_resume

    def __cinit__(self):
        self.fd = -1
        self.run = NULL
        self.c_xsave = NULL
        self.c_msrs = NULL
        pthread_mutex_init(&self.cap_mu, NULL)
        pthread_cond_init(&self.cap_cv, NULL)

    def __init__(self, Vm vm):
        _install_kick_handler()
        self.vm = vm
        self.fd = ioctl(vm.fd, KVM_CREATE_VCPU, 0)
        if self.fd < 0:
            _raise("KVM_CREATE_VCPU")
        cdef int size = ioctl(vm.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        if size <= 0:
            _raise("KVM_GET_VCPU_MMAP_SIZE")
        self.run_size = size
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            _raise("mmap of kvm_run")
        self.run = <kvm_run *>p
        self._set_supported_cpuid()
        self.msr_indices = self._msr_indices()
        cdef int i
        self.c_xsave = <kvm_xsave *>calloc(1, sizeof(kvm_xsave))
        self.c_msrs = <kvm_msrs *>calloc(1, sizeof(kvm_msrs) + MAX_MSRS * sizeof(kvm_msr_entry))
        if self.c_xsave == NULL or self.c_msrs == NULL:
            raise MemoryError()
        self.c_nmsrs = min(len(self.msr_indices), MAX_MSRS)
        for i in range(self.c_nmsrs):
            self.c_msrs.entries[i].index = self.msr_indices[i]
        sync = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS
        self.sync_regs = (ioctl(vm.kvm_fd, KVM_CHECK_EXTENSION, <unsigned long>KVM_CAP_SYNC_REGS)
                          & sync) == sync

    def close(self):
        if self.run != NULL:
            munmap(self.run, self.run_size)
            self.run = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.run != NULL:
            munmap(self.run, self.run_size)
        if self.fd >= 0:
            close(self.fd)
        free(self.c_xsave)
        free(self.c_msrs)

    cdef _set_supported_cpuid(self):
        cdef int n = 256
        cdef kvm_cpuid2 *cpuid = <kvm_cpuid2 *>calloc(1, sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2))
        if cpuid == NULL:
            raise MemoryError()
        try:
            cpuid.nent = n
            if ioctl(self.vm.kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0:
                _raise("KVM_GET_SUPPORTED_CPUID")
            if ioctl(self.fd, KVM_SET_CPUID2, cpuid) < 0:
                _raise("KVM_SET_CPUID2")
        finally:
            free(cpuid)

    cdef object _msr_indices(self):
        cdef int n = 1024
        cdef kvm_msr_list *lst = <kvm_msr_list *>calloc(1, sizeof(kvm_msr_list) + n * sizeof(uint32_t))
        cdef int i
        if lst == NULL:
            raise MemoryError()
        try:
            lst.nmsrs = n
            if ioctl(self.vm.kvm_fd, KVM_GET_MSR_INDEX_LIST, lst) < 0:
                _raise("KVM_GET_MSR_INDEX_LIST")
            have = set(lst.indices[i] for i in range(lst.nmsrs))
        finally:
            free(lst)
        return [m for m in _WANTED_MSRS if m in have]

    # ---- running ---------------------------------------------------------------

    def kick(self):
        """Make run_loop return "kicked" promptly, from any thread (also before the loop
        runs: its first KVM_RUN then returns at once)."""
        self.park_req = 1
        # The loop clears immediate_exit and then reads park_req; both sides fence, so
        # either it sees park_req or KVM_RUN sees immediate_exit (no lost kick).
        cc_full_fence()
        self.run.immediate_exit = 1
        if self.in_run_loop:
            pthread_kill(self.thread, SIGRTMIN_ + 3)

    # ---- the checkpoint capture, served inside the run loop --------------------------

    def capture_begin(self, Capture ram, in_pause):
        """Ask the run loop to stop the guest for a checkpoint: it runs `ram`'s pause
        (if not None), reads the vCPU state, calls `in_pause()` (GIL held, guest
        stopped) and resumes the guest by itself. Returns False when the loop is not
        running (then park the vCPU and capture on this thread). Follow with
        capture_wait(); wake a guest idling in a device wait in between."""
        pthread_mutex_lock(&self.cap_mu)
        if not self.in_run_loop or self.cap_state != CAP_IDLE:
            pthread_mutex_unlock(&self.cap_mu)
            return False
        self.cap_ram = ram
        self.cap_py = in_pause
        self.cap_exc = None
        self.cap_ram_status = 0
        self.c_errno = 0
        self.cap_state = CAP_REQUESTED
        self.t_request = _now_us()
        pthread_mutex_unlock(&self.cap_mu)
        if self.sync_regs:
            self.run.kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS
        cc_full_fence()
        self.run.immediate_exit = 1
        pthread_kill(self.thread, SIGRTMIN_ + 3)
        return True

    def capture_wait(self):
        """Wait (without the GIL) until the requested capture ran. True when it did (the
        vCPU state is then in captured_state()); False when the loop ended first."""
        cdef int st
        with nogil:
            pthread_mutex_lock(&self.cap_mu)
            while self.cap_state == CAP_REQUESTED or self.cap_state == CAP_RUNNING:
                pthread_cond_wait(&self.cap_cv, &self.cap_mu)
            st = self.cap_state
            self.cap_state = CAP_IDLE
            pthread_mutex_unlock(&self.cap_mu)
        ram = self.cap_ram
        self.cap_ram = None
        self.cap_py = None
        if st == CAP_DECLINED:
            return False
        if self.cap_ram_status < 0:
            ram.raise_error()
        if self.c_errno:
            raise KvmError(self.c_errno, "%s during the checkpoint pause: %s"
                           % (self.c_err_what.decode(), os.strerror(self.c_errno)))
        if self.cap_exc is not None:
            exc, self.cap_exc = self.cap_exc, None
            raise exc
        return True

    cdef bint _capture_nogil(self) noexcept nogil:
        """On the vCPU thread, back from KVM_RUN with EINTR: serve a requested capture."""
        cdef bint take
        pthread_mutex_lock(&self.cap_mu)
        take = self.cap_state == CAP_REQUESTED
        if take:
            self.cap_state = CAP_RUNNING
        pthread_mutex_unlock(&self.cap_mu)
        if not take:
            return False
        self.t_exit = _now_us()
        if self.cap_ram is not None:
            # the RAM capture's copying goes on in the copier thread meanwhile
            self.cap_ram_status = self.cap_ram.pause_begin_nogil()
        self.t_ram = _now_us()
        self._read_state_nogil()
        self.t_vcpu = _now_us()
        return True

    cdef void _read_state_nogil(self) noexcept nogil:
        cdef uint64_t want = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS
        cdef int got
        self.c_have = 0
        # MP_STATE first, VCPU_EVENTS last (the order of get_state); regs, sregs and events
        # were stored by KVM into the sync area at this very exit
        if ioctl(self.fd, KVM_GET_MP_STATE, &self.c_mp) < 0:
            self._state_error(b"KVM_GET_MP_STATE")
            return
        if self.sync_regs and (self.run.kvm_valid_regs & want) == want:
            self.c_regs = self.run.s.regs.regs
            self.c_sregs = self.run.s.regs.sregs
            self.c_events = self.run.s.regs.events
            self.run.kvm_valid_regs = 0        # ordinary exits need not pay for it
        else:
            if ioctl(self.fd, KVM_GET_REGS, &self.c_regs) < 0:
                self._state_error(b"KVM_GET_REGS")
                return
            if ioctl(self.fd, KVM_GET_SREGS, &self.c_sregs) < 0:
                self._state_error(b"KVM_GET_SREGS")
                return
            if ioctl(self.fd, KVM_GET_VCPU_EVENTS, &self.c_events) < 0:
                self._state_error(b"KVM_GET_VCPU_EVENTS")
                return
        if ioctl(self.fd, KVM_GET_XSAVE, self.c_xsave) < 0:
            self._state_error(b"KVM_GET_XSAVE")
            return
        if ioctl(self.fd, KVM_GET_XCRS, &self.c_xcrs) == 0:
            self.c_have |= HAVE_XCRS
        if ioctl(self.fd, KVM_GET_DEBUGREGS, &self.c_dregs) == 0:
            self.c_have |= HAVE_DEBUGREGS
        self.c_msrs.nmsrs = self.c_nmsrs
        got = ioctl(self.fd, KVM_GET_MSRS, self.c_msrs)
        if got < 0:
            self._state_error(b"KVM_GET_MSRS")
            return
        self.c_msrs.nmsrs = got

    cdef void _state_error(self, const char *what) noexcept nogil:
        self.c_errno = errno
        self.c_err_what = what

    cdef _capture_finish(self):
        """The GIL part of a served capture, the rest of the RAM copying, then the guest
        may run again."""
        cdef Capture ram = self.cap_ram     # the waiter drops self.cap_ram once DONE
        self.t_gil = _now_us()
        try:
            if self.cap_py is not None and self.cap_ram_status == 0 and self.c_errno == 0:
                self.cap_py()
        except BaseException as exc:   # noqa: B036 - handed to the waiting thread
            self.cap_exc = exc
        with nogil:
            self.t_dev = _now_us()
            if ram is not None and self.cap_ram_status == 0:
                ram.pause_end_nogil()
            pthread_mutex_lock(&self.cap_mu)
            self.cap_state = CAP_DONE
            self.t_resume = _now_us()
            pthread_cond_broadcast(&self.cap_cv)
            pthread_mutex_unlock(&self.cap_mu)
            if ram is not None:
                ram.start_copier_nogil()

    def captured_state(self):
        """The vCPU state read by the last served capture, shaped like get_state()."""
        state = {"mp_state": (<char *>&self.c_mp)[:sizeof(kvm_mp_state)],
                 "regs": (<char *>&self.c_regs)[:sizeof(kvm_regs)],
                 "sregs": (<char *>&self.c_sregs)[:sizeof(kvm_sregs)],
                 "xsave": (<char *>self.c_xsave)[:sizeof(kvm_xsave)]}
        if self.c_have & HAVE_XCRS:
            state["xcrs"] = (<char *>&self.c_xcrs)[:sizeof(kvm_xcrs)]
        if self.c_have & HAVE_DEBUGREGS:
            state["debugregs"] = (<char *>&self.c_dregs)[:sizeof(kvm_debugregs)]
        state["msrs"] = (<char *>self.c_msrs)[:sizeof(kvm_msrs) + self.c_msrs.nmsrs * sizeof(kvm_msr_entry)]
        state["events"] = (<char *>&self.c_events)[:sizeof(kvm_vcpu_events)]
        return state

    def run_loop(self, bus):
        """KVM_RUN until kicked or the guest stops; device exits go to `bus`.

        Returns "kicked", "halt", "shutdown", "fail-entry", "internal-error" or
        "unknown-exit-N". `bus` methods are called with the GIL held.
        """
        cdef int r
        cdef int e
        cdef uint32_t reason
        cdef uint64_t value
        cdef uint8_t *data
        cdef uint32_t size
        cdef uint32_t i
        cdef uint32_t count
        cdef bint served
        self.thread = pthread_self()
        pthread_mutex_lock(&self.cap_mu)
        self.in_run_loop = True
        pthread_mutex_unlock(&self.cap_mu)
        try:
            while True:
                with nogil:
                    r = ioctl(self.fd, KVM_RUN, 0)
                    e = errno
                    served = False
                    if r < 0 and (e == EINTR or e == EAGAIN):
                        self.run.immediate_exit = 0
                        cc_full_fence()      # see kick()
                        served = self._capture_nogil()
                if r < 0:
                    if e == EINTR or e == EAGAIN:
                        if served:
                            self._capture_finish()
                        if self.park_req:
                            self.park_req = 0
                            return "kicked"
                        continue             # a capture, or a stray signal: run on
                    raise KvmError(e, "KVM_RUN: %s" % os.strerror(e))
                self.exits += 1
                reason = self.run.exit_reason
                if reason == KVM_EXIT_MMIO:
                    size = self.run.mmio.len
                    if self.run.mmio.is_write:
                        value = 0
                        memcpy(&value, self.run.mmio.data, size if size <= 8 else 8)
                        bus.mmio_write(self.run.mmio.phys_addr, size, value)
                    else:
                        value = bus.mmio_read(self.run.mmio.phys_addr, size)
                        memcpy(self.run.mmio.data, &value, size if size <= 8 else 8)
                elif reason == KVM_EXIT_IO:
                    size = self.run.io.size
                    count = self.run.io.count
                    data = (<uint8_t *>self.run) + self.run.io.data_offset
                    for i in range(count):
                        if self.run.io.direction == KVM_EXIT_IO_OUT:
                            value = 0
                            memcpy(&value, data + i * size, size)
                            bus.pio_write(self.run.io.port, size, value)
                        else:
                            value = bus.pio_read(self.run.io.port, size)
                            memcpy(data + i * size, &value, size)
                elif reason in EXIT_NAMES:
                    return EXIT_NAMES[reason]
                else:
                    return "unknown-exit-%d" % reason
        finally:
            with nogil:
                pthread_mutex_lock(&self.cap_mu)
                self.in_run_loop = False
                if self.cap_state == CAP_REQUESTED:     # the requester captures itself
                    self.cap_state = CAP_DECLINED
                    pthread_cond_broadcast(&self.cap_cv)
                pthread_mutex_unlock(&self.cap_mu)

    # ---- state -----------------------------------------------------------------
    # Blobs are the kernel structs as bytes; their layout is the one linux/kvm.h gives
    # on this architecture, recorded in the stream with its size so a mismatch is caught.

    def get_state(self):
        """The complete vCPU state as a dict of name -> bytes (vCPU must not be running)."""
        cdef kvm_mp_state mp
        cdef kvm_regs regs
        cdef kvm_sregs sregs
        cdef kvm_xsave *xsave
        cdef kvm_xcrs xcrs
        cdef kvm_debugregs dregs
        cdef kvm_vcpu_events events
        state = {}
        # MP_STATE first, VCPU_EVENTS last (the order Firecracker and QEMU use).
        if ioctl(self.fd, KVM_GET_MP_STATE, &mp) < 0:
            _raise("KVM_GET_MP_STATE")
        state["mp_state"] = (<char *>&mp)[:sizeof(mp)]
        if ioctl(self.fd, KVM_GET_REGS, &regs) < 0:
            _raise("KVM_GET_REGS")
        state["regs"] = (<char *>&regs)[:sizeof(regs)]
        if ioctl(self.fd, KVM_GET_SREGS, &sregs) < 0:
            _raise("KVM_GET_SREGS")
        state["sregs"] = (<char *>&sregs)[:sizeof(sregs)]
        xsave = <kvm_xsave *>calloc(1, sizeof(kvm_xsave))
        try:
            if ioctl(self.fd, KVM_GET_XSAVE, xsave) < 0:
                _raise("KVM_GET_XSAVE")
            state["xsave"] = (<char *>xsave)[:sizeof(kvm_xsave)]
        finally:
            free(xsave)
        if ioctl(self.fd, KVM_GET_XCRS, &xcrs) == 0:
            state["xcrs"] = (<char *>&xcrs)[:sizeof(xcrs)]
        if ioctl(self.fd, KVM_GET_DEBUGREGS, &dregs) == 0:
            state["debugregs"] = (<char *>&dregs)[:sizeof(dregs)]
        state["msrs"] = self._get_msrs()
        if ioctl(self.fd, KVM_GET_VCPU_EVENTS, &events) < 0:
            _raise("KVM_GET_VCPU_EVENTS")
        state["events"] = (<char *>&events)[:sizeof(events)]
        return state

    cdef bytes _get_msrs(self):
        cdef int n = len(self.msr_indices)
        cdef size_t sz = sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry)
        cdef kvm_msrs *msrs = <kvm_msrs *>calloc(1, sz)
        cdef int i
        cdef int got
        try:
            msrs.nmsrs = n
            for i in range(n):
                msrs.entries[i].index = self.msr_indices[i]
            got = ioctl(self.fd, KVM_GET_MSRS, msrs)
            if got < 0:
                _raise("KVM_GET_MSRS")
            msrs.nmsrs = got
            return (<char *>msrs)[:sizeof(kvm_msrs) + got * sizeof(kvm_msr_entry)]
        finally:
            free(msrs)

    def check_state(self, dict state):
        """Raise ValueError unless `state` would load on this vCPU (nothing is changed)."""
        cdef const unsigned char[:] b
        sizes = {"mp_state": sizeof(kvm_mp_state), "regs": sizeof(kvm_regs),
                 "sregs": sizeof(kvm_sregs), "xsave": sizeof(kvm_xsave),
                 "xcrs": sizeof(kvm_xcrs), "debugregs": sizeof(kvm_debugregs),
                 "events": sizeof(kvm_vcpu_events)}
        for name in ("mp_state", "regs", "sregs", "xsave", "events", "msrs"):
            if name not in state:
                raise ValueError("vCPU state lacks %r" % name)
        for name, size in sizes.items():
            if name in state and len(state[name]) != size:
                raise ValueError("vCPU state %r is %d bytes, this host's struct is %d"
                                 % (name, len(state[name]), size))
        msrs = state["msrs"]
        if len(msrs) < sizeof(kvm_msrs) or (len(msrs) - sizeof(kvm_msrs)) % sizeof(kvm_msr_entry):
            raise ValueError("vCPU state 'msrs' has a bad length %d" % len(msrs))
        b = msrs
        cdef int n = (<kvm_msrs *>&b[0]).nmsrs
        if sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry) != len(msrs):
            raise ValueError("vCPU state 'msrs' count %d does not match its length" % n)

    def set_state(self, dict state):
        """Load a state produced by get_state (same host kind); checked before any change."""
        self.check_state(state)
        # Restore order: MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, MSRS, VCPU_EVENTS
        # (SET_REGS clears pending exceptions, so the events come last).
        self._set_blob(KVM_SET_MP_STATE, state["mp_state"], "KVM_SET_MP_STATE")
        self._set_blob(KVM_SET_REGS, state["regs"], "KVM_SET_REGS")
        self._set_blob(KVM_SET_SREGS, state["sregs"], "KVM_SET_SREGS")
        self._set_blob(KVM_SET_XSAVE, state["xsave"], "KVM_SET_XSAVE")
        if "xcrs" in state:
            self._set_blob(KVM_SET_XCRS, state["xcrs"], "KVM_SET_XCRS")
        if "debugregs" in state:
            self._set_blob(KVM_SET_DEBUGREGS, state["debugregs"], "KVM_SET_DEBUGREGS")
        msrs = state["msrs"]
        cdef int n = (len(msrs) - sizeof(kvm_msrs)) // sizeof(kvm_msr_entry)
        buf = bytearray(msrs)
        cdef unsigned char[:] w = buf
        if ioctl(self.fd, KVM_SET_MSRS, &w[0]) != n:
            _raise("KVM_SET_MSRS")
        self._set_blob(KVM_SET_VCPU_EVENTS, state["events"], "KVM_SET_VCPU_EVENTS")

    cdef _set_blob(self, unsigned long req, bytes blob, str what):
        buf = bytearray(blob)
        cdef unsigned char[:] w = buf
        if ioctl(self.fd, req, &w[0]) < 0:
            _raise(what)

    # ---- boot-time helpers used by the loader -----------------------------------

    def set_long_mode(self, uint64_t rip, uint64_t rsp, uint64_t rax, uint64_t rbx,
                      uint64_t cr3, uint64_t gdt_base, uint16_t gdt_limit):
        """Enter at `rip` in 64-bit mode, CPL 0, with the loader's page tables and GDT."""
        cdef kvm_sregs sregs
        cdef kvm_regs regs
        if ioctl(self.fd, KVM_GET_SREGS, &sregs) < 0:
            _raise("KVM_GET_SREGS")
        _flat_segment(&sregs.cs, 0x08, 11, 1, 0)
        _flat_segment(&sregs.ds, 0x10, 3, 0, 1)
        _flat_segment(&sregs.es, 0x10, 3, 0, 1)
        _flat_segment(&sregs.fs, 0x10, 3, 0, 1)
        _flat_segment(&sregs.gs, 0x10, 3, 0, 1)
        _flat_segment(&sregs.ss, 0x10, 3, 0, 1)
        sregs.gdt.base = gdt_base
        sregs.gdt.limit = gdt_limit
        sregs.cr0 = 0x80000031          # PE ET NE PG
        sregs.cr3 = cr3
        sregs.cr4 = 0x20 | 0x200 | 0x400   # PAE OSFXSR OSXMMEXCPT (SSE usable by compiled C)
        sregs.efer = 0x500              # LME LMA
        if ioctl(self.fd, KVM_SET_SREGS, &sregs) < 0:
            _raise("KVM_SET_SREGS")
        memset(&regs, 0, sizeof(regs))
        regs.rip = rip
        regs.rsp = rsp
        regs.rax = rax
        regs.rbx = rbx
        regs.rflags = 2
        if ioctl(self.fd, KVM_SET_REGS, &regs) < 0:
            _raise("KVM_SET_REGS")

    def set_protected_mode(self, uint64_t eip, uint64_t eax, uint64_t ebx):
        """The standard Multiboot v1 entry: 32-bit protected mode, paging off."""
        cdef kvm_sregs sregs
        cdef kvm_regs regs
        if ioctl(self.fd, KVM_GET_SREGS, &sregs) < 0:
            _raise("KVM_GET_SREGS")
        _flat_segment(&sregs.cs, 0x08, 11, 0, 1)
        _flat_segment(&sregs.ds, 0x10, 3, 0, 1)
        _flat_segment(&sregs.es, 0x10, 3, 0, 1)
        _flat_segment(&sregs.fs, 0x10, 3, 0, 1)
        _flat_segment(&sregs.gs, 0x10, 3, 0, 1)
        _flat_segment(&sregs.ss, 0x10, 3, 0, 1)
        sregs.cr0 = 0x11
        if ioctl(self.fd, KVM_SET_SREGS, &sregs) < 0:
            _raise("KVM_SET_SREGS")
        memset(&regs, 0, sizeof(regs))
        regs.rip = eip
        regs.rax = eax
        regs.rbx = ebx
        regs.rflags = 2
        if ioctl(self.fd, KVM_SET_REGS, &regs) < 0:
            _raise("KVM_SET_REGS")

    def rip(self):
        cdef kvm_regs regs
        if ioctl(self.fd, KVM_GET_REGS, &regs) < 0:
            _raise("KVM_GET_REGS")
        return regs.rip


cdef void _flat_segment(kvm_segment *s, uint16_t sel, uint8_t typ, uint8_t l, uint8_t db) noexcept:
    s.base = 0
    s.limit = 0xFFFFFFFF
    s.selector = sel
    s.type = typ
    s.present = 1
    s.dpl = 0
    s.db = db
    s.s = 1
    s.l = l
    s.g = 1
    s.avl = 0
    s.unusable = 0
