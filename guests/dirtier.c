/* dirtier: a benchmark workload that writes guest pages and reports how much work it got
 * done: "progress <units> <clock_ns>" about every 200 ms.
 *
 *   pattern=hot (default)  each unit is a pass writing the same `wss` pages (cmdline
 *                          wss=N, default 1000): a hot working set rewritten all the time
 *   pattern=scan           every `interval` ms (default 200) write the next `wss` pages of
 *                          a ring over all RAM above the image: pages not written
 *                          recently (a log, a bulk load); a unit is a fixed piece of
 *                          computation, so progress measures what is left for the guest
 *   pattern=random         each unit writes `wss` pages picked at random among the first
 *                          `span` pages of the region (default 4 * wss)
 * Every write stores 8 bytes at the start of a page. */
#include "guest.h"

const char guest_name[] = "dirtier";

#define REGION_BASE 0x1000000UL         /* 16 MiB */
#define PERIOD_NS 200000000UL
#define WORK_ITERATIONS 20000           /* one unit of the scan pattern's computation */

enum { HOT, SCAN, RANDOM };

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

static void too_big(const char *what, uint64_t value, uint64_t limit)
{
    char msg[160], *p = msg;
    append(&p, "dirtier: ");
    append(&p, what);
    p = fmt_u64(p, value);
    append(&p, " pages does not fit in RAM (at most ");
    p = fmt_u64(p, limit);
    append(&p, ")\n");
    *p = 0;
    panic(PANIC_NO_MEMORY, msg);
}

static uint64_t arg_u64(const char *key, uint64_t dflt)
{
    char arg[32];
    uint64_t v = dflt;
    if (cmdline_get(key, arg, sizeof(arg)) && !parse_u64(arg, &v)) {
        char msg[96], *p = msg;
        append(&p, "dirtier: ");
        append(&p, key);
        append(&p, "= must be a decimal number\n");
        *p = 0;
        panic(PANIC_BAD_ARG, msg);
    }
    return v;
}

static volatile uint64_t work_sink;

static void work_unit(void)
{
    uint64_t x = work_sink;
    for (uint32_t i = 0; i < WORK_ITERATIONS; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    work_sink = x;
}

int guest_main(void)
{
    char arg[32], msg[160], *p;
    uint64_t end = ram_end();
    uint64_t base = ((uintptr_t)__image_end + 4095) & ~4095UL;
    if (base < REGION_BASE)
        base = REGION_BASE;
    uint64_t room = end > base ? (end - base) / 4096 : 0;
    uint64_t wss = arg_u64("wss", 1000);
    uint64_t interval_ms = arg_u64("interval", 200);
    int pattern = HOT;
    if (cmdline_get("pattern", arg, sizeof(arg))) {
        if (!memcmp(arg, "scan", 5))
            pattern = SCAN;
        else if (!memcmp(arg, "random", 7))
            pattern = RANDOM;
        else if (memcmp(arg, "hot", 4))
            panic(PANIC_BAD_ARG, "dirtier: pattern= must be hot, scan or random\n");
    }
    uint64_t span = arg_u64("span", 4 * wss);
    if (!end || wss > room)
        too_big("wss=", wss, room);
    if (pattern == RANDOM && span > room)
        too_big("span=", span, room);
    if (pattern == RANDOM && (span == 0 || span < wss))
        panic(PANIC_BAD_ARG, "dirtier: span= must be at least wss= (and not 0)\n");
    if (pattern == SCAN && !interval_ms)
        panic(PANIC_BAD_ARG, "dirtier: interval= must be at least 1 ms\n");
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
    uint64_t scan_pos = 0, scan_round = 0, scan_next_ns = c1, rnd = 0x9E3779B97F4A7C15UL;
    for (;;) {
        if (pattern == HOT) {
            for (uint64_t i = 0; i < wss; i++)
                region[i * 512] = passes;      /* 8 bytes at the start of each page */
        } else if (pattern == RANDOM) {
            for (uint64_t i = 0; i < wss; i++) {
                rnd ^= rnd << 13;
                rnd ^= rnd >> 7;
                rnd ^= rnd << 17;
                region[(rnd % span) * 512] = passes ^ rnd;
            }
        } else {
            work_unit();
        }
        passes++;
        uint64_t now_tsc = rdtsc();
        int64_t ahead = (int64_t)(check_tsc - now_tsc);
        if (ahead > 0 && (uint64_t)ahead <= 2 * ticks)
            continue;                           /* not yet (a TSC that jumped back: check) */
        uint64_t now = clock_ns();
        if (pattern == SCAN && now >= scan_next_ns) {
            /* the next wss pages of the ring: none of them was written for a while */
            scan_round++;
            for (uint64_t i = 0; i < wss; i++) {
                region[scan_pos * 512] = scan_round;
                if (++scan_pos == room)
                    scan_pos = 0;
            }
            scan_next_ns += interval_ms * 1000000UL;
            if (scan_next_ns < now)
                scan_next_ns = now + interval_ms * 1000000UL;
        }
        if (now < next_ns) {                    /* TSC ran ahead: look again a bit later */
            uint64_t until = next_ns;
            if (pattern == SCAN && scan_next_ns < until)
                until = scan_next_ns;
            check_tsc = now_tsc + ticks * ((until - now) / 1000) / (PERIOD_NS / 1000) + 1;
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
        uint64_t until = next_ns;
        if (pattern == SCAN && scan_next_ns < until)
            until = scan_next_ns;
        check_tsc = now_tsc + ticks * ((until > now ? until - now : 0) / 1000) / (PERIOD_NS / 1000) + 1;
    }
}
