# cython: language_level=3
"""userfaultfd as <linux/userfaultfd.h> defines it (write-protect mode only).

The installed header may be older than the running kernel: features added later are
defined here by value (the kernel says at run time, in UFFDIO_API, which it offers).
The message union is reached through small C helpers, so that no anonymous C type has
to be named in Cython.
"""
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "<linux/userfaultfd.h>" nogil:
    const unsigned long UFFDIO_API
    const unsigned long UFFDIO_REGISTER
    const unsigned long UFFDIO_UNREGISTER
    const unsigned long UFFDIO_WRITEPROTECT
    enum:
        UFFD_API
        UFFD_FEATURE_PAGEFAULT_FLAG_WP
        UFFDIO_REGISTER_MODE_WP
        UFFDIO_WRITEPROTECT_MODE_WP
        UFFD_EVENT_PAGEFAULT
        UFFD_PAGEFAULT_FLAG_WP
        _UFFDIO_WRITEPROTECT
    cdef struct uffdio_range:
        uint64_t start
        uint64_t len
    cdef struct uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls
    cdef struct uffdio_register:
        uffdio_range range
        uint64_t mode
        uint64_t ioctls
    cdef struct uffdio_writeprotect:
        uffdio_range range
        uint64_t mode
    cdef struct uffd_msg:
        uint8_t event

cdef extern from *:
    """
    #include <linux/userfaultfd.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* Newer than some installed headers; values from the kernel's uapi. */
    #define CC_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
    #define CC_USERFAULTFD_IOC_NEW 0xAA00        /* _IO(0xAA, 0x00), /dev/userfaultfd */
    static inline uint64_t cc_uffd_fault_address(const struct uffd_msg *m) {
        return m->arg.pagefault.address;
    }
    static inline uint64_t cc_uffd_fault_flags(const struct uffd_msg *m) {
        return m->arg.pagefault.flags;
    }
    static inline int cc_userfaultfd(int flags) {
    #ifdef SYS_userfaultfd
        return (int)syscall(SYS_userfaultfd, flags);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }
    """
    const uint64_t CC_UFFD_FEATURE_WP_UNPOPULATED
    const unsigned long CC_USERFAULTFD_IOC_NEW
    uint64_t cc_uffd_fault_address(const uffd_msg *m) noexcept nogil
    uint64_t cc_uffd_fault_flags(const uffd_msg *m) noexcept nogil
    int cc_userfaultfd(int flags) noexcept nogil
