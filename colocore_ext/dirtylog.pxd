# cython: language_level=3
from libc.stdint cimport uint32_t, uint64_t


cdef class DirtyLog:
    cdef readonly int vm_fd
    cdef readonly uint32_t slot
    cdef readonly uint64_t host_addr
    cdef readonly uint64_t size
    cdef readonly uint64_t gpa_base
    cdef readonly uint64_t npages
    cdef readonly bint manual_protect
    cdef Py_ssize_t nwords
    cdef uint64_t *kvm_bitmap        # filled by KVM_GET_DIRTY_LOG
    cdef uint64_t *soft_bitmap       # pages the VMM wrote itself (device emulation)
    cdef readonly double last_get_us, last_clear_us, last_convert_us
    cdef readonly Py_ssize_t last_count

    # Mark page `pfn` (slot relative) dirty; callable without the GIL from the vCPU thread.
    cdef void mark_nogil(self, uint64_t pfn) noexcept nogil
    cdef void mark_range_nogil(self, uint64_t gpa, uint64_t length) noexcept nogil
