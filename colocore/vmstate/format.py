"""The colocore stream format: snapshots, live migration and COLO checkpoints.

A stream is a header followed by typed sections, each carrying its own CRC-32:

    header   : b"COLOCORE" | u32 version | u32 flags           (big endian)
    section  : u32 type | u64 length | payload | u32 crc32(type|length|payload)

This module knows nothing of RAM, CPUs or devices: it frames and verifies bytes. What a
section means is written down once, in vmstate/sections.py; which sections make a unit
(a snapshot, the end of a migration, a checkpoint), in vmstate/unit.py. Readers verify every section of a unit (a snapshot file, one checkpoint) before
anything is applied, so a truncated or corrupted unit is refused whole.
"""
import enum
import struct
import zlib

from colocore.errors import StreamError

MAGIC = b"COLOCORE"
VERSION = 1
HEADER = struct.Struct(">8sII")
SECTION = struct.Struct(">IQ")
CRC = struct.Struct(">I")
# No section is bigger than this: a length above it is a corrupted or hostile stream,
# refused before a single byte of it is buffered.
MAX_SECTION = 64 << 20


class Section(enum.IntEnum):
    MACHINE = 1       # JSON: memory size, name, kernel, host facts
    RAM = 2           # a batch of pages (see memory.py)
    RAM_ZERO = 3      # page numbers that are all zeroes
    CPU = 4           # named vCPU state blobs
    DEVICES = 5       # JSON: one object per device
    END = 6           # end of a unit (snapshot or checkpoint)
    CHECKPOINT = 7    # JSON: checkpoint id and counts, opens a checkpoint unit
    RAM_DELTA = 8     # XBZRLE deltas against the receiver's copy


def header():
    return HEADER.pack(MAGIC, VERSION, 0)


def check_header(data):
    if len(data) < HEADER.size:
        raise StreamError("stream too short for a colocore header (%d bytes): truncated "
                          "or not a colocore stream" % len(data))
    magic, version, flags = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StreamError("not a colocore stream (magic %r); was it written by "
                          "'migrate file:' of colocore?" % magic)
    if version != VERSION:
        raise StreamError("colocore stream version %d, this colocore reads version %d; "
                          "use the colocore release that wrote it" % (version, VERSION))
    if flags:
        raise StreamError("colocore stream has unknown header flags 0x%x: corrupted, or "
                          "written by a newer colocore" % flags)


def pack_section(kind, payload):
    """Return the framed section as a list of buffers (no copy of a big payload)."""
    head = SECTION.pack(int(kind), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return [head, payload, CRC.pack(crc)]


def section_bytes(kind, payload):
    return b"".join(pack_section(kind, payload))


def _kind_name(kind):
    try:
        return Section(kind).name
    except ValueError:
        return "type %d" % kind


class Reader:
    """Reads verified sections from a blocking `read_exact(n)` callable.

    `read_exact` must return exactly n bytes or raise EOFError / OSError.
    """

    def __init__(self, read_exact, what="stream"):
        self._read_exact = read_exact
        self.what = what
        self.bytes_read = 0

    def _read(self, n):
        try:
            data = self._read_exact(n)
        except EOFError as eof:
            partial = eof.args[0] if eof.args else 0
            if self.bytes_read == 0 and not partial:
                raise StreamError("%s is empty" % self.what) from None
            raise StreamError("%s truncated after %d bytes" % (self.what, self.bytes_read)) from None
        self.bytes_read += len(data)
        return data

    def read_header(self):
        check_header(self._read(HEADER.size))

    def read_section(self, limit=MAX_SECTION):
        """Return (kind, payload) of the next section, verified. A section longer than
        `limit` is refused before a byte of it is buffered."""
        head = self._read(SECTION.size)
        kind, length = SECTION.unpack(head)
        if length > limit:
            raise StreamError("%s: %s section claims %d bytes (limit %d): corrupted stream"
                              % (self.what, _kind_name(kind), length, limit))
        payload = self._read(length) if length else b""
        (crc,) = CRC.unpack(self._read(CRC.size))
        if zlib.crc32(payload, zlib.crc32(head)) != crc:
            raise StreamError("%s: %s section at byte %d fails its checksum: corrupted stream"
                              % (self.what, _kind_name(kind), self.bytes_read - length - 16))
        try:
            kind = Section(kind)
        except ValueError:
            raise StreamError("%s: unknown section type %d: written by a newer colocore?"
                              % (self.what, kind)) from None
        return kind, payload


def file_reader(f, what):
    def read_exact(n):
        data = f.read(n)
        if len(data) != n:
            raise EOFError(len(data))
        return data
    return Reader(read_exact, what)


def bytes_reader(blob, what):
    view = memoryview(blob)
    pos = 0

    def read_exact(n):
        nonlocal pos
        if pos + n > len(view):
            raise EOFError(len(view) - pos)
        data = bytes(view[pos:pos + n])
        pos += n
        return data
    return Reader(read_exact, what)
