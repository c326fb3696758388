"""One checkpoint's RAM on the wire: what the primary stages and sends, what the
secondary buffers before it touches its VM.

Primary side: `stage()` runs on the pause path and does only what must happen while the
vCPU is parked (harvest the dirty log, copy the dirty pages aside, capture vCPU and
devices). `send()` runs after the guest resumed: zero-page split, XBZRLE against the
last-sent cache, lz4, framing.

Secondary side: `receive()` reads a whole checkpoint into a `PendingCheckpoint` and
verifies every section; `PendingCheckpoint.apply()` is the only code that writes the
secondary's VM, and it runs only after the checkpoint arrived whole.
"""
import array
import json
import struct
import time

from colocore_ext import pages, xbzrle

from . import cpustate, faults, memory, stream
from .errors import StreamError
from .machine import decode_devices, encode_devices
from .stream import Section
from .transport import Msg, U64

PAGE = memory.PAGE
DELTA_HEAD = struct.Struct("<I")
MAX_DEVICE_STATE = 64 << 20
ZERO_PAGE = bytes(PAGE)


class Staged:
    """What the pause captured: dirty pages copied aside, vCPU, devices, output marks."""
    __slots__ = ("pfns", "kept", "zero_flags", "cpu", "devices", "marks", "pause_s",
                 "t_start", "digest")


class Stager:
    """The primary's pause-path work and the send that follows it."""

    def __init__(self, machine, settings, verify=False):
        self.machine = machine
        self.settings = settings
        self.verify = verify
        self.staging = bytearray(256 * PAGE)
        self.cache = None
        self._delta_out = bytearray(memory.BATCH_PAGES * PAGE)
        self._lengths = array.array("i", bytes(4 * memory.BATCH_PAGES))

    def _ensure(self, npages):
        """On the pause path: only when the dirty set outgrew every earlier one."""
        if len(self.staging) < npages * PAGE:
            self.staging = bytearray(max(npages * PAGE, 2 * len(self.staging)))

    def reserve(self, npages):
        """Off the pause path: grow the staging buffer ahead of need and touch its pages,
        so the next pause neither allocates nor takes page faults on it."""
        if len(self.staging) < npages * PAGE:
            self.staging = bytearray(npages * PAGE)
            self.staging[::PAGE] = bytes(npages)

    def stage(self):
        """The pause: park, harvest, copy, capture, unpark. Returns Staged."""
        m = self.machine
        st = Staged()
        st.t_start = time.perf_counter()
        was_running = m.park_quietly()
        try:
            pfns = m.memory.harvest()
            self._ensure(len(pfns))
            st.kept, st.zero_flags = pages.gather(m.memory.ram, pfns, self.staging)
            st.pfns = pfns
            st.cpu = m.vcpu.get_state()
            st.devices = m.device_states()
            st.marks = (m.console_out.produced, m.serial_out.produced)
            st.digest = self._digest() if self.verify else None
        finally:
            m.unpark_quietly(was_running)
        st.pause_s = time.perf_counter() - st.t_start
        return st

    def _digest(self):
        ram = self.machine.memory.ram
        return pages.page_hashes(ram, self.machine.memory.all_pages())

    def send(self, ch, st, checkpoint_id):
        """Send a staged checkpoint (guest running). Returns (payload bytes, raw bytes)."""
        caps = self.settings.capabilities
        compress = caps.get("compress", False)
        use_xbzrle = caps.get("xbzrle", False)
        nonzero, zero = memory.split_zero(st.pfns, st.zero_flags, st.kept)
        info = {"id": checkpoint_id, "dirty": len(st.pfns), "zero": len(zero)}
        if st.digest is not None:
            info["digest"] = True
        start = ch.bytes_sent
        ch.send_msg(Msg.VMSTATE_SEND)
        ch.send_section(Section.CHECKPOINT, json.dumps(info).encode())
        if use_xbzrle:
            self._send_xbzrle(ch, nonzero, zero, compress)
        else:
            for i in range(0, len(nonzero), memory.BATCH_PAGES):
                chunk = memoryview(self.staging)[i * PAGE:min(len(nonzero), i + memory.BATCH_PAGES) * PAGE]
                ch.send_section(Section.RAM, memory.ram_payload(
                    nonzero[i:i + memory.BATCH_PAGES], chunk, compress))
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
        raw = len(st.pfns) * PAGE + len(devstate)
        # room for twice this checkpoint's dirty set, prepared while the guest runs
        self.reserve(2 * len(st.pfns))
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
            raw = memoryview(self.staging)[i * PAGE:(i + len(pf)) * PAGE]
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
