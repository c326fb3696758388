/* colocore guests: the CPL-0 part (boot message, exceptions, CPL-3 panics).
 * Runs emulated under kvm_pvm (~1 us per instruction): only boot and error paths. */
#include "guest.h"

#define COM1 0x3f8

struct exc_frame {
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* 16 bytes at a time (the 16550 FIFO), waiting for THRE before each burst:
 * one LSR read plus one string-OUT exit per 16 characters. */
static void com1_write(const char *s, uint64_t n)
{
    while (n) {
        uint64_t chunk = n < 16 ? n : 16;
        for (int spin = 0; spin < 100000 && !(inb(COM1 + 5) & 0x20); spin++)
            ;
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(chunk) : "d"(COM1) : "memory");
        n -= n < 16 ? n : 16;
    }
}

static uint64_t kstrlen(const char *s)
{
    uint64_t n = 0;
    while (s[n])
        n++;
    return n;
}

static char *kcat(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

/* Numbers are formatted by lib.c's fmt_hex/fmt_u64: one image, one identity map, and no
 * SMAP, so CPL-0 code may call them. */

static void __attribute__((noreturn)) kern_halt(uint32_t code)
{
    *(volatile uint32_t *)(PLAT_BASE + PLAT_PANIC) = code;
    for (;;)
        __asm__ volatile("cli; hlt");
}

void kern_boot_msg(void)
{
    char buf[96], *p = buf;
    outb(COM1 + 2, 0x07);              /* FCR: enable + clear the FIFOs */
    p = kcat(p, "colocore guest ");
    p = kcat(p, guest_name);
    p = kcat(p, " booting\n");
    com1_write(buf, p - buf);
}

/* CPL 3 cannot do port I/O, and under kvm_pvm `int n` from CPL 3 raises #UD, so a
 * CPL-3 panic stores its message and code here and executes ud2 (see panic() in lib.c):
 * the #UD handler prints the message on COM1 and halts with that PANIC code. */
const char *volatile user_panic_msg;
volatile uint32_t user_panic_code;

void kern_exception(struct exc_frame *f)
{
    char buf[160], *p = buf;
    uint64_t cr2;
    if (f->vector == 6 && (f->cs & 3) && user_panic_code) {
        const char *msg = user_panic_msg;
        if (msg)
            com1_write(msg, kstrlen(msg));
        kern_halt(user_panic_code);
    }
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    p = kcat(p, "colocore guest: exception ");
    p = fmt_u64(p, f->vector);
    p = kcat(p, " at RIP=");
    p = fmt_hex(p, f->rip);
    p = kcat(p, " CR2=");
    p = fmt_hex(p, cr2);
    p = kcat(p, " error=");
    p = fmt_hex(p, f->error);
    p = kcat(p, (f->cs & 3) ? " (CPL 3)\n" : " (CPL 0)\n");
    com1_write(buf, p - buf);
    kern_halt(PANIC_EXCEPTION + (uint32_t)f->vector);
}

