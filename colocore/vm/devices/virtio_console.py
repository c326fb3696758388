"""virtio-console over virtio-mmio (version 2, virtio 1.x), the guests' service channel.

Queue 0 is receiveq (host to guest), queue 1 transmitq (guest to host). No interrupts are
injected: the driver polls its used rings. All of this runs on the vCPU thread, during
the guest's MMIO exits, so the device never touches guest RAM while the vCPU is paused;
input from the chardev waits in `rx_pending` (thread safe) until the guest asks (WAIT
read or a receiveq notify). The transport and the ring walking are shared with the other
virtio devices (virtio_mmio.py, colocore_ext.virtq).

Every write this device makes into guest RAM goes through `mark_dirty`, because KVM's
dirty log only sees writes made by the guest itself.
"""
import threading

from colocore_ext.virtq import GuestRam

from colocore.vm.devices import check_fields
from colocore.vm.devices.virtio_mmio import VirtioMmioDevice, VirtqueueError

BASE = 0xD0000000
SIZE = 0x200
DEVICE_ID_CONSOLE = 3
RX_LIMIT = 16 << 20                 # bytes of console input buffered before clients are paused


class VirtioConsole(VirtioMmioDevice):
    device_id = DEVICE_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, ram, mark_dirty, output, on_rx_space=None, dirty_log=None):
        self.ram = ram                  # memoryview of guest RAM
        self.mark_dirty = mark_dirty    # mark_dirty(gpa, length)
        self.guest_ram = GuestRam(ram, dirty_log)
        self.output = output            # OutputChannel for transmitq bytes
        self.on_rx_space = on_rx_space or (lambda: None)
        self._rx_lock = threading.Lock()
        self.rx_pending = bytearray()
        super().__init__(2)

    # ---- input from the chardev (control thread) -------------------------------

    def feed(self, data):
        with self._rx_lock:
            self.rx_pending += data
            return len(self.rx_pending) < RX_LIMIT

    # ---- queue processing (vCPU thread) ----------------------------------------

    def queue_notify(self, index):
        if index == 1:
            self.process_tx()
        # any notify is also a chance to hand over pending input (docs/DESIGN.md)
        self.deliver_rx()

    def process_tx(self):
        q = self.queues[1]
        if not self.usable(q):
            return
        ram = self.guest_ram
        out = bytearray()
        try:
            while True:
                chain = q.pop(ram)
                if chain is None:
                    break
                head, bufs = chain
                for addr, length, writable in bufs:
                    if not writable:
                        out += self.ram[addr:addr + length]
                q.push_used(ram, head, 0)
            q.publish(ram)
        except VirtqueueError as exc:
            self.fail(exc)
        if out:
            self.output.emit(bytes(out))

    def deliver_rx(self):
        """Move pending chardev input into the guest's receive buffers; return bytes moved."""
        q = self.queues[0]
        if not self.usable(q):
            return 0
        ram = self.guest_ram
        with self._rx_lock:
            if not self.rx_pending:
                return 0
            data = self.rx_pending
            moved = 0
            try:
                while moved < len(data):
                    chain = q.pop(ram)
                    if chain is None:
                        break
                    head, bufs = chain
                    written = 0
                    for addr, length, writable in bufs:
                        if not writable or moved >= len(data):
                            continue
                        n = min(length, len(data) - moved)
                        self.ram[addr:addr + n] = data[moved:moved + n]
                        self.mark_dirty(addr, n)
                        moved += n
                        written += n
                    q.push_used(ram, head, written)
                if moved:
                    q.publish(ram)
            except VirtqueueError as exc:
                self.fail(exc)
            del data[:moved]
        if moved:
            self.on_rx_space()
        return moved

    # ---- state -----------------------------------------------------------------

    def save(self):
        with self._rx_lock:
            rx = bytes(self.rx_pending)
        s = self.save_transport()
        s["rx_pending"] = rx
        return s

    def check(self, s):
        return check_fields(s, dict(self.transport_fields(), rx_pending=("bytes", RX_LIMIT)),
                            self.name)

    def load(self, s):
        self.load_transport(s)
        with self._rx_lock:
            self.rx_pending = bytearray(s["rx_pending"])
