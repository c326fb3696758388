# cython: language_level=3
"""The KVM ABI as `<linux/kvm.h>` defines it, declared once for every colocore_ext module.

Nothing here is re-typed by hand: these are `cdef extern` declarations, so the C compiler
takes every layout, size and ioctl number from the installed kernel headers
(linux-libc-dev). Cython only needs the member names the .pyx files touch; unnamed
unions in the kernel structs (kvm_run's exit union, the bitmap pointer of the dirty-log
structs) are declared as plain members because C reaches them the same way.
Flexible array members (`entries`, `indices`) are declared as `[1]`: C indexes them past
the declared bound; allocate `sizeof(struct) + n * sizeof(entry)` as the kernel expects.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<linux/kvm.h>" nogil:
    # ---- ioctl numbers (macros: the values come from the header) ----------------
    # system ioctls (on the /dev/kvm fd)
    const unsigned long KVM_GET_API_VERSION
    const unsigned long KVM_CREATE_VM
    const unsigned long KVM_GET_MSR_INDEX_LIST
    const unsigned long KVM_CHECK_EXTENSION
    const unsigned long KVM_GET_VCPU_MMAP_SIZE
    const unsigned long KVM_GET_SUPPORTED_CPUID
    # VM ioctls
    const unsigned long KVM_CREATE_VCPU
    const unsigned long KVM_SET_USER_MEMORY_REGION
    const unsigned long KVM_SET_TSS_ADDR
    const unsigned long KVM_SET_IDENTITY_MAP_ADDR
    const unsigned long KVM_GET_DIRTY_LOG
    const unsigned long KVM_CLEAR_DIRTY_LOG
    const unsigned long KVM_ENABLE_CAP
    # vCPU ioctls
    const unsigned long KVM_RUN
    const unsigned long KVM_GET_REGS
    const unsigned long KVM_SET_REGS
    const unsigned long KVM_GET_SREGS
    const unsigned long KVM_SET_SREGS
    const unsigned long KVM_GET_FPU
    const unsigned long KVM_SET_FPU
    const unsigned long KVM_GET_XSAVE
    const unsigned long KVM_SET_XSAVE
    const unsigned long KVM_GET_XCRS
    const unsigned long KVM_SET_XCRS
    const unsigned long KVM_GET_MSRS
    const unsigned long KVM_SET_MSRS
    const unsigned long KVM_SET_CPUID2
    const unsigned long KVM_GET_CPUID2
    const unsigned long KVM_GET_VCPU_EVENTS
    const unsigned long KVM_SET_VCPU_EVENTS
    const unsigned long KVM_GET_MP_STATE
    const unsigned long KVM_SET_MP_STATE
    const unsigned long KVM_GET_DEBUGREGS
    const unsigned long KVM_SET_DEBUGREGS
    const unsigned long KVM_SET_SIGNAL_MASK

    # ---- constants --------------------------------------------------------------
    enum:
        KVM_API_VERSION
        KVM_MEM_LOG_DIRTY_PAGES
        KVM_MEM_READONLY
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        KVM_CAP_DIRTY_LOG_RING
        KVM_CAP_IMMEDIATE_EXIT
        KVM_CAP_XSAVE
        KVM_CAP_XCRS
        KVM_CAP_DEBUGREGS
        KVM_CAP_NR_MEMSLOTS
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        KVM_DIRTY_LOG_INITIALLY_SET
        KVM_MP_STATE_RUNNABLE
        KVM_MP_STATE_HALTED
        KVM_EXIT_UNKNOWN
        KVM_EXIT_EXCEPTION
        KVM_EXIT_IO
        KVM_EXIT_HYPERCALL
        KVM_EXIT_DEBUG
        KVM_EXIT_HLT
        KVM_EXIT_MMIO
        KVM_EXIT_IRQ_WINDOW_OPEN
        KVM_EXIT_SHUTDOWN
        KVM_EXIT_FAIL_ENTRY
        KVM_EXIT_INTR
        KVM_EXIT_INTERNAL_ERROR
        KVM_EXIT_SYSTEM_EVENT
        KVM_EXIT_DIRTY_RING_FULL
        KVM_EXIT_IO_IN
        KVM_EXIT_IO_OUT
        KVM_MAX_XCRS
        KVM_CAP_SYNC_REGS
        KVM_SYNC_X86_REGS
        KVM_SYNC_X86_SREGS
        KVM_SYNC_X86_EVENTS

    # ---- memslots and dirty logging ---------------------------------------------
    cdef struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    cdef struct kvm_dirty_log:
        uint32_t slot
        uint32_t padding1
        void *dirty_bitmap          # in an unnamed union with a u64 pad

    cdef struct kvm_clear_dirty_log:
        uint32_t slot
        uint32_t num_pages
        uint64_t first_page
        void *dirty_bitmap          # in an unnamed union with a u64 pad

    cdef struct kvm_enable_cap:
        uint32_t cap
        uint32_t flags
        uint64_t args[4]
        uint8_t pad[64]

    # ---- vCPU state -------------------------------------------------------------
    cdef struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx
        uint64_t rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11
        uint64_t r12, r13, r14, r15
        uint64_t rip, rflags

    cdef struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type
        uint8_t present, dpl, db, s, l, g, avl
        uint8_t unusable
        uint8_t padding

    cdef struct kvm_dtable:
        uint64_t base
        uint16_t limit

    cdef struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss
        kvm_segment tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8
        uint64_t efer
        uint64_t apic_base
        uint64_t interrupt_bitmap[4]

    cdef struct kvm_fpu:
        uint8_t fpr[8][16]
        uint16_t fcw
        uint16_t fsw
        uint8_t ftwx
        uint16_t last_opcode
        uint64_t last_ip
        uint64_t last_dp
        uint8_t xmm[16][16]
        uint32_t mxcsr

    cdef struct kvm_xsave:
        uint32_t region[1024]

    cdef struct kvm_xcr:
        uint32_t xcr
        uint64_t value

    cdef struct kvm_xcrs:
        uint32_t nr_xcrs
        uint32_t flags
        kvm_xcr xcrs[16]

    cdef struct kvm_msr_entry:
        uint32_t index
        uint32_t reserved
        uint64_t data

    cdef struct kvm_msrs:
        uint32_t nmsrs
        uint32_t pad
        kvm_msr_entry entries[1]    # flexible array

    cdef struct kvm_msr_list:
        uint32_t nmsrs
        uint32_t indices[1]         # flexible array

    cdef struct _kvm_vcpu_events_exception:
        uint8_t injected
        uint8_t nr
        uint8_t has_error_code
        uint8_t pending
        uint32_t error_code

    cdef struct _kvm_vcpu_events_interrupt:
        uint8_t injected
        uint8_t nr
        uint8_t soft
        uint8_t shadow

    cdef struct _kvm_vcpu_events_nmi:
        uint8_t injected
        uint8_t pending
        uint8_t masked

    cdef struct kvm_vcpu_events:
        _kvm_vcpu_events_exception exception
        _kvm_vcpu_events_interrupt interrupt
        _kvm_vcpu_events_nmi nmi
        uint32_t sipi_vector
        uint32_t flags
        uint8_t exception_has_payload
        uint64_t exception_payload

    cdef struct kvm_mp_state:
        uint32_t mp_state
    cdef struct kvm_sync_regs:
        kvm_regs regs
        kvm_sregs sregs
        kvm_vcpu_events events
    cdef struct _kvm_run_sync:
        kvm_sync_regs regs
    # ---- kvm_run (the shared page of a vCPU); the exit union is unnamed in C ------
    cdef struct _kvm_run_hw:
        uint64_t hardware_exit_reason

    cdef struct _kvm_run_fail_entry:
        uint64_t hardware_entry_failure_reason
        uint32_t cpu

    cdef struct _kvm_run_ex:
        uint32_t exception
        uint32_t error_code

    cdef struct _kvm_run_io:
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset        # relative to the start of kvm_run

    cdef struct _kvm_run_mmio:
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write

    cdef struct _kvm_run_internal:
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]

    cdef struct _kvm_run_system_event:
        uint32_t type
        uint32_t ndata

    cdef struct kvm_run:
        uint8_t request_interrupt_window
        uint8_t immediate_exit
        uint32_t exit_reason
        uint8_t ready_for_interrupt_injection
        uint8_t if_flag
        uint16_t flags
        uint64_t cr8
        uint64_t apic_base
        _kvm_run_hw hw
        _kvm_run_fail_entry fail_entry
        _kvm_run_ex ex
        _kvm_run_io io
        _kvm_run_mmio mmio
        _kvm_run_internal internal
        _kvm_run_system_event system_event
        # KVM_CAP_SYNC_REGS: the classes set in kvm_valid_regs are stored in s.regs at
        # every exit from KVM_RUN (s is an unnamed union in C)
        uint64_t kvm_valid_regs
        uint64_t kvm_dirty_regs
        _kvm_run_sync s


    cdef struct kvm_debugregs:
        uint64_t db[4]
        uint64_t dr6
        uint64_t dr7
        uint64_t flags

    cdef struct kvm_cpuid_entry2:
        uint32_t function
        uint32_t index
        uint32_t flags
        uint32_t eax
        uint32_t ebx
        uint32_t ecx
        uint32_t edx

    cdef struct kvm_cpuid2:
        uint32_t nent
        uint32_t padding
        kvm_cpuid_entry2 entries[1]  # flexible array
