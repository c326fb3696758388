/*
 * colocore guest boot code: Multiboot v1 header, the "colocore" ELF note, the 32-bit
 * Multiboot entry (switches to long mode itself), the colocore 64-bit entry, the
 * exception/syscall stubs and the drop to CPL 3.  Everything at CPL 0 is kept tiny:
 * under kvm_pvm every CPL-0 instruction is emulated.  See docs/DESIGN.md.
 */
#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00000003      /* bit 0: page-align modules, bit 1: memory info */
#define KCODE           0x08
#define KDATA           0x10
#define UDATA           0x1b            /* 0x18 | RPL 3 */
#define UCODE           0x23            /* 0x20 | RPL 3 */
#define TSS_SEL         0x28

/* ---- Multiboot v1 header: first thing in the image (well inside the first 8 KiB) ---- */
        .section .multiboot, "a"
        .p2align 2
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

/* ---- ELF note: owner "colocore", type 1, desc = physical address of entry64 ---- */
        .section .note.colocore, "a"
        .p2align 2
        .long   9                       /* namesz: "colocore\0" */
        .long   4                       /* descsz */
        .long   1                       /* type: 64-bit entry */
        .asciz  "colocore"
        .p2align 2
        .long   entry64

/* ---- 32-bit Multiboot entry: protected mode, paging off ---- */
        .section .text.boot32, "ax"
        .code32
        .globl  _start32
_start32:
        cli
        cld
        movl    %eax, mb_magic
        movl    %ebx, mb_info
        movl    $kstack_top, %esp
        /* zero our PML4 + PDPT (bss should already be zero; do not rely on it) */
        movl    $boot_pml4, %edi
        xorl    %eax, %eax
        movl    $(2 * 4096 / 4), %ecx
        rep stosl
        /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; PDs: 2048 x 2 MiB, P|W|U|PS */
        movl    $boot_pdpt + 7, boot_pml4
        movl    $boot_pd + 7, %eax
        movl    $boot_pdpt, %edi
        movl    $4, %ecx
1:      movl    %eax, (%edi)
        movl    $0, 4(%edi)
        addl    $4096, %eax
        addl    $8, %edi
        loop    1b
        movl    $boot_pd, %edi
        movl    $0x87, %eax
        movl    $2048, %ecx
2:      movl    %eax, (%edi)
        movl    $0, 4(%edi)
        addl    $0x200000, %eax
        addl    $8, %edi
        loop    2b
        /* CR4.PAE, CR3, EFER.LME, CR0.PG|PE, then a far jump into 64-bit code */
        movl    %cr4, %eax
        orl     $0x20, %eax
        movl    %eax, %cr4
        movl    $boot_pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx
        rdmsr
        orl     $0x100, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $KCODE, $from32

        .code64
from32:
        movl    mb_magic(%rip), %eax
        movl    mb_info(%rip), %ebx
        /* fall through into the common 64-bit path */

/* ---- colocore 64-bit entry (CPU state: docs/DESIGN.md) ---- */
        .globl  entry64
entry64:
        cli
        cld
        movl    %eax, mb_magic(%rip)
        movl    %ebx, mb_info(%rip)
        movl    $kstack_top, %esp
        lgdt    gdt_ptr(%rip)
        pushq   $KCODE
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:      movl    $KDATA, %eax
        movl    %eax, %ss
        movl    %eax, %ds
        movl    %eax, %es
        xorl    %eax, %eax
        movl    %eax, %fs
        movl    %eax, %gs
        lidt    idt_ptr(%rip)
        movl    $TSS_SEL, %eax
        ltr     %ax
        call    kern_boot_msg
        /* drop to CPL 3: IF=0, user stack, user code */
        xorl    %eax, %eax
        movl    %eax, %ds
        movl    %eax, %es
        pushq   $UDATA
        pushq   $ustack_top
        pushq   $0x2
        pushq   $UCODE
        pushq   $user_start
        iretq

/* ---- CPL 3 start: call the guest's main, report EXIT if it ever returns ---- */
        .text
user_start:
        xorl    %ebp, %ebp
        call    guest_main
        movl    $0xD0001010, %edx
        movl    %eax, (%rdx)            /* EXIT (status = return value) */
        movl    $0xD0001000, %edx
3:      movl    (%rdx), %eax            /* WAIT: idle forever */
        jmp     3b

/* ---- IDT stubs: 16 bytes each, all inside one 4 KiB-aligned block so the linker can
 *      build the IDT from isr_base (guest.ld). ---- */
        .section .isr, "ax"
        .p2align 12
        .globl  isr_base
isr_base:
        .irp    vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .org    isr_base + \vec * 16
        .if     (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq   $0                      /* no CPU error code: push a dummy */
        .endif
        pushq   $\vec
        jmp     exc_common
        .endr
        .org    isr_base + 32 * 16

        .text
exc_common:
        movq    %rsp, %rdi              /* -> struct exc_frame */
        andq    $-16, %rsp
        call    kern_exception          /* never returns */
4:      cli
        hlt
        jmp     4b

/* ---- descriptor tables ---- */
        .data
        .p2align 4
gdt:
        .quad   0
        .quad   0x00AF9B000000FFFF      /* 0x08 kernel code, 64-bit */
        .quad   0x00CF93000000FFFF      /* 0x10 kernel data */
        .quad   0x00CFF3000000FFFF      /* 0x18 user data (DPL 3) */
        .quad   0x00AFFB000000FFFF      /* 0x20 user code, 64-bit (DPL 3) */
        .word   0x67                    /* 0x28 64-bit TSS (available), 16 bytes */
        .word   __tss_b0_15
        .byte   __tss_b16_23
        .byte   0x89
        .byte   0x00
        .byte   __tss_b24_31
        .long   0
        .long   0
gdt_end:
        .p2align 3
        .word   0
        .word   0
        .word   0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt

        .p2align 4
        .globl  tss
tss:
        .long   0
        .quad   kstack_top              /* rsp0 */
        .quad   0                       /* rsp1 */
        .quad   0                       /* rsp2 */
        .quad   0                       /* reserved */
        .quad   exc_stack_top           /* ist1 */
        .quad   0, 0, 0, 0, 0, 0        /* ist2..ist7 */
        .quad   0                       /* reserved */
        .word   0
        .word   104                     /* I/O map base = limit: no I/O bitmap */

        .p2align 4
        /* gates: offset 15:0, selector, IST, type, offset 31:16, offset 63:32, reserved */
        .macro  gate stub, type
        .word   __isr_lo + \stub * 16
        .word   KCODE
        .byte   1
        .byte   \type
        .word   __isr_hi
        .long   0
        .long   0
        .endm
idt:
        .irp    vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        gate    \vec, 0x8E              /* interrupt gate, DPL 0 */
        .endr
idt_end:
        .p2align 3
        .word   0, 0, 0
idt_ptr:
        .word   idt_end - idt - 1
        .quad   idt

        .globl  mb_magic, mb_info
        .p2align 2
mb_magic:
        .long   0
mb_info:
        .long   0

/* ---- stacks and the 32-bit path's page tables ---- */
        .bss
        .p2align 12
boot_pml4:
        .skip   4096
boot_pdpt:
        .skip   4096
boot_pd:
        .skip   4 * 4096
        .skip   16384
kstack_top:
        .skip   8192
exc_stack_top:
        .skip   65536
ustack_top:

        .section .note.GNU-stack, "", @progbits
