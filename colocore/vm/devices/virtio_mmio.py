"""The virtio-mmio (version 2, virtio 1.x) transport shared by colocore's virtio devices.

One register file (magic, version, IDs, feature words, queue select and queue registers,
status, config generation, device config space from 0x100) and the queue objects
(`colocore_ext.virtq.Virtqueue`, whose ring walking is shared by every device). A device
subclass names its ID, features and config bytes, and reacts to `queue_notify(index)`.

No interrupts are injected: drivers poll their used rings (docs/DESIGN.md). Everything
here runs on the vCPU thread during MMIO exits, except `save` (vCPU parked).
"""
import logging

from colocore_ext.virtq import Virtqueue, VirtqueueError

from colocore.vm.devices import U16, U32, U64

log = logging.getLogger("colocore.virtio")

MAGIC = 0x74726976                  # "virt"
VENDOR = 0x52434C43                 # "CLCR"
QUEUE_NUM_MAX = 256
VIRTIO_F_VERSION_1 = 1 << 32
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
CONFIG = 0x100


def _queue_size(n):
    if type(n) is not int or not 0 <= n <= QUEUE_NUM_MAX or n & (n - 1):
        raise ValueError("virtqueue size %.20r is not a power of two up to %d"
                         % (n, QUEUE_NUM_MAX))
    return n


QUEUE_FIELDS = {"num": _queue_size, "ready": (0, 1), "desc": U64, "driver": U64,
                "device": U64, "last_avail": U16, "used_idx": U16}


class VirtioMmioDevice:
    device_id = 0
    features = VIRTIO_F_VERSION_1
    name = "virtio"

    def __init__(self, nqueues=2):
        self.queues = [Virtqueue() for _ in range(nqueues)]
        self.reset()

    def reset(self):
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    # ---- hooks for devices -----------------------------------------------------------

    def config_bytes(self):
        return b""

    def queue_notify(self, index):
        pass

    def fail(self, exc):
        log.error("%s: %s; device needs reset", self.name, exc)
        self.status |= STATUS_DEVICE_NEEDS_RESET

    def usable(self, q):
        return q.ready and q.num and self.status & STATUS_DRIVER_OK \
            and not self.status & STATUS_DEVICE_NEEDS_RESET

    # ---- MMIO registers ----------------------------------------------------------------

    def mmio_read(self, off, size):
        if off >= CONFIG:
            cfg = self.config_bytes()
            chunk = cfg[off - CONFIG:off - CONFIG + size]
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if off == 0x000:
            return MAGIC
        if off == 0x004:
            return 2
        if off == 0x008:
            return self.device_id
        if off == 0x00C:
            return VENDOR
        if off == 0x010:
            return (self.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if off == 0x034:
            return QUEUE_NUM_MAX if q else 0
        if off == 0x044:
            return q.ready if q else 0
        if off == 0x060:
            return self.interrupt_status
        if off == 0x070:
            return self.status
        if off == 0x0FC:
            return self.config_generation
        if q is not None:
            regs = {0x080: q.desc & 0xFFFFFFFF, 0x084: q.desc >> 32,
                    0x090: q.driver & 0xFFFFFFFF, 0x094: q.driver >> 32,
                    0x0A0: q.device & 0xFFFFFFFF, 0x0A4: q.device >> 32}
            return regs.get(off, 0)
        return 0

    def mmio_write(self, off, size, value):
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if off == 0x014:
            self.device_features_sel = value
        elif off == 0x020:
            if self.driver_features_sel == 0:
                self.driver_features = (self.driver_features & ~0xFFFFFFFF) | value
            elif self.driver_features_sel == 1:
                self.driver_features = (self.driver_features & 0xFFFFFFFF) | (value << 32)
        elif off == 0x024:
            self.driver_features_sel = value
        elif off == 0x030:
            self.queue_sel = value
        elif off == 0x038 and q is not None:
            if value == 0 or value > QUEUE_NUM_MAX or value & (value - 1):
                self.fail(VirtqueueError("queue size %d invalid" % value))
            else:
                q.num = value
        elif off == 0x044 and q is not None:
            q.ready = value & 1
        elif off == 0x050:
            self.queue_notify(value)
        elif off == 0x064:
            self.interrupt_status &= ~value
        elif off == 0x070:
            if value == 0:
                self.reset()
            else:
                if value & STATUS_FEATURES_OK and (
                        not self.driver_features & VIRTIO_F_VERSION_1
                        or self.driver_features & ~self.features):
                    value &= ~STATUS_FEATURES_OK     # version 1 required, nothing unoffered
                self.status = value
        elif q is not None and off in (0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4):
            attr = {0x08: "desc", 0x09: "driver", 0x0A: "device"}[off >> 4]
            cur = getattr(q, attr)
            if off & 4:
                cur = (cur & 0xFFFFFFFF) | (value << 32)
            else:
                cur = (cur & ~0xFFFFFFFF) | value
            setattr(q, attr, cur)

    # ---- state -------------------------------------------------------------------------

    _REGS = ("status", "device_features_sel", "driver_features_sel", "driver_features",
             "queue_sel", "interrupt_status", "config_generation")

    def save_transport(self):
        s = {k: getattr(self, k) for k in self._REGS}
        s["queues"] = [q.save() for q in self.queues]
        return s

    def transport_fields(self):
        """check_fields() spec of what save_transport() saves."""
        fields = {k: (U64 if k == "driver_features" else U32)
                  for k in self._REGS}
        fields["queues"] = ("list", len(self.queues), QUEUE_FIELDS)
        return fields

    def load_transport(self, s):
        """Load what check_fields(s, transport_fields()) accepted."""
        for k in self._REGS:
            setattr(self, k, s[k])
        for q, qs in zip(self.queues, s["queues"]):
            q.load(qs)

