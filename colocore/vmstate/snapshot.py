"""Whole-machine snapshots: `migrate file:PATH` and `--incoming file:PATH`.

Writing: the vCPU is parked (finish-migrate) and every non-zero page, the vCPU and every
device are written as one unit. Reading: the whole unit is read and every section
verified (and decoded) before the first byte of guest state is touched, so a truncated,
corrupted or foreign file changes nothing.
"""
import os

from colocore import paths
from colocore.errors import ColocoreError, StreamError
from colocore.vmstate import format as stream, unit as units
from colocore.vmstate.format import Section
from colocore.vmstate.sections import BATCH_PAGES, PAGE


def save(machine, path, compress=True):
    """Write the parked machine to `path`: a private temporary beside it (O_EXCL,
    O_NOFOLLOW, 0600), then a rename; a target that exists and is not a regular file (a
    symlink, a device, a directory) is refused (colocore/paths.py). Returns (bytes
    written, non-zero pages)."""
    what = "migrate file:"
    f, tmp = paths.open_private_temp(path, what)
    try:
        with f:
            f.write(stream.header())
            w = units.UnitWriter(f.write)
            w.json(Section.MACHINE, machine.machine_info())
            mem = machine.memory
            npages = w.pages(mem.ram, mem.all_pages(), bytearray(BATCH_PAGES * PAGE), compress,
                             zero=False)
            w.vcpu_and_devices(machine.vcpu.get_state(), machine.device_states())
            w.end()
            f.flush()
            os.fsync(f.fileno())
        paths.commit_temp(tmp, path, what)
    except OSError as exc:
        paths.discard_temp(tmp)
        raise ColocoreError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    except BaseException:
        paths.discard_temp(tmp)
        raise
    return w.bytes + stream.HEADER.size, npages


def read_file(path):
    """Read and verify a snapshot; return its Unit (nothing applied)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ColocoreError("cannot open %s: %s" % (path, exc.strerror or exc)) from None
    with f:
        r = stream.file_reader(f, "snapshot %s" % path)
        r.read_header()
        unit = units.read_unit(r, "snapshot")
        if f.read(1):
            raise StreamError("snapshot %s: trailing bytes after the END section" % path)
    return unit


def load(unit, machine, path):
    """Apply a snapshot read by read_file() to a new (never run) machine."""
    size = unit.info["mem_size"]
    if size != machine.mem_size:
        raise ColocoreError("the saved guest has %d MiB of memory, this node %d MiB; start "
                            "it with -m %dM" % (size >> 20, machine.mem_size >> 20, size >> 20))
    units.check(unit, machine, "snapshot %s" % path)
    units.apply(unit, machine)
    machine.kernel = unit.info.get("kernel")
    machine.append = unit.info.get("append", "")
