"""virtio-net over virtio-mmio (version 2) at 0xD0000200: the guest's network card.

The contract is in docs/DESIGN.md ("virtio-net"). In short: device ID 1, features
VERSION_1, MAC and STATUS; config = mac[6] + le16 status (LINK_UP, ANNOUNCE); queue 0
receives, queue 1 transmits; every buffer starts with the 12-byte virtio_net_hdr; no
interrupts. QueueNotify(1) sends every available frame (one doorbell per batch); receive
buffers are filled at any exit (a notify, the platform WAIT, which also sleeps on the
tap). WAIT's result carries bit 31 when the config changed (`take_event`), so the guest
learns of ANNOUNCE without reading MMIO on its fast path.

Frames move in C (colocore_ext.virtq.NetPath), never a Python call per frame. The frames
the guest sent go through `out`, a FrameQueue: numbered as produced, written to the tap
up to its release mark, everything at once outside COLO. In COLO the queue is one of the
machine's output channels (`output`, vm/machine.py): a checkpoint's pause takes its mark
(a counter read), vmstate-received releases up to it and the releasing thread writes the
frames to the tap at once (the vCPU thread may flush too: the queue's mutex orders them).
The device state (snapshots, migration, checkpoints) holds the transport, the MAC and
status, the counters, the frames not yet released, and how far the guest consumed its
input: `rx_consumed` frames, the last with FNV-1a 64 hash `rx_last_hash` (a COLO
secondary matches its log of mirrored input against them, net/inputlog.py).
"""
import errno
import logging
import threading

from colocore_ext.virtq import FrameQueue, GuestRam, NetPath, VirtqueueError, check_frames

from colocore.vm.devices import BOOL, U16, U64, check_fields
from colocore.vm.devices.virtio_mmio import VIRTIO_F_VERSION_1, VirtioMmioDevice

log = logging.getLogger("colocore.net")

BASE = 0xD0000200
SIZE = 0x200
DEVICE_ID_NET = 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
STATUS_LINK_UP = 1
STATUS_ANNOUNCE = 2
WAIT_NET_EVENT = 0x80000000
DEFAULT_MAC = "52:54:00:12:34:56"
# Frames held for output commit are device state: they must fit a checkpoint's device part.
MAX_HELD = 32 << 20


def _mac_bytes(value):
    if not isinstance(value, bytes) or len(value) != 6:
        raise ValueError("virtio-net: the MAC is not 6 bytes")
    return value


def parse_mac(text):
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError("MAC %r: expected six hex pairs like 52:54:00:12:34:56" % text)
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError("MAC %s is a multicast address; the first byte must be even" % text)
    return mac


def format_mac(mac):
    return ":".join("%02x" % b for b in mac)


class NetOutput:
    """The NIC's transmitted frames as one of the machine's output channels (the same
    protocol as devices.output.OutputChannel: produced, hold, release)."""
    name = "net"

    def __init__(self, nic):
        self.nic = nic

    @property
    def produced(self):
        return self.nic.out.produced

    @property
    def hold(self):
        return self.nic.out.hold

    @hold.setter
    def hold(self, value):
        self.nic.out.hold = value

    def release(self, upto=None):
        """Move the mark and write what it allows now, on the calling thread (the COLO
        loop, a failover): a guest idle in WAIT would not flush for a while."""
        self.nic.out.release(upto)
        self.nic.flush()


class HeldFrames:
    """The held frames of a state saved on a checkpoint's pause path: only the count is
    read there; the frames are copied by `resolve()` after the guest resumed."""
    __slots__ = ("out", "produced")

    def __init__(self, out):
        self.out = out
        self.produced = out.produced

    def resolve(self):
        return self.out.save_upto(self.produced)


class VirtioNet(VirtioMmioDevice):
    device_id = DEVICE_ID_NET
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    name = "virtio-net"

    def __init__(self, ram, dirty_log, mac=DEFAULT_MAC, backend=None):
        self.guest_ram = GuestRam(ram, dirty_log)
        self.mac = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
        self.backend = backend          # colocore.net.tap.TapBackend (fd, name) or None
        self.out = FrameQueue()
        super().__init__(2)
        self.path = NetPath(self.guest_ram, self.queues[0], self.queues[1], self.out)
        self.link_status = STATUS_LINK_UP if backend is not None else 0
        self.event = False              # config changed since WAIT last reported it
        self._event_lock = threading.Lock()
        self.on_event = lambda: None    # wakes a WAITing guest (the machine sets it)
        self.backend_error = None       # why the backend stopped, once
        self.output = NetOutput(self)
        # may_release() of an arbiter (--arbiter), or None: asked before frames go to the
        # tap; frames wait in `out` while it says no
        self.fence = None

    def reset(self):
        super().reset()
        self.out.drop_all()             # a driver reset forgets frames not yet sent

    # ---- the config space and its events ---------------------------------------------

    def config_bytes(self):
        return self.mac + (self.link_status & 0xFFFF).to_bytes(2, "little")

    def set_status(self, bits, on):
        """Change LINK_UP / ANNOUNCE; the guest learns it from WAIT's bit 31."""
        with self._event_lock:
            new = (self.link_status | bits) if on else (self.link_status & ~bits)
            if new == self.link_status:
                return
            self.link_status = new
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.event = True
        self.on_event()

    def announce(self):
        """Ask the guest to announce itself (gratuitous ARP), e.g. after a migration; a
        call while ANNOUNCE is set asks again (one gratuitous ARP per announcement round,
        as QEMU's rounds do)."""
        with self._event_lock:
            self.link_status |= STATUS_ANNOUNCE
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.event = True
        self.on_event()

    def announce_done(self):
        self.set_status(STATUS_ANNOUNCE, False)

    def take_event(self):
        with self._event_lock:
            ev, self.event = self.event, False
        return ev

    # ---- the frame path (vCPU thread) ----------------------------------------------------

    def _fd(self):
        b = self.backend
        return b.fd if b is not None and self.backend_error is None else -1

    def queue_notify(self, index):
        if index == 1:
            self.process_tx()
        self.deliver_rx()

    def process_tx(self):
        if not self.usable(self.queues[1]):
            return
        try:
            self.path.tx_drain()
        except VirtqueueError as exc:
            self.fail(exc)
        if self.out.releasable > self.out.base:
            self.flush()

    def flush(self):
        """Write releasable frames to the tap (vCPU thread, or whoever releases output)."""
        fence = self.fence
        if fence is not None and not fence():
            return
        e = self.out.flush(self._fd())
        if e and e not in (errno.EAGAIN, errno.EINVAL, errno.EMSGSIZE):
            self._backend_failed(e)

    def want_flush(self):
        """Any thread: send what is releasable now (the fence reopened). The FrameQueue's
        mutex makes a flush from any thread safe beside the vCPU thread's."""
        if self.out.releasable > self.out.base:     # a racy read: at worst a spare flush
            self.flush()

    def deliver_rx(self):
        """Fill posted receive buffers from the tap; returns frames delivered."""
        fd = self._fd()
        if fd < 0 or not self.usable(self.queues[0]):
            return 0
        try:
            n = self.path.rx_fill(fd)
        except VirtqueueError as exc:
            self.fail(exc)
            return 0
        if self.path.last_errno:
            self._backend_failed(self.path.last_errno)
        return n

    def wait_fd(self):
        """The fd a WAIT should also sleep on: the tap, when a frame could be delivered."""
        fd = self._fd()
        if fd < 0 or not self.usable(self.queues[0]):
            return -1
        try:
            return fd if self.path.rx_ready() else -1
        except VirtqueueError:
            return -1

    def _backend_failed(self, err):
        if self.backend_error is not None:
            return
        self.backend_error = err
        name = getattr(self.backend, "ifname", "?")
        if err in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
            log.error("tap %s was deleted under the running node: the guest's network is "
                      "down (link status off), the guest keeps running; to reconnect it, "
                      "save it (migrate file:PATH) and restart it with --nic", name)
        else:
            log.error("tap %s failed: %s; the guest's network is down (link status off), "
                      "the guest keeps running", name, errno.errorcode.get(err, err))
        self.set_status(STATUS_LINK_UP, False)

    # ---- state ---------------------------------------------------------------------------

    def save(self, pause=False):
        """The device state. pause=True (a checkpoint's pause path): the held frames are
        a HeldFrames to resolve() later, not a copy (Machine.complete_device_states)."""
        s = self.save_transport()
        s.update(mac=self.mac, link_status=self.link_status, event=self.event,
                 counters=self.path.counters(), out=HeldFrames(self.out) if pause else self.out.save())
        return s

    def check(self, s):
        s = check_fields(s, dict(
            self.transport_fields(), mac=_mac_bytes, link_status=U16, event=BOOL,
            counters=("object", {k: U64 for k in NetPath.COUNTERS}),
            out=("object", {"base": U64, "produced": U64, "frames": ("bytes", MAX_HELD)})),
            self.name)
        out = s["out"]
        check_frames(out["frames"], out["base"], out["produced"])
        return s

    def load(self, s):
        """Load what check() accepted: this cannot fail."""
        self.load_transport(s)
        mac = s["mac"]
        if mac != self.mac:
            log.warning("virtio-net: the guest's MAC is %s (from its saved state), not this "
                        "node's --nic mac=%s: the guest keeps its own", format_mac(mac),
                        format_mac(self.mac))
        self.mac = mac
        # the link is whatever this node's backend says, announced to the guest if new
        saved = s["link_status"]
        self.link_status = (saved & ~STATUS_LINK_UP) | (
            STATUS_LINK_UP if self.backend is not None and self.backend_error is None else 0)
        self.event = s["event"] or self.link_status != saved
        self.path.load_counters(s["counters"])
        self.out.load(s["out"])
        if self.out.releasable > self.out.base:
            self.flush()

    def query(self):
        """The card as data (QMP x-query-net, HMP info network)."""
        b = self.backend
        return {"mac": format_mac(self.mac), "link-up": bool(self.link_status & STATUS_LINK_UP),
                "announce": bool(self.link_status & STATUS_ANNOUNCE),
                "backend": {"type": "tap", "ifname": b.ifname} if b is not None else None,
                "counters": self.path.counters(),
                "tx-held": self.out.pending, "tx-written": self.out.written,
                "tx-write-errors": self.out.write_errors}
