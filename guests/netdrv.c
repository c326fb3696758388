/* kvnet's virtio-net driver: 256 receive buffers of 2 KiB posted once and re-posted
 * after use, 256 transmit slots with their own buffers; every buffer starts with the
 * 12-byte virtio_net_hdr (VERSION_1 layout), all zero. No interrupts: the device fills
 * receive buffers during any exit (WAIT, a notify), and consumes every transmit slot
 * made available when QueueNotify(1) is written, before the write returns. */
#include "netdrv.h"
#include "netstack.h"
#include "virtio_mmio.h"

#define NQ       256
#define BUFSZ    2048
#define VNET_HDR 12

struct vring_avail_n { uint16_t flags, idx, ring[NQ], used_event; };
struct vring_used_n { uint16_t flags, idx; struct vring_used_elem ring[NQ]; uint16_t avail_event; };

struct nvq {
    struct vring_desc desc[NQ] __attribute__((aligned(16)));
    struct vring_avail_n avail __attribute__((aligned(16)));
    struct vring_used_n used __attribute__((aligned(16)));
    uint16_t avail_idx, last_used;
};

static struct nvq rxq __attribute__((aligned(4096)));
static struct nvq txq __attribute__((aligned(4096)));
static uint8_t rx_bufs[NQ][BUFSZ] __attribute__((aligned(4096)));
static uint8_t tx_bufs[NQ][BUFSZ] __attribute__((aligned(4096)));
static uint32_t tx_pending;          /* committed, not yet notified */

static inline uint32_t nr(uint32_t off) { return mmio_read32(NET_MMIO_BASE + off); }
static inline void nw(uint32_t off, uint32_t v) { mmio_write32(NET_MMIO_BASE + off, v); }

static void setup_queue(uint32_t index, struct nvq *q)
{
    nw(VIO_QUEUE_SEL, index);
    if (nr(VIO_QUEUE_NUM_MAX) < NQ)
        panic(PANIC_NO_NIC, "kvnet: virtio-net queue too small\n");
    memset(q, 0, sizeof(*q));
    q->avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    nw(VIO_QUEUE_NUM, NQ);
    nw(VIO_QUEUE_DESC_LO, (uint32_t)(uintptr_t)q->desc);
    nw(VIO_QUEUE_DESC_HI, (uint32_t)((uintptr_t)q->desc >> 32));
    nw(VIO_QUEUE_DRIVER_LO, (uint32_t)(uintptr_t)&q->avail);
    nw(VIO_QUEUE_DRIVER_HI, (uint32_t)((uintptr_t)&q->avail >> 32));
    nw(VIO_QUEUE_DEVICE_LO, (uint32_t)(uintptr_t)&q->used);
    nw(VIO_QUEUE_DEVICE_HI, (uint32_t)((uintptr_t)&q->used >> 32));
    nw(VIO_QUEUE_READY, 1);
}

void netdrv_init(uint8_t mac[6])
{
    if (nr(VIO_MAGIC) != 0x74726976 || nr(VIO_VERSION) != 2 || nr(VIO_DEVICE_ID) != 1)
        panic(PANIC_NO_NIC, "kvnet: no virtio-net device (virtio-mmio v2, id 1) at 0xd0000200: "
                            "start the node with --nic tap,ifname=NAME\n");
    nw(VIO_STATUS, 0);
    nw(VIO_STATUS, ST_ACKNOWLEDGE);
    nw(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    nw(VIO_DEV_FEATURES_SEL, 1);
    uint32_t hi = nr(VIO_DEV_FEATURES);
    nw(VIO_DEV_FEATURES_SEL, 0);
    uint32_t lo = nr(VIO_DEV_FEATURES);
    if (!(hi & 1) || !(lo & (1u << 5)))
        panic(PANIC_NO_NIC, "kvnet: virtio-net lacks VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MAC\n");
    nw(VIO_DRV_FEATURES_SEL, 0);
    nw(VIO_DRV_FEATURES, lo & ((1u << 5) | (1u << 16)));    /* MAC, STATUS */
    nw(VIO_DRV_FEATURES_SEL, 1);
    nw(VIO_DRV_FEATURES, 1);                                /* VERSION_1 */
    nw(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(nr(VIO_STATUS) & ST_FEATURES_OK)) {
        nw(VIO_STATUS, ST_FAILED);
        panic(PANIC_NO_NIC, "kvnet: virtio-net refused FEATURES_OK\n");
    }
    uint32_t m0 = nr(VIO_CONFIG), m1 = nr(VIO_CONFIG + 4);
    for (int i = 0; i < 4; i++)
        mac[i] = (uint8_t)(m0 >> (8 * i));
    mac[4] = (uint8_t)m1;
    mac[5] = (uint8_t)(m1 >> 8);
    setup_queue(0, &rxq);
    setup_queue(1, &txq);
    for (uint16_t i = 0; i < NQ; i++) {
        rxq.desc[i].addr = (uintptr_t)rx_bufs[i];
        rxq.desc[i].len = BUFSZ;
        rxq.desc[i].flags = VRING_DESC_F_WRITE;
        rxq.avail.ring[i] = i;
        txq.desc[i].addr = (uintptr_t)tx_bufs[i];
        memset(tx_bufs[i], 0, VNET_HDR);
    }
    rxq.avail_idx = NQ;
    barrier();
    *(volatile uint16_t *)&rxq.avail.idx = rxq.avail_idx;
    nw(VIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    if (nr(VIO_STATUS) & (ST_NEEDS_RESET | ST_FAILED))
        panic(PANIC_NO_NIC, "kvnet: virtio-net failed during setup\n");
    nw(VIO_QUEUE_NOTIFY, 0);
}

uint16_t netdrv_status(void)
{
    return (uint16_t)(nr(VIO_CONFIG + 4) >> 16);
}

uint32_t netdrv_poll(void (*fn)(const uint8_t *frame, uint32_t len, uint64_t now), uint64_t now)
{
    uint32_t n = 0;
    uint16_t used_idx = *(volatile uint16_t *)&rxq.used.idx;
    if (used_idx == rxq.last_used)
        return 0;
    barrier();
    while (rxq.last_used != used_idx) {
        struct vring_used_elem e = *(volatile struct vring_used_elem *)&rxq.used.ring[rxq.last_used % NQ];
        if (e.id >= NQ || e.len > BUFSZ)
            panic(PANIC_NO_NIC, "kvnet: virtio-net returned a bad receive buffer\n");
        if (e.len > VNET_HDR)
            fn(rx_bufs[e.id] + VNET_HDR, e.len - VNET_HDR, now);
        n++;
        rxq.avail.ring[rxq.avail_idx % NQ] = (uint16_t)e.id;
        rxq.avail_idx++;
        rxq.last_used++;
        if (rxq.last_used == used_idx)
            used_idx = *(volatile uint16_t *)&rxq.used.idx;
    }
    barrier();
    *(volatile uint16_t *)&rxq.avail.idx = rxq.avail_idx;
    return n;
}

void netdrv_flush(void)
{
    if (!tx_pending)
        return;
    barrier();
    *(volatile uint16_t *)&txq.avail.idx = txq.avail_idx;
    barrier();
    nw(VIO_QUEUE_NOTIFY, 1);
    for (uint32_t spins = 1; *(volatile uint16_t *)&txq.used.idx != txq.avail_idx; spins++) {
        __asm__ volatile("pause");
        if (!(spins & 0xfffff))
            nw(VIO_QUEUE_NOTIFY, 1);
    }
    barrier();
    txq.last_used = txq.avail_idx;
    tx_pending = 0;
}

/* netstack's driver interface */
uint8_t *drv_tx_buffer(void)
{
    if (tx_pending == NQ)
        netdrv_flush();                 /* a full ring goes out mid-batch */
    return tx_bufs[txq.avail_idx % NQ] + VNET_HDR;
}

void drv_tx_commit(uint8_t *buf, uint32_t len)
{
    uint16_t slot = txq.avail_idx % NQ;
    (void)buf;
    if (len < 60) {
        memset(buf + len, 0, 60 - len); /* Ethernet minimum */
        len = 60;
    }
    txq.desc[slot].len = VNET_HDR + len;
    txq.desc[slot].flags = 0;
    txq.avail.ring[slot] = slot;
    txq.avail_idx++;
    tx_pending++;
}
