/* virtio-mmio (version 2) register offsets, status bits and split-ring layouts, shared
 * by the guests' console (lib.c) and net (netdrv.c) drivers. */
#ifndef COLOCORE_VIRTIO_MMIO_H
#define COLOCORE_VIRTIO_MMIO_H

#define VIO_MAGIC           0x000
#define VIO_VERSION         0x004
#define VIO_DEVICE_ID       0x008
#define VIO_DEV_FEATURES    0x010
#define VIO_DEV_FEATURES_SEL 0x014
#define VIO_DRV_FEATURES    0x020
#define VIO_DRV_FEATURES_SEL 0x024
#define VIO_QUEUE_SEL       0x030
#define VIO_QUEUE_NUM_MAX   0x034
#define VIO_QUEUE_NUM       0x038
#define VIO_QUEUE_READY     0x044
#define VIO_QUEUE_NOTIFY    0x050
#define VIO_STATUS          0x070
#define VIO_QUEUE_DESC_LO   0x080
#define VIO_QUEUE_DESC_HI   0x084
#define VIO_QUEUE_DRIVER_LO 0x090
#define VIO_QUEUE_DRIVER_HI 0x094
#define VIO_QUEUE_DEVICE_LO 0x0a0
#define VIO_QUEUE_DEVICE_HI 0x0a4
#define VIO_CONFIG          0x100

#define ST_ACKNOWLEDGE 1
#define ST_DRIVER      2
#define ST_DRIVER_OK   4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 0x40
#define ST_FAILED      0x80

#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vring_used_elem { uint32_t id, len; };

#endif
