/* kvnet's virtio-net driver (virtio-mmio v2 at 0xD0000200, polled; docs/DESIGN.md). */
#ifndef COLOCORE_NETDRV_H
#define COLOCORE_NETDRV_H
#include "guest.h"

#define NET_MMIO_BASE   0xD0000200UL
#define NET_STATUS_LINK_UP  1
#define NET_STATUS_ANNOUNCE 2
/* bit of the platform WAIT result: the virtio-net config (status) changed */
#define WAIT_NET_EVENT  0x80000000u

void netdrv_init(uint8_t mac[6]);
/* hand every received frame to fn; re-post the buffers; returns frames handled */
uint32_t netdrv_poll(void (*fn)(const uint8_t *frame, uint32_t len, uint64_t now), uint64_t now);
void netdrv_flush(void);            /* one QueueNotify(1) for every frame committed */
uint16_t netdrv_status(void);       /* config status (an MMIO read: not on the fast path) */
#endif
