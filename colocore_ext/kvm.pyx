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
from colocore_ext.kvm_defs cimport *

import os

from colocore_ext.dirtylog import enable_manual_protect

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t thread, int sig)

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


def check_extension(int kvm_fd, int cap):
    return ioctl(kvm_fd, KVM_CHECK_EXTENSION, <unsigned long>cap)


cdef class Vm:
    """One KVM VM with its guest RAM in memslot 0 (dirty logging on)."""
    cdef public int kvm_fd
    cdef public int fd
    cdef public uint64_t mem_size
    cdef uint8_t *mem
    cdef public bint manual_protect
    cdef public bint dirty_log
    cdef object _view

    def __cinit__(self):
        self.kvm_fd = -1
        self.fd = -1
        self.mem = NULL

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

    def memory(self):
        """A writable memoryview of guest RAM (shares the mapping)."""
        if self._view is None:
            self._view = memoryview(<uint8_t[:self.mem_size]>self.mem)
        return self._view

    def close(self):
        self._view = None
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

    def __cinit__(self):
        self.fd = -1
        self.run = NULL

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
        """Make KVM_RUN return promptly, from any thread (also before the loop runs)."""
        self.run.immediate_exit = 1
        if self.in_run_loop:
            pthread_kill(self.thread, SIGRTMIN_ + 3)

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
        self.thread = pthread_self()
        self.in_run_loop = True
        try:
            while True:
                with nogil:
                    r = ioctl(self.fd, KVM_RUN, 0)
                    e = errno
                if r < 0:
                    if e == EINTR or e == EAGAIN:
                        self.run.immediate_exit = 0
                        return "kicked"
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
            self.in_run_loop = False

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
