"""One verifying reader for every unit (snapshot, end of migration, checkpoint): a
malformed section of any kind is refused with a StreamError on every path, before
anything is applied."""
import array
import io
import struct

import pytest

from colocore.errors import StreamError
from colocore.vmstate import format as stream, sections, unit as units
from colocore.vmstate.format import Section

NPAGES = 64
MEM = NPAGES * 4096
RAM = bytearray(MEM)

GOOD = {
    Section.MACHINE: sections.encode_json({"mem_size": MEM, "kernel": None}),
    Section.CHECKPOINT: sections.encode_json({"id": 1, "dirty": 1}),
    Section.RAM: sections.encode_ram(array.array("I", [3]), bytes(range(256)) * 16, False),
    Section.RAM_ZERO: array.array("I", [4, 5]).tobytes(),
    # page 6 with its first byte set to 1: XBZRLE (zero run 0, literal run 1, the byte)
    Section.RAM_DELTA: sections.encode_delta(array.array("I", [6]), array.array("i", [3]),
                                             b"\x00\x01\x01"),
    Section.CPU: sections.encode_cpu({"regs": b"r" * 16}),
    Section.DEVICES: sections.encode_devices({"uart": {"b": b"\x01\x02"}}),
}

BAD = {
    Section.MACHINE: [b"{", b"[]", b'{"mem_size": "1"}', b'{"mem_size": 4097}',
                      b'{"mem_size": 262144, "kernel": 5}', b"[" * 100000],
    Section.CHECKPOINT: [b"", b'{"id": "x"}', b'{"id": true}'],
    Section.RAM: [b"", struct.pack("<BBHI", 0, 0, 0, 2) + b"\0" * 4,
                  struct.pack("<BBHI", 0, 0, 0, 1) + struct.pack("<I", NPAGES) + bytes(4096),
                  struct.pack("<BBHI", 0, 0, 0, 1) + struct.pack("<I", 1) + bytes(100),
                  struct.pack("<BBHI", 9, 0, 0, 1) + struct.pack("<I", 1) + bytes(4096),
                  struct.pack("<BBHI", 1, 0, 0, 1) + struct.pack("<I", 1) + b"\xff" * 20],
    Section.RAM_ZERO: [b"\0\0\0", struct.pack("<I", NPAGES)],
    Section.RAM_DELTA: [b"", struct.pack("<I", 5), struct.pack("<IIi", 1, NPAGES, 3) + b"\0\1\1",
                        struct.pack("<IIi", 1, 1, 7) + b"\x7f", struct.pack("<IIi", 1, 1, 0),
                        struct.pack("<I", 1 << 20) + bytes(8 << 20)],
    Section.CPU: [b"\x05", b"\x01\x00a\xff\xff\xff\xff"],
    Section.DEVICES: [b"{not json", b"[1]", b'{"uart": {"__b64__": "*"}}', b"{" * 50000],
}

LAYOUT = {
    "snapshot": [Section.MACHINE, Section.RAM, Section.CPU, Section.DEVICES],
    "migration": [Section.MACHINE, Section.RAM, Section.RAM_ZERO, Section.CPU, Section.DEVICES],
    "checkpoint": [Section.CHECKPOINT, Section.RAM, Section.RAM_ZERO, Section.RAM_DELTA],
    "device part": [Section.CPU, Section.DEVICES],
}


def _read(kind, parts):
    data = b"".join(stream.section_bytes(k, p) for k, p in parts)
    data += stream.section_bytes(Section.END, b"")
    r = stream.file_reader(io.BytesIO(data), "test %s" % kind)
    return units.read_unit(r, kind, npages=NPAGES, ram=RAM)


@pytest.mark.parametrize("kind", sorted(LAYOUT))
def test_good_units_read_whole(kind):
    u = _read(kind, [(k, GOOD[k]) for k in LAYOUT[kind]])
    if Section.RAM in LAYOUT[kind]:
        assert [list(p) for p, _ in u.ram][0] == [3]
    if Section.RAM_DELTA in LAYOUT[kind]:
        assert list(u.ram[1][0]) == [6] and u.ram[1][1][:2] == b"\x01\x00"
    if Section.CPU in LAYOUT[kind]:
        assert u.cpu == {"regs": b"r" * 16} and u.devices == {"uart": {"b": b"\x01\x02"}}


CASES = [(kind, section, i) for kind, layout in sorted(LAYOUT.items())
         for section in layout for i in range(len(BAD[section]))]


@pytest.mark.parametrize("kind,section,i", CASES)
def test_every_malformed_section_is_refused_on_every_path(kind, section, i):
    parts = [(k, BAD[k][i] if k == section else GOOD[k]) for k in LAYOUT[kind]]
    with pytest.raises(StreamError):
        _read(kind, parts)


@pytest.mark.parametrize("kind", sorted(LAYOUT))
def test_a_section_out_of_place_is_refused(kind):
    foreign = Section.RAM_DELTA if kind != "checkpoint" else Section.CPU
    parts = [(k, GOOD[k]) for k in LAYOUT[kind]] + [(foreign, GOOD[foreign])]
    with pytest.raises(StreamError, match="unexpected|does not start"):
        _read(kind, parts)
