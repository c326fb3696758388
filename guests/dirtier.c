/* dirtier: a benchmark workload that dirties `wss` pages (cmdline wss=N, default 1000)
 * per pass, forever, and prints "progress <passes> <clock_ns>" about every 200 ms. */
#include "guest.h"

const char guest_name[] = "dirtier";

#define REGION_BASE 0x1000000UL         /* 16 MiB */
#define PERIOD_NS 200000000UL

static void handle_line(char *line, uint32_t len, int too_long)
{
    while (len && (line[len - 1] == ' ' || line[len - 1] == '\t'))
        len--;
    if (!too_long && len == 0)
        return;
    if (!too_long && len == 4 && !memcmp(line, "PING", 4))
        con_puts("PONG\n");
    else
        con_puts("ERR unknown command\n");
}

static void append(char **p, const char *s)
{
    size_t n = strlen(s);
    memcpy(*p, s, n);
    *p += n;
}

int guest_main(void)
{
    char arg[32], msg[160], *p;
    uint64_t wss = 1000, end = ram_end();
    uint64_t base = ((uintptr_t)__image_end + 4095) & ~4095UL;
    if (base < REGION_BASE)
        base = REGION_BASE;
    if (cmdline_get("wss", arg, sizeof(arg)) && !parse_u64(arg, &wss))
        panic(PANIC_BAD_ARG, "dirtier: wss= must be a decimal number of pages\n");
    if (!end || wss > (end - base) / 4096 || end < base) {
        p = msg;
        append(&p, "dirtier: wss=");
        p = fmt_u64(p, wss);
        append(&p, " pages does not fit in RAM (at most ");
        p = fmt_u64(p, end > base ? (end - base) / 4096 : 0);
        append(&p, ")\n");
        *p = 0;
        panic(PANIC_NO_MEMORY, msg);
    }
    con_init();
    lines_handler = handle_line;

    /* calibrate the TSC once against CLOCK; rdtsc only decides when to read CLOCK */
    uint64_t c0 = clock_ns(), t0 = rdtsc(), c1, t1;
    do {
        t1 = rdtsc();
    } while (t1 - t0 < 20000000UL);             /* a few ms on any recent CPU */
    c1 = clock_ns();
    t1 = rdtsc();
    uint64_t ticks = (c1 > c0) ? (t1 - t0) * (PERIOD_NS / 1000) / ((c1 - c0) / 1000 + 1) : 400000000UL;
    if (ticks < 1000)
        ticks = 1000;

    uint64_t passes = 0, next_ns = c1 + PERIOD_NS, check_tsc = t1 + ticks;
    uint64_t last_ns = c1, last_tsc = t1;
    volatile uint64_t *region = (volatile uint64_t *)base;
    for (;;) {
        for (uint64_t i = 0; i < wss; i++)
            region[i * 512] = passes;          /* 8 bytes at the start of each page */
        passes++;
        uint64_t now_tsc = rdtsc();
        int64_t ahead = (int64_t)(check_tsc - now_tsc);
        if (ahead > 0 && (uint64_t)ahead <= 2 * ticks)
            continue;                           /* not yet (a TSC that jumped back: check) */
        uint64_t now = clock_ns();
        if (now < next_ns) {                    /* TSC ran ahead: look again a bit later */
            check_tsc = now_tsc + ticks * ((next_ns - now) / 1000) / (PERIOD_NS / 1000) + 1;
            continue;
        }
        p = msg;
        append(&p, "progress ");
        p = fmt_u64(p, passes);
        *p++ = ' ';
        p = fmt_u64(p, now);
        *p++ = '\n';
        con_write(msg, p - msg);
        con_flush();
        con_kick_rx();                          /* let the VMM deliver input (no WAIT here) */
        if (con_poll(lines_feed))
            con_flush();
        /* re-estimate TSC ticks per period from the last interval (tolerates TSC jumps) */
        if (now > last_ns && now - last_ns < 4 * PERIOD_NS && now_tsc > last_tsc) {
            uint64_t est = (now_tsc - last_tsc) * (PERIOD_NS / 1000) / ((now - last_ns) / 1000 + 1);
            if (est > 1000)
                ticks = (3 * ticks + est) / 4;
        }
        last_ns = now;
        last_tsc = now_tsc;
        next_ns = (now - next_ns >= PERIOD_NS) ? now + PERIOD_NS : next_ns + PERIOD_NS;
        check_tsc = now_tsc + ticks * ((next_ns - now) / 1000) / (PERIOD_NS / 1000) + 1;
    }
}
