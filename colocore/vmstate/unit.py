"""Units of VM state: the one writer, the one verifying reader and the one apply.

A unit is what is applied as a whole: a snapshot file, the end of a live migration, one
COLO checkpoint. Which sections each kind holds, in order:

    snapshot     MACHINE, RAM*, CPU, DEVICES, END
    migration    MACHINE, (RAM | RAM_ZERO)*, CPU, DEVICES, END    (RAM streams in rounds)
    checkpoint   CHECKPOINT, (RAM | RAM_ZERO | RAM_DELTA)*, END, then, after vmstate-size,
                 a device part: CPU, DEVICES, [CHECKPOINT page digest], END

Reading decodes and validates every section (vmstate/sections.py) into a `Unit`, touching
nothing; `apply()` then writes it into the machine. A migration's RAM is the exception:
the destination's guest never ran, so its pages are written as they arrive (`ram_sink`)
and a migration cut off half-way is scrubbed by the incoming side.
"""
import array
import itertools

from colocore_ext import pages

from colocore.errors import StreamError
from colocore.vmstate import sections
from colocore.vmstate.format import Section, pack_section
from colocore.vmstate.sections import BATCH_PAGES, PAGE

# Section kinds each part of a unit may hold (the opening section is checked apart).
_BODY = {
    "snapshot": {Section.RAM, Section.CPU, Section.DEVICES},
    "migration": {Section.RAM, Section.RAM_ZERO, Section.CPU, Section.DEVICES},
    "checkpoint": {Section.RAM, Section.RAM_ZERO, Section.RAM_DELTA},
    "device part": {Section.CPU, Section.DEVICES, Section.CHECKPOINT},
}
_OPENING = {"snapshot": Section.MACHINE, "migration": Section.MACHINE,
            "checkpoint": Section.CHECKPOINT, "device part": None}


class Unit:
    """A decoded, verified unit; nothing of it is applied yet."""

    def __init__(self, kind, info=None):
        self.kind = kind
        self.info = info if info is not None else {}
        self.ram = []          # [(pfns, page bytes)]
        self.zero = []         # [pfns]
        self.cpu = None
        self.devices = None
        self.digest = None     # debug (--colo-verify): u64 hash per guest page
        self.bytes = 0         # stream bytes it took

    @property
    def npages(self):
        return sum(len(p) for p, _ in self.ram) + sum(len(p) for p in self.zero)


# ---- writing ---------------------------------------------------------------------------------

class UnitWriter:
    """Frames sections onto `write(buffer)` (a file's write, a channel's send)."""

    def __init__(self, write):
        self._write = write
        self.bytes = 0

    def section(self, kind, payload):
        for buf in pack_section(kind, payload):
            self._write(buf)
            self.bytes += len(buf)

    def json(self, kind, obj):
        self.section(kind, sections.encode_json(obj))

    def pages(self, ram, pfns, staging, compress, zero=True, between=None):
        """Copy pages `pfns` out of `ram` batch by batch and send them: RAM sections, and
        RAM_ZERO for the all-zero ones when `zero` (a destination that starts zeroed
        does not need them). `between()` runs after each batch (cancel, bandwidth).
        Returns the number of non-zero pages sent."""
        sent = 0
        for i in range(0, len(pfns), BATCH_PAGES):
            batch = pfns[i:i + BATCH_PAGES]
            kept, zero_flags = pages.gather(ram, batch, staging)
            nonzero, zeroes = split_zero(batch, zero_flags, kept)
            payload = sections.encode_ram(nonzero, memoryview(staging)[:kept * PAGE], compress)
            if payload is not None:
                self.section(Section.RAM, payload)
                sent += kept
            if zero and len(zeroes):
                self.section(Section.RAM_ZERO, zeroes.tobytes())
            if between is not None:
                between()
        return sent

    def vcpu_and_devices(self, cpu, devices):
        self.section(Section.CPU, sections.encode_cpu(cpu))
        self.section(Section.DEVICES, sections.encode_devices(devices))

    def end(self):
        self.section(Section.END, b"")


_INVERT = bytes([1]) + bytes(255)       # zero flag 0 -> keep 1, flag 1 -> keep 0


def split_zero(pfns, zero_flags, kept):
    """(non-zero pfns, zero pfns) of a gather's page list, in list order."""
    if kept == len(pfns):
        return pfns, array.array("I")
    nonzero = array.array("I", itertools.compress(pfns, zero_flags.translate(_INVERT)))
    zero = array.array("I", itertools.compress(pfns, zero_flags))
    return nonzero, zero


# ---- reading --------------------------------------------------------------------------------

def read_unit(reader, kind, npages=None, ram=None, ram_sink=None, unit=None, on_opening=None):
    """Read one unit (or the device part of a checkpoint) up to its END; verify and decode
    every section. `npages` bounds page numbers (a snapshot learns it from MACHINE); `ram`
    is the current guest RAM, read (never written) to decode RAM_DELTA; `ram_sink(kind,
    pfns, data)` receives pages instead of the unit (a live migration's stream);
    `on_opening(info)` may refuse the unit right after its opening section."""
    what = reader.what
    start = reader.bytes_read
    opening = _OPENING[kind]
    if unit is None:
        unit = Unit(kind)
    if opening is not None:
        section, payload = reader.read_section()
        if section != opening:
            raise StreamError("%s: a %s does not start with a %s section (found %s)"
                              % (what, kind, opening.name, section.name))
        if opening == Section.MACHINE:
            unit.info = sections.decode_machine(payload)
            npages = unit.info["mem_size"] // PAGE if npages is None else npages
        else:
            unit.info = sections.decode_checkpoint_info(payload)
        if on_opening is not None:
            on_opening(unit.info)
    allowed = _BODY[kind]
    while True:
        section, payload = reader.read_section()
        if section == Section.END:
            break
        if section not in allowed:
            raise StreamError("%s: unexpected %s section in a %s" % (what, section.name, kind))
        if section == Section.RAM:
            pfns, data = sections.decode_ram(payload, npages)
            _take(unit, ram_sink, Section.RAM, pfns, data)
        elif section == Section.RAM_ZERO:
            _take(unit, ram_sink, Section.RAM_ZERO, sections.decode_zero(payload, npages), None)
        elif section == Section.RAM_DELTA:
            pfns, data = sections.decode_delta(payload, ram, npages)
            _take(unit, ram_sink, Section.RAM, pfns, data)
        elif section == Section.CPU:
            unit.cpu = sections.decode_cpu(payload)
        elif section == Section.DEVICES:
            unit.devices = sections.decode_devices(payload)
        elif section == Section.CHECKPOINT:       # only in a device part: the debug digest
            unit.digest = sections.decode_digest(payload, npages)
    if kind != "checkpoint" and (unit.cpu is None or unit.devices is None):
        raise StreamError("%s: the %s has no %s section" % (
            what, kind, "CPU" if unit.cpu is None else "DEVICES"))
    unit.bytes += reader.bytes_read - start
    return unit


def _take(unit, ram_sink, kind, pfns, data):
    if ram_sink is not None:
        ram_sink(kind, pfns, data)
    elif kind == Section.RAM:
        unit.ram.append((pfns, data))
    else:
        unit.zero.append(pfns)


# ---- applying --------------------------------------------------------------------------------

def check(unit, machine, what):
    """Raise StreamError unless the unit would load into this machine. Changes nothing."""
    machine.check_saved_state(unit.cpu, unit.devices, what)


def apply(unit, machine):
    """Write a verified unit into the (parked) machine: RAM, then the vCPU, then devices.
    Callers `check()` first: from here on nothing may fail on the unit's content."""
    ram = machine.memory.ram
    for pfns in unit.zero:
        pages.fill_zero(ram, pfns)
    for pfns, data in unit.ram:
        pages.scatter(ram, pfns, data)
    machine.vcpu.set_state(unit.cpu)
    machine.load_device_states(unit.devices)
