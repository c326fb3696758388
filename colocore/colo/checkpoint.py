"""One checkpoint: what the primary captures on the pause path and sends, and what the
secondary receives whole before it touches its VM.

Primary: `Checkpointer.capture()` IS the pause path: park the vCPU, harvest the dirty log,
copy the dirty pages aside, capture vCPU and devices, unpark. Nothing else may run while
the guest is parked: no allocation (the staging buffer is grown after a checkpoint, for
the next one), no Python loop over pages. `send()` runs after the guest resumed: zero-page
split, XBZRLE against the last-sent cache, lz4, framing.

Secondary: `receive()` reads a whole checkpoint into a Unit and verifies every section;
the secondary applies it (vmstate/unit.py) only after it arrived whole.
"""
import array
import time

from colocore_ext import pages, xbzrle

from colocore.colo import faults
from colocore.errors import StreamError
from colocore.migration.transport import Msg, U64
from colocore.vmstate import format as stream, sections, unit as units
from colocore.vmstate.format import Section
from colocore.vmstate.sections import BATCH_PAGES, PAGE

MAX_DEVICE_STATE = 64 << 20
ZERO_PAGE = bytes(PAGE)


class Capture:
    """What a pause captured: dirty pages copied aside, vCPU, devices, output marks."""
    __slots__ = ("pfns", "kept", "zero_flags", "cpu", "devices", "marks", "pause_s",
                 "t_start", "digest")


class Checkpointer:
    """The primary's pause-path capture and the send that follows it."""

    def __init__(self, machine, settings, verify=False):
        self.machine = machine
        self.settings = settings
        self.verify = verify
        self.staging = bytearray(256 * PAGE)
        self.cache = None
        self.cache_size = None
        self._delta_out = bytearray(BATCH_PAGES * PAGE)
        self._lengths = array.array("i", bytes(4 * BATCH_PAGES))

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

    def capture(self):
        """The pause: park, harvest, copy, capture, unpark."""
        m = self.machine
        cap = Capture()
        cap.t_start = time.perf_counter()
        was_running = m.park_quietly()
        try:
            pfns = m.memory.harvest()
            self._ensure(len(pfns))
            cap.kept, cap.zero_flags = pages.gather(m.memory.ram, pfns, self.staging)
            cap.pfns = pfns
            cap.cpu = m.vcpu.get_state()
            cap.devices = m.device_states()
            cap.marks = m.output_marks()
            cap.digest = self._digest() if self.verify else None
        finally:
            m.unpark_quietly(was_running)
        cap.pause_s = time.perf_counter() - cap.t_start
        return cap

    def _digest(self):
        mem = self.machine.memory
        return pages.page_hashes(mem.ram, mem.all_pages())

    def send(self, ch, cap, checkpoint_id):
        """Send a captured checkpoint (guest running). Returns (bytes sent, raw bytes)."""
        caps = self.settings.capabilities
        compress = caps.get("compress", False)
        nonzero, zero = units.split_zero(cap.pfns, cap.zero_flags, cap.kept)
        info = {"id": checkpoint_id, "dirty": len(cap.pfns), "zero": len(zero)}
        if cap.digest is not None:
            info["digest"] = True
        start = ch.bytes_sent
        ch.send_msg(Msg.VMSTATE_SEND)
        w = units.UnitWriter(ch.send)
        w.json(Section.CHECKPOINT, info)
        if caps.get("xbzrle", False):
            self._send_xbzrle(w, nonzero, zero, compress)
        else:
            for i in range(0, len(nonzero), BATCH_PAGES):
                chunk = memoryview(self.staging)[i * PAGE:min(len(nonzero), i + BATCH_PAGES) * PAGE]
                w.section(Section.RAM, sections.encode_ram(nonzero[i:i + BATCH_PAGES], chunk,
                                                           compress))
        if len(zero):
            w.section(Section.RAM_ZERO, zero.tobytes())
        if faults.armed("mid-ram", checkpoint_id):
            framed = stream.section_bytes(Section.RAM, sections.encode_ram(
                array.array("I", [0]), ZERO_PAGE, False))
            ch.send(framed[:len(framed) // 2])
            faults.crash("mid-ram", checkpoint_id)
        w.end()
        # The device part goes as one blob after vmstate-size, as QEMU sends it.
        parts = []
        dev = units.UnitWriter(parts.append)
        dev.vcpu_and_devices(cap.cpu, cap.devices)
        if cap.digest is not None:      # debug mode: per-page hashes of the whole RAM
            dev.section(Section.CHECKPOINT, cap.digest.tobytes())
        dev.end()
        devstate = b"".join(parts)
        faults.crash("before-devstate", checkpoint_id)
        ch.send_msg(Msg.VMSTATE_SIZE, U64.pack(len(devstate)))
        if faults.armed("mid-devstate", checkpoint_id):
            ch.send(devstate[:len(devstate) // 2])
            faults.crash("mid-devstate", checkpoint_id)
        ch.send(devstate)
        raw = len(cap.pfns) * PAGE + len(devstate)
        # room for twice this checkpoint's dirty set, prepared while the guest runs
        self.reserve(2 * len(cap.pfns))
        return ch.bytes_sent - start, raw

    def _send_xbzrle(self, w, nonzero, zero, compress):
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
        for i in range(0, len(nonzero), BATCH_PAGES):
            pf = nonzero[i:i + BATCH_PAGES]
            raw = memoryview(self.staging)[i * PAGE:(i + len(pf)) * PAGE]
            used = self.cache.encode_pages(pf, raw, self._delta_out, self._lengths)
            lengths = self._lengths[:len(pf)]
            whole = array.array("I", (p for p, n in zip(pf, lengths) if n < 0))
            delta_idx = [k for k, n in enumerate(lengths) if n > 0]
            if delta_idx:
                w.section(Section.RAM_DELTA, sections.encode_delta(
                    array.array("I", (pf[k] for k in delta_idx)),
                    array.array("i", (lengths[k] for k in delta_idx)),
                    bytes(self._delta_out[:used])))
            if len(whole):
                if len(whole) == len(pf):
                    body = raw
                else:
                    body = b"".join(raw[k * PAGE:(k + 1) * PAGE]
                                    for k, n in enumerate(lengths) if n < 0)
                w.section(Section.RAM, sections.encode_ram(whole, body, compress))


def receive(ch, machine):
    """Read one checkpoint after VMSTATE_SEND; verify everything; apply nothing."""
    mem = machine.memory
    cp = units.read_unit(ch.reader, "checkpoint", npages=mem.npages, ram=mem.ram)
    ch.expect(Msg.VMSTATE_SIZE)
    size = ch.read_u64()
    if size > MAX_DEVICE_STATE:
        raise StreamError("vmstate-size %d is over the %d limit: corrupted stream"
                          % (size, MAX_DEVICE_STATE))
    blob = ch.read_exact(size)
    units.read_unit(stream.bytes_reader(blob, "device state of checkpoint %d" % cp.info["id"]),
                    "device part", npages=mem.npages, unit=cp)
    if cp.cpu is None or cp.devices is None:
        raise StreamError("checkpoint %d lacks CPU or DEVICES state" % cp.info["id"])
    units.check(cp, machine, "checkpoint %d" % cp.info["id"])
    return cp
