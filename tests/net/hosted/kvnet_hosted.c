/* kvnet's network stack and RESP server (guests/netstack.c, resp.c, kvtable.c) built
 * as a Linux program on a tap device, with AddressSanitizer: the same sources as the
 * guest, so tests can drive them with real clients in a network namespace and catch
 * memory errors the freestanding guest would hide. Used by tests/net/test_hosted.py.
 *
 *     kvnet_hosted TAPNAME MAC ip=A.B.C.D/N [gw=A.B.C.D] [port=N]
 *
 * It creates the tap (non-persistent: it goes away with the process); the caller brings
 * it up and attaches it. Stops on SIGTERM/SIGINT. */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "kvtable.h"
#include "netstack.h"
#include "resp.h"

static int tap_fd = -1;
static uint8_t tx_frames[64][ETH_FRAME_MAX + 64];
static uint32_t tx_lens[64], tx_count;
static volatile sig_atomic_t stop;

uint64_t clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void flush(void)
{
    for (uint32_t i = 0; i < tx_count; i++)
        if (write(tap_fd, tx_frames[i], tx_lens[i]) < 0 && errno != EAGAIN)
            perror("kvnet_hosted: write to tap");
    tx_count = 0;
}

uint8_t *drv_tx_buffer(void)
{
    if (tx_count == 64)
        flush();
    return tx_frames[tx_count];
}

void drv_tx_commit(uint8_t *buf, uint32_t len)
{
    (void)buf;
    tx_lens[tx_count++] = len;
}

static int parse_ip(const char *s, uint32_t *out)
{
    unsigned a, b, c, d;
    if (sscanf(s, "%u.%u.%u.%u", &a, &b, &c, &d) != 4 || a > 255 || b > 255 || c > 255 || d > 255)
        return 0;
    *out = a << 24 | b << 16 | c << 8 | d;
    return 1;
}

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv)
{
    struct net_config cfg = {.port = 6379};
    unsigned m[6];
    if (argc < 4 || sscanf(argv[2], "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6) {
        fprintf(stderr, "usage: %s TAP MAC ip=A.B.C.D/N [gw=A.B.C.D] [port=N]\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (int i = 0; i < 6; i++)
        cfg.mac[i] = (uint8_t)m[i];
    for (int i = 3; i < argc; i++) {
        if (!strncmp(argv[i], "ip=", 3)) {
            char *slash = strchr(argv[i], '/');
            int plen = slash ? atoi(slash + 1) : 24;
            if (slash)
                *slash = 0;
            if (!parse_ip(argv[i] + 3, &cfg.ip) || plen < 1 || plen > 30) {
                fprintf(stderr, "kvnet_hosted: bad %s\n", argv[i]);
                return 2;
            }
            cfg.mask = 0xffffffffu << (32 - plen);
        } else if (!strncmp(argv[i], "gw=", 3)) {
            if (!parse_ip(argv[i] + 3, &cfg.gw))
                return 2;
        } else if (!strncmp(argv[i], "port=", 5)) {
            cfg.port = (uint16_t)atoi(argv[i] + 5);
        }
    }
    tap_fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (tap_fd < 0) {
        perror("kvnet_hosted: /dev/net/tun");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
    if (ioctl(tap_fd, TUNSETIFF, &ifr) < 0) {
        perror("kvnet_hosted: TUNSETIFF");
        return 1;
    }
    uint64_t slots = 65536;
    void *table = calloc(slots, sizeof(struct kv_entry));
    uint64_t *bitmap = calloc((slots * sizeof(struct kv_entry) / 4096 + 64) / 64, 8);
    kv_init(table, slots, bitmap);
    net_init(&cfg);
    resp_init(cfg.port);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("kvnet_hosted: serving on %s\n", argv[1]);
    fflush(stdout);
    static uint8_t frame[65536];
    while (!stop) {
        uint64_t now = now_ms(), next = net_next_timer();
        int timeout = 50;
        if (next)
            timeout = next <= now ? 0 : (int)(next - now < 50 ? next - now : 50);
        struct pollfd pfd = {.fd = tap_fd, .events = POLLIN};
        if (poll(&pfd, 1, timeout) < 0 && errno != EINTR)
            break;
        now = now_ms();
        int frames = 0;
        for (;;) {
            ssize_t n = read(tap_fd, frame, sizeof(frame));
            if (n < 0)
                break;
            net_input(frame, (uint32_t)n, now);
            frames++;
        }
        if (frames)
            net_output(now);
        next = net_next_timer();
        if (next && next <= now) {
            net_timers(now);
            net_output(now);
        }
        flush();
    }
    printf("kvnet_hosted: stopped, %llu frames in, %llu out\n",
           (unsigned long long)net_stats.rx_frames, (unsigned long long)net_stats.tx_frames);
    return 0;
}
