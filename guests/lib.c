/* colocore guests: CPL-3 runtime (strings, platform registers, command line, the
 * virtio-mmio console driver, line assembly). */
#include "guest.h"
#include "virtio_mmio.h"

/* ---- freestanding libc bits (gcc may emit calls to these) ---- */

void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return ret;
}

void *memmove(void *d, const void *s, size_t n)
{
    unsigned char *dp = d;
    const unsigned char *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

char *fmt_u64(char *p, uint64_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

char *fmt_hex(char *p, uint64_t v)
{
    int shift = 60;
    *p++ = '0';
    *p++ = 'x';
    while (shift > 0 && !((v >> shift) & 0xf))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        *p++ = "0123456789abcdef"[(v >> shift) & 0xf];
    return p;
}

/* ---- platform ---- */

uint64_t clock_ns(void)
{
    uint32_t lo = mmio_read32(PLAT_BASE + PLAT_CLOCK_LO);   /* latches HI */
    uint32_t hi = mmio_read32(PLAT_BASE + PLAT_CLOCK_HI);
    return ((uint64_t)hi << 32) | lo;
}

uint32_t plat_wait(void)
{
    return mmio_read32(PLAT_BASE + PLAT_WAIT);
}

void panic(uint32_t code, const char *msg)
{
    user_panic_msg = msg;
    user_panic_code = code;
    __asm__ volatile("ud2" : : : "memory");      /* -> #UD handler at CPL 0 (kern.c) */
    for (;;) {                                   /* not reached: CPL 0 halts */
        mmio_write32(PLAT_BASE + PLAT_PANIC, code);
        plat_wait();
    }
}

/* ---- multiboot info ---- */

uint64_t ram_end(void)
{
    const volatile uint32_t *info = (const volatile uint32_t *)(uintptr_t)mb_info;
    if (!mb_info || !(info[0] & 1))
        return 0;
    return 0x100000UL + (uint64_t)info[2] * 1024;   /* mem_upper: KiB above 1 MiB */
}

int cmdline_get(const char *key, char *out, size_t outsz)
{
    const volatile uint32_t *info = (const volatile uint32_t *)(uintptr_t)mb_info;
    if (!mb_info || !(info[0] & 4) || !info[4])
        return 0;
    const char *p = (const char *)(uintptr_t)info[4];
    size_t klen = strlen(key);
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        if ((size_t)(p - tok) > klen && !memcmp(tok, key, klen) && tok[klen] == '=') {
            const char *v = tok + klen + 1;
            size_t n = p - v;
            if (n >= outsz)
                n = outsz - 1;
            memcpy(out, v, n);
            out[n] = 0;
            return 1;
        }
    }
    return 0;
}

int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (!*s)
        return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 0xFFFFFFFFFFFFFFFULL / 10)
            return 0;
        v = v * 10 + (*s - '0');
    }
    *out = v;
    return 1;
}

/* ---- virtio-mmio console (virtio 1.x, split rings, polled) ---- */

#define VIO_BASE            0xD0000000UL

#define QNUM     64                 /* entries per queue (device max is 256) */
#define RX_BUFSZ 256
#define TX_BUFSZ 65536

struct vring_avail { uint16_t flags, idx, ring[QNUM], used_event; };
struct vring_used { uint16_t flags, idx; struct vring_used_elem ring[QNUM]; uint16_t avail_event; };

struct vq {
    struct vring_desc desc[QNUM] __attribute__((aligned(16)));
    struct vring_avail avail __attribute__((aligned(16)));
    struct vring_used used __attribute__((aligned(16)));
    uint16_t avail_idx;             /* driver's shadow of avail.idx */
    uint16_t last_used;
};

static struct vq rxq __attribute__((aligned(4096)));
static struct vq txq __attribute__((aligned(4096)));
static char rx_bufs[QNUM][RX_BUFSZ] __attribute__((aligned(4096)));
static char tx_buf[TX_BUFSZ] __attribute__((aligned(4096)));
static uint32_t tx_len;

static inline uint32_t vio_r(uint32_t off) { return mmio_read32(VIO_BASE + off); }
static inline void vio_w(uint32_t off, uint32_t v) { mmio_write32(VIO_BASE + off, v); }

static void setup_queue(uint32_t index, struct vq *q)
{
    vio_w(VIO_QUEUE_SEL, index);
    if (vio_r(VIO_QUEUE_READY))
        panic(PANIC_NO_CONSOLE, "colocore guest: virtio console queue already live\n");
    if (vio_r(VIO_QUEUE_NUM_MAX) < QNUM)
        panic(PANIC_NO_CONSOLE, "colocore guest: virtio console queue too small\n");
    memset(q, 0, sizeof(*q));
    q->avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    vio_w(VIO_QUEUE_NUM, QNUM);
    vio_w(VIO_QUEUE_DESC_LO, (uint32_t)(uintptr_t)q->desc);
    vio_w(VIO_QUEUE_DESC_HI, (uint32_t)((uintptr_t)q->desc >> 32));
    vio_w(VIO_QUEUE_DRIVER_LO, (uint32_t)(uintptr_t)&q->avail);
    vio_w(VIO_QUEUE_DRIVER_HI, (uint32_t)((uintptr_t)&q->avail >> 32));
    vio_w(VIO_QUEUE_DEVICE_LO, (uint32_t)(uintptr_t)&q->used);
    vio_w(VIO_QUEUE_DEVICE_HI, (uint32_t)((uintptr_t)&q->used >> 32));
    vio_w(VIO_QUEUE_READY, 1);
}

void con_init(void)
{
    if (vio_r(VIO_MAGIC) != 0x74726976 || vio_r(VIO_VERSION) != 2 || vio_r(VIO_DEVICE_ID) != 3)
        panic(PANIC_NO_CONSOLE, "colocore guest: no virtio-mmio console (v2, id 3) at 0xd0000000\n");
    vio_w(VIO_STATUS, 0);                                    /* reset */
    vio_w(VIO_STATUS, ST_ACKNOWLEDGE);
    vio_w(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    vio_w(VIO_DEV_FEATURES_SEL, 1);
    uint32_t hi = vio_r(VIO_DEV_FEATURES);
    vio_w(VIO_DEV_FEATURES_SEL, 0);
    (void)vio_r(VIO_DEV_FEATURES);
    if (!(hi & 1))                                           /* VIRTIO_F_VERSION_1 = bit 32 */
        panic(PANIC_NO_CONSOLE, "colocore guest: virtio console lacks VIRTIO_F_VERSION_1\n");
    vio_w(VIO_DRV_FEATURES_SEL, 0);
    vio_w(VIO_DRV_FEATURES, 0);
    vio_w(VIO_DRV_FEATURES_SEL, 1);
    vio_w(VIO_DRV_FEATURES, 1);
    vio_w(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(vio_r(VIO_STATUS) & ST_FEATURES_OK)) {
        vio_w(VIO_STATUS, ST_FAILED);
        panic(PANIC_NO_CONSOLE, "colocore guest: virtio console refused FEATURES_OK\n");
    }
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    /* post every receive buffer, one descriptor each, device-writable */
    for (uint16_t i = 0; i < QNUM; i++) {
        rxq.desc[i].addr = (uintptr_t)rx_bufs[i];
        rxq.desc[i].len = RX_BUFSZ;
        rxq.desc[i].flags = VRING_DESC_F_WRITE;
        rxq.avail.ring[i] = i;
    }
    rxq.avail_idx = QNUM;
    barrier();
    *(volatile uint16_t *)&rxq.avail.idx = rxq.avail_idx;
    vio_w(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    if (vio_r(VIO_STATUS) & (ST_NEEDS_RESET | ST_FAILED))
        panic(PANIC_NO_CONSOLE, "colocore guest: virtio console failed during setup\n");
    vio_w(VIO_QUEUE_NOTIFY, 0);                              /* receive buffers are up */
}

uint32_t con_poll(void (*fn)(const char *data, uint32_t len))
{
    uint32_t total = 0;
    uint16_t used_idx = *(volatile uint16_t *)&rxq.used.idx;
    if (used_idx == rxq.last_used)
        return 0;
    barrier();
    while (rxq.last_used != used_idx) {
        struct vring_used_elem e = *(volatile struct vring_used_elem *)&rxq.used.ring[rxq.last_used % QNUM];
        if (e.id >= QNUM || e.len > RX_BUFSZ)
            panic(PANIC_NO_CONSOLE, "colocore guest: virtio console returned a bad receive buffer\n");
        fn(rx_bufs[e.id], e.len);
        total += e.len;
        rxq.avail.ring[rxq.avail_idx % QNUM] = (uint16_t)e.id;   /* re-post it */
        rxq.avail_idx++;
        rxq.last_used++;
        if (rxq.last_used == used_idx)
            used_idx = *(volatile uint16_t *)&rxq.used.idx;
    }
    barrier();
    *(volatile uint16_t *)&rxq.avail.idx = rxq.avail_idx;
    /* no notify: the VMM looks at the receive ring during every exit (WAIT, notify) */
    return total ? total : 1;
}

void con_flush(void)
{
    if (!tx_len)
        return;
    uint16_t head = txq.avail_idx % QNUM;
    txq.desc[head].addr = (uintptr_t)tx_buf;
    txq.desc[head].len = tx_len;
    txq.desc[head].flags = 0;
    txq.desc[head].next = 0;
    txq.avail.ring[head] = head;
    txq.avail_idx++;
    barrier();
    *(volatile uint16_t *)&txq.avail.idx = txq.avail_idx;
    barrier();
    vio_w(VIO_QUEUE_NOTIFY, 1);
    /* colocore consumes the chain during the notify; other devices may take a while */
    for (uint32_t spins = 1; *(volatile uint16_t *)&txq.used.idx != txq.avail_idx; spins++) {
        __asm__ volatile("pause");
        if (!(spins & 0xfffff))
            vio_w(VIO_QUEUE_NOTIFY, 1);
    }
    barrier();
    txq.last_used = txq.avail_idx;
    tx_len = 0;
}

void con_kick_rx(void)
{
    vio_w(VIO_QUEUE_NOTIFY, 0);
}

void con_write(const char *data, uint32_t len)
{
    while (len) {
        if (tx_len == TX_BUFSZ)
            con_flush();
        uint32_t n = TX_BUFSZ - tx_len;
        if (n > len)
            n = len;
        memcpy(tx_buf + tx_len, data, n);
        tx_len += n;
        data += n;
        len -= n;
    }
}

void con_puts(const char *s)
{
    con_write(s, strlen(s));
}

/* ---- line assembly ---- */

line_fn lines_handler;
static char line_buf[LINE_MAX];
static uint32_t line_len;
static int line_long;

void lines_feed(const char *data, uint32_t len)
{
    while (len) {
        const char *nl = NULL;
        for (uint32_t i = 0; i < len; i++)
            if (data[i] == '\n') {
                nl = data + i;
                break;
            }
        uint32_t n = nl ? (uint32_t)(nl - data) : len;
        if (!line_long) {
            if (line_len + n <= LINE_MAX) {
                memcpy(line_buf + line_len, data, n);
                line_len += n;
            } else {
                line_long = 1;
            }
        }
        if (!nl)
            return;
        uint32_t l = line_len;
        if (!line_long && l && line_buf[l - 1] == '\r')
            l--;
        lines_handler(line_buf, l, line_long);
        line_len = 0;
        line_long = 0;
        data = nl + 1;
        len -= n + 1;
    }
}
