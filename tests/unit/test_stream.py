"""The stream format refuses truncated, corrupted, foreign and oversized input."""
import io
import struct

import pytest

from colocore.vmstate import format as stream
from colocore.errors import StreamError
from colocore.vmstate.format import Section


def _unit():
    parts = [stream.header()]
    parts += [stream.section_bytes(Section.MACHINE, b'{"mem_size": 16777216}'),
              stream.section_bytes(Section.CPU, b"x" * 100),
              stream.section_bytes(Section.DEVICES, b"{}"),
              stream.section_bytes(Section.END, b"")]
    return b"".join(parts)


def _read(data):
    """Every section up to END, verified (framing only: what they mean is not read)."""
    r = stream.file_reader(io.BytesIO(data), "test stream")
    r.read_header()
    sections = []
    while True:
        kind, payload = r.read_section()
        if kind == Section.END:
            return sections
        sections.append((kind, payload))


def test_round_trip():
    sections = _read(_unit())
    assert [k for k, _ in sections] == [Section.MACHINE, Section.CPU, Section.DEVICES]
    assert sections[1][1] == b"x" * 100


@pytest.mark.parametrize("cut", [3, 15, 17, 30, 60, 100, -1])
def test_truncated(cut):
    data = _unit()
    with pytest.raises(StreamError, match="truncated|too short"):
        _read(data[:cut])


def test_every_flipped_byte_is_caught():
    data = _unit()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(StreamError):
            _read(bytes(bad))


def test_foreign_and_version():
    with pytest.raises(StreamError, match="not a colocore stream"):
        _read(b"\x7fELF" + b"\0" * 100)
    bad = bytearray(_unit())
    struct.pack_into(">I", bad, 8, 99)
    with pytest.raises(StreamError, match="version 99"):
        _read(bytes(bad))


def test_oversized_length_refused_before_reading():
    head = stream.header() + struct.pack(">IQ", int(Section.RAM), stream.MAX_SECTION + 1)
    with pytest.raises(StreamError, match="claims"):
        _read(head)


def test_unknown_section_type():
    data = stream.header() + stream.section_bytes(99, b"abc")
    with pytest.raises(StreamError, match="unknown section type 99"):
        _read(data)
