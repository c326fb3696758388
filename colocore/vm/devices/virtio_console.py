"""virtio-console over virtio-mmio (version 2, virtio 1.x), the guests' service channel.

Queue 0 is receiveq (host to guest), queue 1 transmitq (guest to host). No interrupts are
injected: the driver polls its used rings. All of this runs on the vCPU thread, during
the guest's MMIO exits, so the device never touches guest RAM while the vCPU is paused;
input from the chardev waits in `rx_pending` (thread safe) until the guest asks (WAIT
read or a receiveq notify).

Every write this device makes into guest RAM goes through `mark_dirty`, because KVM's
dirty log only sees writes made by the guest itself.
"""
import logging
import struct
import threading

log = logging.getLogger("colocore.virtio")

BASE = 0xD0000000
SIZE = 0x200
QUEUE_NUM_MAX = 256
VIRTIO_F_VERSION_1 = 1 << 32
DEVICE_ID_CONSOLE = 3
VENDOR = 0x52434C43                 # "CLCR"
STATUS_DEVICE_NEEDS_RESET = 0x40
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT = 1, 2, 4
RX_LIMIT = 16 << 20                 # bytes of console input buffered before clients are paused


class VirtqueueError(Exception):
    pass


class Virtqueue:
    def __init__(self):
        self.reset()

    def reset(self):
        self.num = 0
        self.ready = 0
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.last_avail = 0
        self.used_idx = 0

    def save(self):
        return dict(num=self.num, ready=self.ready, desc=self.desc, driver=self.driver,
                    device=self.device, last_avail=self.last_avail, used_idx=self.used_idx)

    def load(self, s):
        for k in ("num", "ready", "desc", "driver", "device", "last_avail", "used_idx"):
            setattr(self, k, int(s[k]))


class VirtioConsole:
    def __init__(self, ram, mark_dirty, output, on_rx_space=None):
        self.ram = ram                  # memoryview of guest RAM
        self.mark_dirty = mark_dirty    # mark_dirty(gpa, length)
        self.output = output            # OutputChannel for transmitq bytes
        self.on_rx_space = on_rx_space or (lambda: None)
        self._rx_lock = threading.Lock()
        self.rx_pending = bytearray()
        self.queues = [Virtqueue(), Virtqueue()]
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

    # ---- input from the chardev (control thread) -------------------------------

    def feed(self, data):
        with self._rx_lock:
            self.rx_pending += data
            return len(self.rx_pending) < RX_LIMIT

    # ---- guest memory helpers --------------------------------------------------

    def _check(self, gpa, length):
        if gpa + length > len(self.ram) or gpa < 0:
            raise VirtqueueError("guest address 0x%x+%d outside RAM" % (gpa, length))

    def _u16(self, gpa):
        self._check(gpa, 2)
        return struct.unpack_from("<H", self.ram, gpa)[0]

    def _put(self, fmt, gpa, *values):
        n = struct.calcsize(fmt)
        self._check(gpa, n)
        struct.pack_into(fmt, self.ram, gpa, *values)
        self.mark_dirty(gpa, n)

    def _chain(self, q, head):
        """Yield (addr, len, flags) of a descriptor chain, with loop protection."""
        i = head
        for _ in range(q.num):
            if i >= q.num:
                raise VirtqueueError("descriptor index %d past queue size %d" % (i, q.num))
            gpa = q.desc + 16 * i
            self._check(gpa, 16)
            addr, length, flags, nxt = struct.unpack_from("<QIHH", self.ram, gpa)
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError("indirect descriptors were not negotiated")
            self._check(addr, length)
            yield addr, length, flags
            if not flags & VRING_DESC_F_NEXT:
                return
            i = nxt
        raise VirtqueueError("descriptor chain loops")

    def _push_used(self, q, head, written):
        slot = q.device + 4 + 8 * (q.used_idx % q.num)
        self._put("<II", slot, head, written)
        q.used_idx = (q.used_idx + 1) & 0xFFFF

    def _publish_used(self, q):
        self._put("<H", q.device + 2, q.used_idx)

    def _fail(self, exc):
        log.error("virtio-console: %s; device needs reset", exc)
        self.status |= STATUS_DEVICE_NEEDS_RESET

    # ---- queue processing (vCPU thread) ----------------------------------------

    def _usable(self, q):
        return q.ready and q.num and self.status & 4 and not self.status & STATUS_DEVICE_NEEDS_RESET

    def process_tx(self):
        q = self.queues[1]
        if not self._usable(q):
            return
        out = bytearray()
        try:
            avail_idx = self._u16(q.driver + 2)
            while q.last_avail != avail_idx:
                head = self._u16(q.driver + 4 + 2 * (q.last_avail % q.num))
                for addr, length, flags in self._chain(q, head):
                    if not flags & VRING_DESC_F_WRITE:
                        out += self.ram[addr:addr + length]
                self._push_used(q, head, 0)
                q.last_avail = (q.last_avail + 1) & 0xFFFF
            self._publish_used(q)
        except VirtqueueError as exc:
            self._fail(exc)
        if out:
            self.output.emit(bytes(out))

    def deliver_rx(self):
        """Move pending chardev input into the guest's receive buffers; return bytes moved."""
        q = self.queues[0]
        if not self._usable(q):
            return 0
        with self._rx_lock:
            if not self.rx_pending:
                return 0
            data = self.rx_pending
            moved = 0
            try:
                avail_idx = self._u16(q.driver + 2)
                while q.last_avail != avail_idx and moved < len(data):
                    head = self._u16(q.driver + 4 + 2 * (q.last_avail % q.num))
                    written = 0
                    for addr, length, flags in self._chain(q, head):
                        if not flags & VRING_DESC_F_WRITE or moved >= len(data):
                            continue
                        n = min(length, len(data) - moved)
                        self.ram[addr:addr + n] = data[moved:moved + n]
                        self.mark_dirty(addr, n)
                        moved += n
                        written += n
                    self._push_used(q, head, written)
                    q.last_avail = (q.last_avail + 1) & 0xFFFF
                if moved:
                    self._publish_used(q)
            except VirtqueueError as exc:
                self._fail(exc)
            del data[:moved]
        if moved:
            self.on_rx_space()
        return moved

    # ---- MMIO registers ----------------------------------------------------------

    def mmio_read(self, off, size):
        q = self.queues[self.queue_sel] if self.queue_sel < 2 else None
        if off >= 0x100:
            return 0                     # virtio_console_config: no size, no multiport
        if off == 0x000:
            return 0x74726976            # "virt"
        if off == 0x004:
            return 2
        if off == 0x008:
            return DEVICE_ID_CONSOLE
        if off == 0x00C:
            return VENDOR
        if off == 0x010:
            return (VIRTIO_F_VERSION_1 >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
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
        q = self.queues[self.queue_sel] if self.queue_sel < 2 else None
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
                self._fail(VirtqueueError("queue size %d invalid" % value))
            else:
                q.num = value
        elif off == 0x044 and q is not None:
            q.ready = value & 1
        elif off == 0x050:
            if value == 1:
                self.process_tx()
            # any notify is also a chance to hand over pending input (docs/DESIGN.md)
            self.deliver_rx()
        elif off == 0x064:
            self.interrupt_status &= ~value
        elif off == 0x070:
            if value == 0:
                self.reset()
            else:
                if value & 8 and not self.driver_features & VIRTIO_F_VERSION_1:
                    value &= ~8          # FEATURES_OK refused: version 1 is required
                self.status = value
        elif q is not None and off in (0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4):
            attr = {0x08: "desc", 0x09: "driver", 0x0A: "device"}[off >> 4]
            cur = getattr(q, attr)
            if off & 4:
                cur = (cur & 0xFFFFFFFF) | (value << 32)
            else:
                cur = (cur & ~0xFFFFFFFF) | value
            setattr(q, attr, cur)

    # ---- state -----------------------------------------------------------------

    def save(self):
        with self._rx_lock:
            rx = bytes(self.rx_pending)
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "queues": [q.save() for q in self.queues], "rx_pending": rx}

    def load(self, s):
        for k in ("status", "device_features_sel", "driver_features_sel", "driver_features",
                  "queue_sel", "interrupt_status", "config_generation"):
            setattr(self, k, int(s[k]))
        for q, qs in zip(self.queues, s["queues"]):
            q.load(qs)
        with self._rx_lock:
            self.rx_pending = bytearray(s["rx_pending"])
