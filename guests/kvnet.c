/* kvnet: the key-value store of kvstore served over the network as RESP2 (Redis), on
 * virtio-net with kvnet's own TCP/IP stack (netstack.c, resp.c). Configuration from the
 * command line: ip=A.B.C.D/N [gw=A.B.C.D] [port=N] (default port 6379). The virtio
 * console answers PING and STATS (the stack's counters) for diagnostics.
 *
 * The loop: take every received frame (no exit), run the stack and the application,
 * send the batch with one notify; when there was nothing, WAIT (the VMM wakes it when
 * frames or console input arrive). The clock costs two exits, so it is read only when
 * the TSC says ~10 ms went by, or after an idle WAIT; timers have 200 ms granularity
 * at best, so that is plenty. */
#include "guest.h"
#include "kvtable.h"
#include "netdrv.h"
#include "netstack.h"
#include "resp.h"

const char guest_name[] = "kvnet";

#define CLOCK_TSC_STEP (1UL << 25)      /* ~10 ms at 3 GHz */

static uint64_t now_ms, clock_tsc;

static void refresh_clock(void)
{
    now_ms = clock_ns() / 1000000;
    clock_tsc = rdtsc();
}

static void bad_arg(const char *msg)
{
    panic(PANIC_BAD_ARG, msg);
}

static int parse_ip(const char *s, uint32_t *out, const char **end)
{
    uint32_t v = 0;
    for (int part = 0; part < 4; part++) {
        uint32_t octet = 0, digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4) {
            octet = octet * 10 + (uint32_t)(*s++ - '0');
            digits++;
        }
        if (!digits || octet > 255)
            return 0;
        v = v << 8 | octet;
        if (part < 3 && *s++ != '.')
            return 0;
    }
    *out = v;
    *end = s;
    return 1;
}

static void configure(struct net_config *cfg)
{
    char arg[64];
    const char *end;
    uint64_t n;
    if (!cmdline_get("ip", arg, sizeof(arg)))
        bad_arg("kvnet: no address: give --append \"ip=A.B.C.D/N [gw=A.B.C.D] [port=N]\"\n");
    if (!parse_ip(arg, &cfg->ip, &end) || (*end && *end != '/'))
        bad_arg("kvnet: ip= must be A.B.C.D/N, e.g. ip=10.0.0.2/24\n");
    n = 24;
    if (*end == '/' && (!parse_u64(end + 1, &n) || n < 1 || n > 30))
        bad_arg("kvnet: the prefix length of ip= must be 1..30\n");
    cfg->mask = n == 0 ? 0 : 0xffffffffu << (32 - n);
    cfg->gw = 0;
    if (cmdline_get("gw", arg, sizeof(arg)) && (!parse_ip(arg, &cfg->gw, &end) || *end))
        bad_arg("kvnet: gw= must be A.B.C.D\n");
    cfg->port = 6379;
    if (cmdline_get("port", arg, sizeof(arg))) {
        if (!parse_u64(arg, &n) || n < 1 || n > 65535)
            bad_arg("kvnet: port= must be 1..65535\n");
        cfg->port = (uint16_t)n;
    }
}

static void console_line(char *line, uint32_t len, int too_long)
{
    while (len && (line[len - 1] == ' ' || line[len - 1] == '\t'))
        len--;
    if (too_long || len == 0) {
        if (too_long)
            con_puts("ERR line too long\n");
        return;
    }
    if (len == 4 && !memcmp(line, "PING", 4)) {
        con_puts("PONG\n");
    } else if (len == 5 && !memcmp(line, "STATS", 5)) {
        char buf[512], *p = buf;
        static const char *names[] = {"rx_frames", "tx_frames", "rx_dropped", "rx_bad_csum",
            "rx_runt", "arp_replies", "icmp_echo", "tcp_rst_sent", "tcp_retransmits",
            "tcp_accepted", "tcp_syn_evicted", "tcp_tw_reused", "conns_open"};
        const uint64_t *v = (const uint64_t *)&net_stats;
        for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            const char *s = names[i];
            while (*s)
                *p++ = *s++;
            *p++ = '=';
            p = fmt_u64(p, v[i]);
            *p++ = ' ';
        }
        memcpy(p, "keys=", 5);
        p = fmt_u64(p + 5, kv_count());
        *p++ = '\n';
        con_write(buf, (uint32_t)(p - buf));
    } else {
        con_puts("ERR unknown command (kvnet serves RESP over TCP; the console knows PING, STATS)\n");
    }
}

int guest_main(void)
{
    struct net_config cfg;
    uint32_t wait_us = 0;
    configure(&cfg);
    kv_setup("kvnet");
    con_init();
    lines_handler = console_line;
    netdrv_init(cfg.mac);
    net_init(&cfg);
    resp_init(cfg.port);
    refresh_clock();
    net_announce(now_ms);
    netdrv_flush();
    for (;;) {
        uint32_t frames = netdrv_poll(net_input, now_ms);
        uint32_t con = con_poll(lines_feed);
        if (rdtsc() - clock_tsc > CLOCK_TSC_STEP)
            refresh_clock();
        if (frames)
            net_output(now_ms);
        uint64_t next = net_next_timer();
        if (next && next <= now_ms) {
            net_timers(now_ms);
            net_output(now_ms);
        }
        netdrv_flush();
        con_flush();
        if (frames || con)
            continue;
        /* idle: sleep until input, or until the next timer is near */
        uint32_t want = 50000;
        if (next) {
            uint64_t d = next > now_ms ? next - now_ms : 0;
            want = d >= 50 ? 50000 : d < 10 ? 10000 : (uint32_t)(d / 10 * 10000);
        }
        if (want != wait_us) {
            mmio_write32(PLAT_BASE + PLAT_WAIT_TIMEOUT, want);
            wait_us = want;
        }
        uint32_t r = plat_wait();
        if (r & WAIT_NET_EVENT) {
            if (netdrv_status() & NET_STATUS_ANNOUNCE) {
                refresh_clock();
                net_announce(now_ms);
            }
        }
        if (!(r & ~WAIT_NET_EVENT))
            refresh_clock();            /* an idle WAIT: the clock costs nothing now */
    }
}
