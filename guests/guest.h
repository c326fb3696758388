/* colocore guests: shared declarations (freestanding, no libc). */
#ifndef COLOCORE_GUEST_H
#define COLOCORE_GUEST_H

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef unsigned long uintptr_t;
typedef unsigned long size_t;
typedef long int64_t;

#define NULL ((void *)0)

/* platform registers (docs/DESIGN.md) */
#define PLAT_BASE           0xD0001000UL
#define PLAT_WAIT           0x00
#define PLAT_WAIT_TIMEOUT   0x04
#define PLAT_CLOCK_LO       0x08
#define PLAT_CLOCK_HI       0x0c
#define PLAT_EXIT           0x10
#define PLAT_PANIC          0x14

/* PANIC codes written by the guests */
#define PANIC_EXCEPTION     0x100   /* + vector */
#define PANIC_NO_CONSOLE    0x201   /* virtio console missing or refused the features */
#define PANIC_NO_MEMORY     0x202   /* working set / table does not fit in RAM */
#define PANIC_BAD_ARG       0x203   /* malformed command line argument */
#define PANIC_NO_NIC        0x204   /* virtio-net missing or refused the features */

#define barrier() __asm__ volatile("" ::: "memory")

static inline uint32_t mmio_read32(uintptr_t addr)
{
    return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uintptr_t addr, uint32_t v)
{
    *(volatile uint32_t *)addr = v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* image layout (guest.ld) and boot data (boot.S) */
extern char __image_start[], __image_end[];
extern uint32_t mb_magic, mb_info;
extern const char guest_name[];          /* defined by each guest */
int guest_main(void);                    /* CPL 3 */

/* lib.c: CPL 3 services */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
char *fmt_u64(char *p, uint64_t v);      /* decimal, returns end */
char *fmt_hex(char *p, uint64_t v);      /* 0x..., returns end */

uint64_t clock_ns(void);
uint32_t plat_wait(void);
/* print msg on COM1 (CPL 0 does it, entered through ud2) and write PANIC = code */
void panic(uint32_t code, const char *msg) __attribute__((noreturn));
extern const char *volatile user_panic_msg;
extern volatile uint32_t user_panic_code;

uint64_t ram_end(void);                  /* from the multiboot memory info */
/* cmdline "key=value": copies value into out (NUL terminated); 1 if found */
int cmdline_get(const char *key, char *out, size_t outsz);
int parse_u64(const char *s, uint64_t *out);

/* virtio-mmio console */
void con_init(void);
/* hand every received chunk to fn; re-post the buffers; returns bytes consumed */
uint32_t con_poll(void (*fn)(const char *data, uint32_t len));
void con_write(const char *data, uint32_t len);
void con_puts(const char *s);
void con_flush(void);                    /* one QueueNotify for everything pending */
void con_kick_rx(void);                  /* QueueNotify(0): ask for input without WAIT */

/* line assembly: splits console input into lines (\n, tolerating \r\n) */
#define LINE_MAX 160
typedef void (*line_fn)(char *line, uint32_t len, int too_long);
void lines_feed(const char *data, uint32_t len);
extern line_fn lines_handler;

#endif
