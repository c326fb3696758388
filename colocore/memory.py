"""Guest RAM as a migration participant: dirty tracking and RAM sections.

RAM section payload (little endian, page numbers are 4 KiB guest frame numbers):

    u8 encoding (0 raw, 1 lz4batch) | u8 flags | u16 reserved | u32 npages
    npages x u32 pfn | data (npages*4096 bytes raw, or an lz4batch blob of them)

RAM_ZERO payload: npages x u32 pfn (pages that are all zeroes now).
"""
import array
import itertools
import struct

from colocore_ext import dirtylog, lz4batch, pages

from .errors import StreamError

PAGE = 4096
BATCH_PAGES = 1024               # 4 MiB of raw pages per RAM section
RAM_HEAD = struct.Struct("<BBHI")
ENC_RAW, ENC_LZ4 = 0, 1


class GuestMemory:
    def __init__(self, vm):
        self.vm = vm
        self.ram = vm.memory()
        self.size = vm.mem_size
        self.npages = self.size // PAGE
        self.dirty = dirtylog.DirtyLog(vm.fd, 0, vm.mem_addr, vm.mem_size,
                                       manual_protect=vm.manual_protect)

    def mark_dirty(self, gpa, length):
        """Device emulation wrote guest RAM: KVM did not see it, the software bitmap does."""
        self.dirty.mark_range(gpa, length)

    def harvest(self):
        """Page numbers dirtied since the last harvest (vCPU must be parked)."""
        return self.dirty.harvest()

    def all_pages(self):
        return array.array("I", range(self.npages))


_INVERT = bytes([1]) + bytes(255)       # zero flag 0 -> keep 1, flag 1 -> keep 0


def split_zero(pfns, zero_flags, kept):
    """(non-zero pfns, zero pfns) of a gather's page list, in list order."""
    if kept == len(pfns):
        return pfns, array.array("I")
    nonzero = array.array("I", itertools.compress(pfns, zero_flags.translate(_INVERT)))
    zero = array.array("I", itertools.compress(pfns, zero_flags))
    return nonzero, zero


def encode_ram(ram, pfns, staging, compress):
    """Return (RAM payload or None, zero pfns) for `pfns` (gathered into `staging`)."""
    kept, flags = pages.gather(ram, pfns, staging)
    out_pfns, zero = split_zero(pfns, flags, kept)
    return ram_payload(out_pfns, memoryview(staging)[:kept * PAGE], compress), zero


def ram_payload(pfns, raw, compress):
    """A RAM section payload for pages `pfns` whose bytes are `raw` (len(pfns) pages)."""
    n = len(pfns)
    if n == 0:
        return None
    if compress:
        blob = lz4batch.compress(raw)
        return b"".join((RAM_HEAD.pack(ENC_LZ4, 0, 0, n), pfns.tobytes(), blob))
    return b"".join((RAM_HEAD.pack(ENC_RAW, 0, 0, n), pfns.tobytes(), raw))


def decode_ram(payload, npages_total):
    """Validate a RAM payload; return (pfns array, page bytes) without applying anything."""
    if len(payload) < RAM_HEAD.size:
        raise StreamError("RAM section too short")
    enc, _flags, _r, n = RAM_HEAD.unpack_from(payload)
    off = RAM_HEAD.size
    if off + 4 * n > len(payload):
        raise StreamError("RAM section page list truncated")
    pfns = array.array("I")
    pfns.frombytes(payload[off:off + 4 * n])
    off += 4 * n
    if n and max(pfns) >= npages_total:
        raise StreamError("RAM section has page %d, the guest has %d pages: a stream for a "
                          "bigger guest?" % (max(pfns), npages_total))
    if enc == ENC_RAW:
        data = payload[off:]
        if len(data) != n * PAGE:
            raise StreamError("RAM section holds %d bytes for %d pages" % (len(data), n))
    elif enc == ENC_LZ4:
        try:
            data = lz4batch.decompress(payload[off:], n * PAGE)
        except ValueError as exc:
            raise StreamError("RAM section: bad lz4 data: %s" % exc) from None
    else:
        raise StreamError("RAM section encoding %d unknown" % enc)
    return pfns, data


def decode_zero(payload, npages_total):
    if len(payload) % 4:
        raise StreamError("RAM_ZERO section length %d is not a multiple of 4" % len(payload))
    pfns = array.array("I")
    pfns.frombytes(payload)
    if len(pfns) and max(pfns) >= npages_total:
        raise StreamError("RAM_ZERO section has page %d past the guest's %d pages"
                          % (max(pfns), npages_total))
    return pfns


def apply_pages(ram, pfns, data):
    pages.scatter(ram, pfns, data)


def apply_zero(ram, pfns):
    pages.fill_zero(ram, pfns)
