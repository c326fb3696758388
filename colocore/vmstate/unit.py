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
OPENING_MAX = 64 << 10
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
        self.checked = False   # check() passed: apply() cannot fail on its content

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
        # the opening section is small JSON: a stranger may not make us buffer more
        section, payload = reader.read_section(limit=OPENING_MAX)
        if section != opening:
            raise StreamError("%s: a %s does not start with a %s section (found %s)"
                              % (what, kind, opening.name, section.name))
        unit.info = _decode(what, section, payload, npages, ram, opening=True)
        if opening == Section.MACHINE and npages is None:
            npages = unit.info["mem_size"] // PAGE
        if on_opening is not None:
            on_opening(unit.info)
    allowed = _BODY[kind]
    # A buffered unit never holds more pages than the guest has: a legitimate writer
    # sends each page once per unit, so more is a lie, refused before it is allocated.
    budget = npages if ram_sink is None else None
    while True:
        section, payload = reader.read_section()
        if section == Section.END:
            break
        if section not in allowed:
            raise StreamError("%s: unexpected %s section in a %s" % (what, section.name, kind))
        if budget is not None and section in _RAM_KINDS:
            claimed = sections.claimed_pages(section, payload)
            if claimed > budget:
                raise StreamError("%s: the %s claims more pages than the guest's %d"
                                  % (what, kind, npages))
            budget -= claimed
        value = _decode(what, section, payload, npages, ram)
        if section in _RAM_KINDS:
            pfns, data = value
            if ram_sink is not None:
                ram_sink(section, pfns, data)
            elif data is None:
                unit.zero.append(pfns)
            else:
                unit.ram.append((pfns, data))
        elif section == Section.CPU:
            unit.cpu = value
        elif section == Section.DEVICES:
            unit.devices = value
        elif section == Section.CHECKPOINT:       # only in a device part: the debug digest
            unit.digest = value
    if kind != "checkpoint" and (unit.cpu is None or unit.devices is None):
        raise StreamError("%s: the %s has no %s section" % (
            what, kind, "CPU" if unit.cpu is None else "DEVICES"))
    unit.bytes += reader.bytes_read - start
    return unit


_RAM_KINDS = (Section.RAM, Section.RAM_ZERO, Section.RAM_DELTA)


def _decode(what, section, payload, npages, ram, opening=False):
    """One section, through its decoder. Whatever goes wrong inside a decoder is the
    stream's fault and becomes a StreamError: nothing a peer sends may escape as another
    exception (it would kill the thread that reads it)."""
    try:
        if section == Section.MACHINE:
            return sections.decode_machine(payload)
        if section == Section.CHECKPOINT:     # opens a checkpoint; in a device part, the digest
            if opening:
                return sections.decode_checkpoint_info(payload)
            return sections.decode_digest(payload, npages)
        if section == Section.RAM:
            return sections.decode_ram(payload, npages)
        if section == Section.RAM_ZERO:
            return sections.decode_zero(payload, npages), None
        if section == Section.RAM_DELTA:
            return sections.decode_delta(payload, ram, npages)
        if section == Section.CPU:
            return sections.decode_cpu(payload)
        if section == Section.DEVICES:
            return sections.decode_devices(payload)
    except StreamError as exc:
        raise StreamError("%s: %s" % (what, exc)) from None
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError,
            MemoryError, UnicodeError) as exc:
        raise StreamError("%s: malformed %s section (%s: %s)"
                          % (what, section.name, type(exc).__name__, exc)) from None
    raise StreamError("%s: no decoder for a %s section" % (what, section.name))


# ---- applying --------------------------------------------------------------------------------

def check(unit, machine, what):
    """Check the unit's vCPU and device state against the machine (StreamError if it would
    not load); from then on `apply()` cannot fail on the unit's content. Changes
    nothing."""
    unit.devices = machine.check_state(unit.cpu, unit.devices, what)
    unit.checked = True


def apply(unit, machine, cache=None, own_dirty=None):
    """Apply a checked unit to the parked machine, all or nothing: the vCPU first (the one
    part the kernel may still refuse; then the machine is left as it was and StreamError
    raised), then RAM and devices, which cannot fail.

    `cache` (a hybrid COLO secondary's RAM cache: guest RAM as of the last checkpoint it
    loaded) gets the unit's pages too, and the pages the secondary's own guest wrote
    since then (`own_dirty`) are first put back from it: so RAM becomes exactly the
    primary's state at its capture, whatever the secondary's guest did meanwhile."""
    assert unit.checked, "apply() of a unit that was not check()ed"
    machine.load_vcpu(unit.cpu)
    ram = machine.memory.ram
    targets = (ram,) if cache is None else (ram, cache)
    if cache is not None and own_dirty is not None and len(own_dirty):
        pages.copy_pages(ram, cache, own_dirty)
    for pfns in unit.zero:
        for target in targets:
            pages.fill_zero(target, pfns)
    for pfns, data in unit.ram:
        for target in targets:
            pages.scatter(target, pfns, data)
    machine.load_devices(unit.devices)
