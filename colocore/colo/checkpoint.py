"""One checkpoint: what the primary captures on the pause path and sends, and what the
secondary receives whole before it touches its VM.

Primary: `Checkpointer.capture()` IS the pause path. It runs inside the vCPU's run loop
when the guest runs (`checkpoint_pause`) and does only what must happen while the
guest is stopped: the RAM capture (colocore_ext/capture.pyx: hot pages copied, short runs
copied and re-protected, long runs write-protected for copy-on-write), the vCPU state,
the device state. Nothing else may run while the guest is stopped: no allocation (the
staging memory is mapped once and touched ahead of need after a checkpoint), no Python
loop over pages, nothing that can move once the guest runs (the copier writes into
staging memory that stays where it is). `send()` runs after the guest resumed: it waits
for the copier, drops hot pages that did not change, splits zero pages, XBZRLE against
the last-sent cache, lz4, framing. Between checkpoints `precopy()` copies cold dirty
pages early, so that the pause handles only what was written since.

Secondary: `receive()` reads a whole checkpoint into a Unit and verifies every section;
the secondary applies it (vmstate/unit.py) only after it arrived whole.
"""
import array
import logging
import time

from colocore_ext import pages, xbzrle
from colocore_ext.capture import Capture as RamCapture

from colocore.colo import faults
from colocore.errors import StreamError
from colocore.migration.transport import Msg, U64
from colocore.vmstate import format as stream, sections, unit as units
from colocore.vmstate.format import Section
from colocore.vmstate.sections import BATCH_PAGES, PAGE

log = logging.getLogger("colocore.checkpoint")

MAX_DEVICE_STATE = 64 << 20
ZERO_PAGE = bytes(PAGE)


class Capture:
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


def checkpoint_pause(m, ram, in_pause):
    """One checkpoint pause of machine `m`: `ram`'s pause (a colocore_ext.capture.Capture),
    the vCPU state, then `in_pause()` (device state), the guest stopped throughout.
    Returns (vCPU state, seconds the guest was held, served in the run loop).

    A running vCPU serves it inside its run loop (Vcpu.capture_begin): the guest resumes
    from there, with no thread hand-off on the way. A vCPU that is parked (the operator
    stopped the guest) or leaving its loop is parked here and the capture runs on this
    thread, as before."""
    t0 = time.perf_counter()
    v = m.vcpu
    if v.capture_begin(ram, in_pause):
        m.platform.wake()                # a guest idling in WAIT is not in KVM_RUN
        if v.capture_wait():
            return v.captured_state(), (v.t_resume - v.t_request) / 1e6, True
    was_running = m.park_quietly()
    try:
        ram.pause()
        cpu = v.get_state()
        in_pause()
    finally:
        m.unpark_quietly(was_running)
        ram.start_copier()
    return cpu, time.perf_counter() - t0, False


class Checkpointer:
    """The primary's pause-path capture and the send that follows it. close() it when
    COLO ends: that waits for the copier and lifts every write-protection."""

    def __init__(self, machine, settings, verify=False):
        self.machine = machine
        self.settings = settings
        self.verify = verify
        self.cache = None
        self.cache_size = None
        self._delta_out = bytearray(BATCH_PAGES * PAGE)
        self._lengths = array.array("i", bytes(4 * BATCH_PAGES))
        want_cow = settings.cow_supported
        self.ram = RamCapture(machine.memory.dirty, cow=want_cow,
                              hot_max=settings.parameters["x-colo-hot-pages"])
        if want_cow and not self.ram.cow_ready:
            # the kernel offered write-protect, but not for this guest's RAM
            settings.cow_unavailable(self.ram.cow_reason)
        settings.say_copy_once()
        self.ram.reserve(256)

    def close(self):
        self.ram.close()

    def precopy(self):
        """Between checkpoints (x-colo-precopy): copy the cold dirty pages written so far.
        Returns the pages copied."""
        threshold = self.settings.parameters["x-colo-precopy"]
        if threshold <= 0:
            return 0
        self.ram.precopy_min = threshold
        return self.ram.precopy()

    def capture(self):
        """The pause. Returns Capture; the cow pages are still being copied."""
        m, ram = self.machine, self.ram
        params = self.settings.parameters
        cap = Capture()
        cap.mode = pause_mode(self.settings, ram.cow_ready, m.vm.manual_protect)
        ram.cow = cap.mode.endswith("cow")
        ram.hot_max = params["x-colo-hot-pages"]

        def in_pause():                   # device state, guest stopped (GIL held)
            cap.devices = m.device_states(pause=True)   # held frames counted, not copied
            cap.marks = m.output_marks()
            cap.digest = self._digest() if self.verify else None
        cap.t_start = time.perf_counter()
        cap.cpu, cap.pause_s, cap.in_loop = checkpoint_pause(m, ram, in_pause)
        v = m.vcpu
        # kick: the signal landing (the guest still runs meanwhile); ram: dirty log,
        # lists, write-protection, then the copying left after devices; vcpu, devices
        cap.steps_us = {"kick": v.t_exit - v.t_request,
                        "ram": (v.t_ram - v.t_exit) + (v.t_resume - v.t_dev),
                        "vcpu": v.t_vcpu - v.t_ram, "devices": v.t_dev - v.t_vcpu} \
            if cap.in_loop else {}
        cap.dirty, cap.hot, cap.cow, cap.in_pause = ram.last_dirty, ram.last_hot, ram.last_cow, ram.last_in_pause
        return cap

    def _digest(self):
        mem = self.machine.memory
        return pages.page_hashes(mem.ram, mem.all_pages())

    def send(self, ch, cap, checkpoint_id):
        """Send a captured checkpoint (guest running). Returns (bytes sent, raw bytes)."""
        ram = self.ram
        ram.wait_copied()
        cap.faults = ram.last_faults
        err = ram.take_copy_error()
        if err:
            log.warning("KVM_CLEAR_DIRTY_LOG failed (errno %d) after checkpoint %d: those pages "
                        "stay dirty and are sent again; nothing is lost", err, checkpoint_id)
        cap.skipped = ram.compare_hot()
        nonzero, zero = ram.plan_send()
        caps = self.settings.capabilities
        compress = caps.get("compress", False)
        info = {"id": checkpoint_id, "dirty": cap.dirty, "zero": len(zero), "hot": cap.hot,
                "unchanged": cap.skipped}
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
                n = min(BATCH_PAGES, len(nonzero) - i)
                w.section(Section.RAM, sections.encode_ram(nonzero[i:i + n], ram.batch(i, n),
                                                           compress))
        if len(zero):
            w.section(Section.RAM_ZERO, zero.tobytes())
        if faults.armed("mid-ram", checkpoint_id):
            framed = stream.section_bytes(Section.RAM, sections.encode_ram(
                array.array("I", [0]), ZERO_PAGE, False))
            ch.send(framed[:len(framed) // 2])
            faults.crash("mid-ram", checkpoint_id)
        w.end()
        # The device part goes as one blob after vmstate-size, as QEMU sends it; what the
        # pause only counted (the NIC's held frames) is copied now, the guest running.
        self.machine.complete_device_states(cap.devices)
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
        raw = cap.dirty * PAGE + len(devstate)
        # room for twice this checkpoint's dirty set, touched while the guest runs
        ram.reserve(2 * cap.dirty)
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
            raw = self.ram.batch(i, len(pf))
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
