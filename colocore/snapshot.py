"""Whole-machine snapshots: `migrate file:PATH` and `--incoming file:PATH`.

Writing: the vCPU is parked (finish-migrate) and every non-zero page, the vCPU and every
device are written as one unit. Reading: the whole unit is read and every section
verified (and decoded) before the first byte of guest state is touched, so a truncated,
corrupted or foreign file changes nothing.
"""
import json
import os

from . import cpustate, memory, stream
from .errors import ColocoreError, StreamError
from .machine import decode_devices, encode_devices
from .stream import Section


def write_unit(write, machine, compress=True):
    """Write MACHINE, RAM*, CPU, DEVICES, END with `write(buf)`; returns (bytes, pages)."""
    total, sent_pages = 0, 0

    def put(kind, payload):
        nonlocal total
        for b in stream.pack_section(kind, payload):
            write(b)
            total += len(b)

    put(Section.MACHINE, json.dumps(machine.machine_info()).encode())
    mem = machine.memory
    staging = bytearray(memory.BATCH_PAGES * memory.PAGE)
    allp = mem.all_pages()
    for i in range(0, len(allp), memory.BATCH_PAGES):
        payload, _zero = memory.encode_ram(mem.ram, allp[i:i + memory.BATCH_PAGES], staging, compress)
        if payload is not None:
            put(Section.RAM, payload)
            sent_pages += memory.RAM_HEAD.unpack_from(payload)[3]
    put(Section.CPU, cpustate.encode(machine.vcpu.get_state()))
    put(Section.DEVICES, encode_devices(machine.device_states()))
    put(Section.END, b"")
    return total, sent_pages


def save(machine, path):
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            f.write(stream.header())
            total, pages = write_unit(f.write, machine)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ColocoreError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    return total + stream.HEADER.size, pages


def read_file(path):
    """Read and verify a snapshot; return a LoadedUnit (nothing applied)."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ColocoreError("cannot open %s: %s" % (path, exc.strerror or exc)) from None
    with f:
        r = stream.file_reader(f, "snapshot %s" % path)
        r.read_header()
        sections = r.read_unit()
        if f.read(1):
            raise StreamError("snapshot %s: trailing bytes after the END section" % path)
    return LoadedUnit.from_sections(sections, "snapshot %s" % path)


class LoadedUnit:
    """A verified, decoded unit: machine info, pages, CPU and device states."""

    def __init__(self, info, ram, zero, cpu, devices):
        self.info, self.ram, self.zero, self.cpu, self.devices = info, ram, zero, cpu, devices

    @classmethod
    def from_sections(cls, sections, what, npages=None):
        info, ram, zero, cpu, devices = None, [], [], None, None
        for kind, payload in sections:
            if kind == Section.MACHINE:
                try:
                    info = json.loads(payload)
                    npages = int(info["mem_size"]) // memory.PAGE
                except (ValueError, KeyError, TypeError):
                    raise StreamError("%s: MACHINE section is not valid" % what) from None
            elif kind == Section.RAM:
                if npages is None:
                    raise StreamError("%s: RAM before MACHINE section" % what)
                ram.append(memory.decode_ram(payload, npages))
            elif kind == Section.RAM_ZERO:
                zero.append(memory.decode_zero(payload, npages))
            elif kind == Section.CPU:
                cpu = cpustate.decode(payload)
            elif kind == Section.DEVICES:
                try:
                    devices = decode_devices(payload)
                except ValueError:
                    raise StreamError("%s: DEVICES section is not valid" % what) from None
        for name, part in (("MACHINE", info), ("CPU", cpu), ("DEVICES", devices)):
            if part is None:
                raise StreamError("%s has no %s section" % (what, name))
        return cls(info, ram, zero, cpu, devices)

    def apply(self, machine):
        if int(self.info["mem_size"]) != machine.mem_size:
            raise ColocoreError("the saved guest has %d MiB of memory, this node %d MiB; start "
                                "it with -m %dM" % (int(self.info["mem_size"]) >> 20,
                                                   machine.mem_size >> 20,
                                                   int(self.info["mem_size"]) >> 20))
        machine.check_saved_state(self.cpu, self.devices, "the snapshot")
        # From here on nothing can fail on the content: it was all checked above.
        for pfns in self.zero:
            memory.apply_zero(machine.memory.ram, pfns)
        for pfns, data in self.ram:
            memory.apply_pages(machine.memory.ram, pfns, data)
        machine.vcpu.set_state(self.cpu)
        machine.load_device_states(self.devices)
        machine.kernel = self.info.get("kernel")
        machine.append = self.info.get("append", "")
