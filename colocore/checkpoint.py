"""One checkpoint's RAM on the wire: what the primary stages and sends, what the
secondary buffers before it touches its VM.

Primary side: `stage()` is the pause. It runs inside the vCPU's run loop when the guest
runs (Machine.checkpoint_pause) and does only what must happen while the guest is
stopped: the RAM capture (colocore_ext.capture: hot pages copied, short runs copied and
re-protected, long runs write-protected for copy-on-write), the vCPU state, the device
state. `send()` runs after the guest resumed: it waits for the copier, drops hot pages
that did not change, splits zero pages, XBZRLE against the last-sent cache, lz4, framing.

Secondary side: `receive()` reads a whole checkpoint into a `PendingCheckpoint` and
verifies every section; `PendingCheckpoint.apply()` is the only code that writes the
secondary's VM, and it runs only after the checkpoint arrived whole.
"""
import array
import json
import logging
import struct
import time

from colocore_ext import capture, pages, xbzrle

from . import cpustate, faults, memory, stream
from .errors import StreamError
from .machine import decode_devices, encode_devices
from .stream import Section
from .transport import Msg, U64

log = logging.getLogger("colocore.checkpoint")

PAGE = memory.PAGE
DELTA_HEAD = struct.Struct("<I")
MAX_DEVICE_STATE = 64 << 20
ZERO_PAGE = bytes(PAGE)


class Staged:
    """What one pause captured: the RAM capture's figures, vCPU, devices, output marks."""
    __slots__ = ("dirty", "hot", "cow", "in_pause", "skipped", "faults", "mode", "cpu",
                 "devices", "marks", "pause_s", "in_loop", "steps_us", "t_start", "digest")


def pause_mode(settings, cow_ready, manual_protect):
    """The pause mode a checkpoint runs in, e.g. copy, cow, hot+pre+cow: hot (a hot set
    kept writable: needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), pre (pre-copy between
    checkpoints), then cow (copy-on-write after the pause) or copy (all in the pause)."""
    params = settings.parameters
    parts = []
    if params["x-colo-hot-pages"] > 0 and manual_protect:
        parts.append("hot")
    if params["x-colo-precopy"] > 0:
        parts.append("pre")
    parts.append("cow" if params["x-colo-pause"] == "cow" and cow_ready else "copy")
    return "+".join(parts)


class Stager:
    """The primary's pause-path work and the send that follows it. close() it when COLO
    ends: that waits for the copier and lifts every write-protection."""

    def __init__(self, machine, settings, verify=False):
        self.machine = machine
        self.settings = settings
        self.verify = verify
        self.cache = None
        self._delta_out = bytearray(memory.BATCH_PAGES * PAGE)
        self._lengths = array.array("i", bytes(4 * memory.BATCH_PAGES))
        params = settings.parameters
        want_cow = settings.cow_supported
        self.capture = capture.Capture(machine.memory.dirty, cow=want_cow,
                                       hot_max=params["x-colo-hot-pages"])
        if want_cow and not self.capture.cow_ready:
            # the kernel offered write-protect, but not for this guest's RAM
            settings.cow_unavailable(self.capture.cow_reason)
        settings.say_copy_once()
        self.capture.reserve(256)

    def close(self):
        self.capture.close()

    def precopy(self):
        """Between checkpoints (x-colo-precopy): copy the cold dirty pages written so far.
        Returns the pages copied."""
        threshold = self.settings.parameters["x-colo-precopy"]
        if threshold <= 0:
            return 0
        self.capture.precopy_min = threshold
        return self.capture.precopy()

    def stage(self):
        """The pause. Returns Staged; the cow pages are still being copied."""
        m, cap = self.machine, self.capture
        params = self.settings.parameters
        st = Staged()
        st.mode = pause_mode(self.settings, cap.cow_ready, m.vm.manual_protect)
        cap.cow = st.mode.endswith("cow")
        cap.hot_max = params["x-colo-hot-pages"]

        def in_pause():                   # device state, guest stopped (GIL held)
            st.devices = m.device_states()
            st.marks = (m.console_out.produced, m.serial_out.produced)
            st.digest = self._digest() if self.verify else None
        st.t_start = time.perf_counter()
        st.cpu, st.pause_s, st.in_loop = m.checkpoint_pause(cap, in_pause)
        v = m.vcpu
        # kick: the signal landing (the guest still runs meanwhile); ram: dirty log,
        # lists, write-protection, then the copying left after devices; vcpu, devices
        st.steps_us = {"kick": v.t_exit - v.t_request,
                       "ram": (v.t_ram - v.t_exit) + (v.t_resume - v.t_dev),
                       "vcpu": v.t_vcpu - v.t_ram, "devices": v.t_dev - v.t_vcpu} \
            if st.in_loop else {}
        st.dirty, st.hot, st.cow, st.in_pause = cap.last_dirty, cap.last_hot, cap.last_cow, cap.last_in_pause
        return st

    def _digest(self):
        ram = self.machine.memory.ram
        return pages.page_hashes(ram, self.machine.memory.all_pages())

    def send(self, ch, st, checkpoint_id):
        """Send a staged checkpoint (guest running). Returns (payload bytes, raw bytes)."""
        cap = self.capture
        cap.wait_copied()
        st.faults = cap.last_faults
        err = cap.take_copy_error()
        if err:
            log.warning("KVM_CLEAR_DIRTY_LOG failed (errno %d) after checkpoint %d: those pages "
                        "stay dirty and are sent again; nothing is lost", err, checkpoint_id)
        st.skipped = cap.compare_hot()
        nonzero, zero = cap.plan_send()
        caps = self.settings.capabilities
        compress = caps.get("compress", False)
        use_xbzrle = caps.get("xbzrle", False)
        info = {"id": checkpoint_id, "dirty": st.dirty, "zero": len(zero), "hot": st.hot,
                "unchanged": st.skipped}
        if st.digest is not None:
            info["digest"] = True
        start = ch.bytes_sent
        ch.send_msg(Msg.VMSTATE_SEND)
        ch.send_section(Section.CHECKPOINT, json.dumps(info).encode())
        if use_xbzrle:
            self._send_xbzrle(ch, nonzero, zero, compress)
        else:
            for i in range(0, len(nonzero), memory.BATCH_PAGES):
                n = min(memory.BATCH_PAGES, len(nonzero) - i)
                ch.send_section(Section.RAM, memory.ram_payload(nonzero[i:i + n], cap.batch(i, n),
                                                                compress))
        if len(zero):
            ch.send_section(Section.RAM_ZERO, zero.tobytes())
        if faults.armed("mid-ram", checkpoint_id):
            framed = stream.section_bytes(Section.RAM, memory.ram_payload(
                array.array("I", [0]), bytes(PAGE), False))
            ch.send(framed[:len(framed) // 2])
            faults.crash("mid-ram", checkpoint_id)
        ch.send_section(Section.END, b"")
        ram_bytes = ch.bytes_sent - start
        devstate = b"".join(
            stream.section_bytes(kind, payload) for kind, payload in (
                (Section.CPU, cpustate.encode(st.cpu)),
                (Section.DEVICES, encode_devices(st.devices))))
        if st.digest is not None:      # debug mode: per-page hashes of the whole RAM
            devstate += stream.section_bytes(Section.CHECKPOINT, st.digest.tobytes())
        devstate += stream.section_bytes(Section.END, b"")
        faults.crash("before-devstate", checkpoint_id)
        ch.send_msg(Msg.VMSTATE_SIZE, U64.pack(len(devstate)))
        if faults.armed("mid-devstate", checkpoint_id):
            ch.send(devstate[:len(devstate) // 2])
            faults.crash("mid-devstate", checkpoint_id)
        ch.send(devstate)
        raw = st.dirty * PAGE + len(devstate)
        # room for twice this checkpoint's dirty set, touched while the guest runs
        cap.reserve(2 * st.dirty)
        return ch.bytes_sent - start, raw, ram_bytes

    def _send_xbzrle(self, ch, nonzero, zero, compress):
        size = self.settings.parameters["xbzrle-cache-size"]
        if self.cache is None or self.cache_size != size:
            self.cache = xbzrle.XbzrleCache(size)
            self.cache_size = size
        self.cache.advance()
        # A page sent as "zero" is now all zeroes on the secondary: its cached copy must
        # say so too, or the next delta would be taken against stale bytes.
        for p in zero:
            if p in self.cache:
                self.cache.insert(p, ZERO_PAGE)
        for i in range(0, len(nonzero), memory.BATCH_PAGES):
            pf = nonzero[i:i + memory.BATCH_PAGES]
            raw = self.capture.batch(i, len(pf))
            used = self.cache.encode_pages(pf, raw, self._delta_out, self._lengths)
            lengths = self._lengths[:len(pf)]
            whole = array.array("I", (p for p, n in zip(pf, lengths) if n < 0))
            delta_idx = [k for k, n in enumerate(lengths) if n > 0]
            if delta_idx:
                d_pfns = array.array("I", (pf[k] for k in delta_idx))
                d_len = array.array("i", (lengths[k] for k in delta_idx))
                ch.send_section(Section.RAM_DELTA, b"".join((
                    DELTA_HEAD.pack(len(d_pfns)), d_pfns.tobytes(), d_len.tobytes(),
                    bytes(self._delta_out[:used]))))
            if len(whole):
                if len(whole) == len(pf):
                    body = raw
                else:
                    body = b"".join(raw[k * PAGE:(k + 1) * PAGE]
                                    for k, n in enumerate(lengths) if n < 0)
                ch.send_section(Section.RAM, memory.ram_payload(whole, body, compress))


class PendingCheckpoint:
    """A checkpoint received whole and verified, not yet applied."""

    def __init__(self, info):
        self.info = info
        self.ram = []          # (pfns, bytes)
        self.zero = []         # pfns arrays
        self.cpu = None
        self.devices = None
        self.digest = None
        self.bytes = 0

    def apply(self, machine):
        """Write it into the VM: RAM, then vCPU, then devices (reset, then load)."""
        ram = machine.memory.ram
        for pfns in self.zero:
            memory.apply_zero(ram, pfns)
        for pfns, data in self.ram:
            memory.apply_pages(ram, pfns, data)
        machine.vcpu.set_state(self.cpu)
        machine.load_device_states(self.devices)


def receive(ch, machine):
    """Read one checkpoint after VMSTATE_SEND; verify everything; apply nothing."""
    npages = machine.memory.npages
    ram = machine.memory.ram
    start = ch.reader.bytes_read
    kind, payload = ch.reader.read_section()
    if kind != Section.CHECKPOINT:
        raise StreamError("checkpoint does not start with a CHECKPOINT section")
    try:
        info = json.loads(payload)
    except ValueError:
        raise StreamError("CHECKPOINT section is not valid JSON") from None
    cp = PendingCheckpoint(info)
    while True:
        kind, payload = ch.reader.read_section()
        if kind == Section.END:
            break
        if kind == Section.RAM:
            cp.ram.append(memory.decode_ram(payload, npages))
        elif kind == Section.RAM_ZERO:
            cp.zero.append(memory.decode_zero(payload, npages))
        elif kind == Section.RAM_DELTA:
            cp.ram.append(_decode_delta(payload, ram, npages))
        elif kind == Section.CHECKPOINT:
            pass
        else:
            raise StreamError("unexpected %s section in checkpoint RAM" % kind.name)
    ch.expect(Msg.VMSTATE_SIZE)
    size = ch.read_u64()
    if size > MAX_DEVICE_STATE:
        raise StreamError("vmstate-size %d is over the %d limit: corrupted stream"
                          % (size, MAX_DEVICE_STATE))
    blob = ch.read_exact(size)
    sub = stream.Reader(_bytes_reader(blob), "device state")
    for kind, payload in sub.read_unit():
        if kind == Section.CPU:
            cp.cpu = cpustate.decode(payload)
        elif kind == Section.DEVICES:
            try:
                cp.devices = decode_devices(payload)
            except ValueError:
                raise StreamError("DEVICES section is not valid") from None
        elif kind == Section.CHECKPOINT:
            cp.digest = array.array("Q")
            cp.digest.frombytes(payload)
    if cp.cpu is None or cp.devices is None:
        raise StreamError("checkpoint lacks CPU or DEVICES state")
    machine.check_saved_state(cp.cpu, cp.devices, "checkpoint %s" % info.get("id"))
    cp.bytes = ch.reader.bytes_read - start + size
    return cp


def _bytes_reader(blob):
    view = memoryview(blob)
    pos = [0]

    def read_exact(n):
        if pos[0] + n > len(view):
            raise EOFError
        data = bytes(view[pos[0]:pos[0] + n])
        pos[0] += n
        return data
    return read_exact


def _decode_delta(payload, ram, npages):
    """RAM_DELTA: deltas against the secondary's current copy, decoded into a buffer."""
    if len(payload) < DELTA_HEAD.size:
        raise StreamError("RAM_DELTA section too short")
    (n,) = DELTA_HEAD.unpack_from(payload)
    off = DELTA_HEAD.size
    if off + 8 * n > len(payload):
        raise StreamError("RAM_DELTA page list truncated")
    pfns = array.array("I")
    pfns.frombytes(payload[off:off + 4 * n])
    lengths = array.array("i")
    lengths.frombytes(payload[off + 4 * n:off + 8 * n])
    if n and max(pfns) >= npages:
        raise StreamError("RAM_DELTA has page %d past the guest's %d pages" % (max(pfns), npages))
    base = bytearray(n * PAGE)
    for k, p in enumerate(pfns):
        base[k * PAGE:(k + 1) * PAGE] = ram[p * PAGE:(p + 1) * PAGE]
    try:
        xbzrle.decode_batch(memoryview(payload)[off + 8 * n:], lengths, base)
    except ValueError as exc:
        raise StreamError("RAM_DELTA: %s" % exc) from None
    return pfns, bytes(base)
