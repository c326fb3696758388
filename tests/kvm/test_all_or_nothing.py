"""A unit is applied whole or not at all (issue 11, "a checkpoint can be half-applied").

On a real machine with a running kvstore guest (paused here): checkpoint units built from
its real state are mutated at random (hypothesis), framed, read through the one verifying
reader, checked and applied. Whatever step refuses a unit, the machine's page hashes, vCPU
state and device states afterwards equal those before it. A unit that is accepted is
applied whole, and the original state is put back for the next example.
"""
import array
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from colocore.errors import StreamError
from colocore.vm.machine import Machine
from colocore.vmstate import format as stream, sections, unit as units
from colocore.vmstate.format import Section
from colocore_ext import pages

MEM = 32 << 20


@pytest.fixture(scope="module")
def machine():
    m = Machine(MEM, "all-or-nothing")
    m.boot("kvstore")
    m.start_thread()
    m.resume()
    import time
    time.sleep(0.5)              # let the guest set itself up: real vCPU and device state
    m.pause()
    m.original = _whole(m)
    yield m
    m.close()


def _whole(m):
    """The machine's whole state as a checked unit, to put it back after each example (so
    that every example starts from the same state: hypothesis wants reproducible runs)."""
    u = units.Unit("checkpoint", {"id": 0})
    u.ram = [(m.memory.all_pages(), bytes(m.memory.ram))]
    u.cpu, u.devices = m.vcpu.get_state(), m.device_states()
    units.check(u, m, "original state")
    return u


def _snapshot(m):
    return (pages.page_hashes(m.memory.ram, m.memory.all_pages()), m.vcpu.get_state(),
            m.device_states())


def _without_clocks(cpu):
    """The vCPU state less what moves while it is parked: the TSC (MSR 0x10)."""
    cpu = dict(cpu)
    msrs = cpu.pop("msrs")
    n = struct.unpack_from("<I", msrs)[0]
    entries = [msrs[8 + 16 * i:24 + 16 * i] for i in range(n)]
    cpu["msrs"] = [e for e in entries if struct.unpack_from("<I", e)[0] != 0x10]
    return cpu


def _same(m, before):
    hashes, cpu, devices = _snapshot(m)
    if _without_clocks(cpu) != _without_clocks(before[1]):
        return False
    devices["platform"].pop("clock_ns")            # the guest clock moves on by itself
    want = dict(before[2])
    want["platform"] = dict(want["platform"])
    want["platform"].pop("clock_ns")
    return hashes == before[0] and devices == want


def _sections(m, pfns):
    """A checkpoint of pages `pfns` (their current bytes, one of them changed) and the
    real vCPU and device state, as (kind, payload) of its two parts."""
    raw = bytearray(b"".join(bytes(m.memory.ram[p * 4096:(p + 1) * 4096]) for p in pfns))
    raw[0] ^= 0xFF
    ram = [(Section.CHECKPOINT, sections.encode_json({"id": 1, "dirty": len(pfns)})),
           (Section.RAM, sections.encode_ram(array.array("I", pfns), bytes(raw), False))]
    dev = [(Section.CPU, sections.encode_cpu(m.vcpu.get_state())),
           (Section.DEVICES, sections.encode_devices(m.device_states()))]
    return ram, dev


def _frame(parts):
    return b"".join(stream.section_bytes(k, p) for k, p in parts) + \
        stream.section_bytes(Section.END, b"")


def _load(m, ram_part, dev_part):
    """Read, check and apply one checkpoint as the secondary does; StreamError if refused."""
    npages = m.memory.npages
    u = units.read_unit(stream.file_reader(io.BytesIO(ram_part), "ram part"), "checkpoint",
                        npages=npages, ram=m.memory.ram)
    units.read_unit(stream.file_reader(io.BytesIO(dev_part), "device part"), "device part",
                    npages=npages, unit=u)
    units.check(u, m, "checkpoint")
    units.apply(u, m)


def _pos(data, n):
    """A position in 0..n-1, drawn the same way whatever n is (the state the machine is
    in changes lengths from one example to the next; hypothesis wants stable draws)."""
    return data.draw(st.integers(0, 1 << 24)) % n


def _mutate(parts, data):
    """Change one section's payload: flip bytes, truncate, or replace a field of the
    vCPU/device state with a plausible wrong value."""
    i = data.draw(st.integers(0, len(parts) - 1))
    kind, payload = parts[i]
    how = data.draw(st.sampled_from(["flip", "truncate", "cpu", "device"]))
    if how == "cpu" and kind == Section.CPU:
        state = sections.decode_cpu(payload)
        name = data.draw(st.sampled_from(sorted(state)))
        blob = bytearray(state[name])
        for _ in range(data.draw(st.integers(1, 8))):
            blob[_pos(data, len(blob))] = data.draw(st.integers(0, 255))
        state[name] = bytes(blob)
        payload = sections.encode_cpu(state)
    elif how == "device" and kind == Section.DEVICES:
        state = sections.decode_devices(payload)
        dev = data.draw(st.sampled_from(sorted(state)))
        field = data.draw(st.sampled_from(sorted(state[dev])))
        state[dev][field] = data.draw(st.sampled_from(
            [10 ** 9, -1, 1 << 70, "x", 1.5, None, [], b"\0" * 70000]))
        payload = sections.encode_devices(state)
    elif how == "truncate" and len(payload) > 1:
        payload = payload[:_pos(data, len(payload))]
    else:
        b = bytearray(payload)
        if b:
            for _ in range(data.draw(st.integers(1, 4))):
                b[_pos(data, len(b))] ^= 1 << data.draw(st.integers(0, 7))
        payload = bytes(b)
    parts = list(parts)
    parts[i] = (kind, payload)
    return parts


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_refused_checkpoint_changes_nothing(machine, data):
    m = machine
    units.apply(m.original, m)
    pfns = sorted(data.draw(st.sets(st.integers(0x100, m.memory.npages - 1), min_size=1,
                                    max_size=8)))
    before = _snapshot(m)
    ram_part, dev_part = _sections(m, pfns)
    if data.draw(st.booleans()):
        ram_part = _mutate(ram_part, data)
    else:
        dev_part = _mutate(dev_part, data)
    try:
        _load(m, _frame(ram_part), _frame(dev_part))
    except StreamError:
        assert _same(m, before), "a refused checkpoint changed the machine"
        return
    # accepted (a changed page byte or register is a valid state): applied whole
    u = units.read_unit(stream.file_reader(io.BytesIO(_frame(ram_part)), "ram part"),
                        "checkpoint", npages=m.memory.npages, ram=m.memory.ram)
    for pf, raw in u.ram:
        for k, p in enumerate(pf):
            assert bytes(m.memory.ram[p * 4096:(p + 1) * 4096]) == raw[k * 4096:(k + 1) * 4096]


def test_a_vcpu_state_the_kernel_refuses_is_refused_before_anything_is_written(machine):
    m = machine
    units.apply(m.original, m)
    before = _snapshot(m)
    ram_part, dev_part = _sections(m, [0x200, 0x201])
    state = m.vcpu.get_state()
    sregs = bytearray(state["sregs"])
    # CR0 is the first u64 after the eight 24-byte segment registers (CS..SS, TR, LDT) and
    # the two 16-byte tables (GDT, IDT) of kvm_sregs; PG without PE is a combination KVM
    # refuses on KVM_SET_SREGS
    cr0_off = 8 * 24 + 2 * 16
    struct.pack_into("<Q", sregs, cr0_off, 0x80000000)
    state["sregs"] = bytes(sregs)
    dev_part[0] = (Section.CPU, sections.encode_cpu(state))
    with pytest.raises(StreamError, match="vCPU state"):
        _load(m, _frame(ram_part), _frame(dev_part))
    assert _same(m, before)
