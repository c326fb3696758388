"""Plain-Python references of the colocore_ext codecs (same API, same formats).

Slow on purpose: written for clarity, used by the tests to check the Cython code against
(the same test bodies run on both). Formats: see colocore_ext/xbzrle.pyx and lz4batch.pyx.
"""
import array
import struct

PAGE = 4096
MAX_PAGE = 1 << 20


# ---- pages ------------------------------------------------------------------------------

def _check_pages(buf, what):
    if len(buf) % PAGE:
        raise ValueError("%s is not a whole number of pages" % what)
    return len(buf) // PAGE


def _check_pfns(pfns, npages):
    for p in pfns:
        if p >= npages:
            raise IndexError("pfn %d outside %d pages" % (p, npages))


def gather(ram, pfns, staging):
    npages = _check_pages(ram, "guest RAM")
    _check_pages(staging, "the staging buffer")
    if len(staging) < len(pfns) * PAGE:
        raise ValueError("the staging buffer is too small")
    _check_pfns(pfns, npages)
    flags = bytearray(len(pfns))
    kept = 0
    for k, p in enumerate(pfns):
        page = bytes(ram[p * PAGE:(p + 1) * PAGE])
        if page.count(0) == PAGE:
            flags[k] = 1
        else:
            staging[kept * PAGE:(kept + 1) * PAGE] = page
            kept += 1
    return kept, flags


def scatter(dest, pfns, src):
    npages = _check_pages(dest, "the destination")
    if len(src) < len(pfns) * PAGE:
        raise ValueError("the source is too small")
    _check_pfns(pfns, npages)
    for k, p in enumerate(pfns):
        dest[p * PAGE:(p + 1) * PAGE] = src[k * PAGE:(k + 1) * PAGE]


def is_zero_page(buf):
    return bytes(buf).count(0) == len(buf)


_M = (1 << 64) - 1
_P1, _P2, _P3, _P4 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc, w):
    return (_rotl((acc + w * _P2) & _M, 31) * _P1) & _M


def hash_page(page):
    v = [(_P1 + _P2) & _M, _P2, 0, (-_P1) & _M]
    words = struct.unpack("<%dQ" % (len(page) // 8), bytes(page))
    for i in range(0, len(words), 4):
        for j in range(4):
            v[j] = _round(v[j], words[i + j])
    h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
    for x in v:
        h = ((h ^ _round(0, x)) * _P1 + _P4) & _M
    h = (h + len(page)) & _M
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h


def page_hashes(ram, pfns):
    _check_pfns(pfns, _check_pages(ram, "guest RAM"))
    return array.array("Q", [hash_page(ram[p * PAGE:(p + 1) * PAGE]) for p in pfns])


# ---- XBZRLE -------------------------------------------------------------------------------

def _uleb(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode(new_page, old_page, out):
    """Same contract as colocore_ext.xbzrle.encode (writes the delta into `out`)."""
    n = len(new_page)
    if not 0 < n <= MAX_PAGE:
        raise ValueError("bad page length")
    if len(old_page) != n:
        raise ValueError("pages differ in length")
    limit = min(len(out), n - 1)
    new, old = bytes(new_page), bytes(old_page)
    delta = bytearray()
    i = 0
    while True:
        start = i
        while i < n and new[i] == old[i]:
            i += 1
        if i == n:
            break
        zrun = i - start
        start = i
        while i < n and new[i] != old[i]:
            i += 1
        delta += _uleb(zrun) + _uleb(i - start) + new[start:i]
        if len(delta) > limit:
            return -1
    out[:len(delta)] = delta
    return len(delta)


def _read_uleb(delta, i):
    v = shift = 0
    while True:
        if i >= len(delta):
            raise ValueError("malformed page delta: a truncated record at byte %d" % i)
        b = delta[i]
        i += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and shift:
                raise ValueError("malformed page delta: a malformed ULEB128 length")
            return v, i
        shift += 7
        if shift > 14:
            raise ValueError("malformed page delta: a malformed ULEB128 length")


def decode(delta, page):
    """Same contract as colocore_ext.xbzrle.decode: validate all, then apply."""
    n = len(page)
    if not 0 < n <= MAX_PAGE:
        raise ValueError("bad page length")
    delta = bytes(delta)
    records = []
    i = d = 0
    while i < len(delta):
        at = i
        zrun, i = _read_uleb(delta, i)
        if zrun == 0 and at != 0:
            raise ValueError("malformed page delta: a zero-length run at byte %d" % at)
        if zrun > n - d:
            raise ValueError("malformed page delta: a run past the end of the page")
        d += zrun
        nzrun, i = _read_uleb(delta, i)
        if nzrun == 0:
            raise ValueError("malformed page delta: a zero-length run at byte %d" % i)
        if nzrun > n - d:
            raise ValueError("malformed page delta: a run past the end of the page")
        if nzrun > len(delta) - i:
            raise ValueError("malformed page delta: a truncated record")
        records.append((d, delta[i:i + nzrun]))
        i += nzrun
        d += nzrun
    for off, data in records:
        page[off:off + len(data)] = data


# ---- lz4 batches --------------------------------------------------------------------------

def _header(kind, n):
    return b"L4" + bytes((kind, 0)) + struct.pack("<I", n)


def lz4_block_compress(src):
    """A simple greedy LZ4 block compressor (valid lz4, not liblz4's exact output)."""
    src = bytes(src)
    n = len(src)
    out = bytearray()
    table = {}
    anchor = i = 0
    limit = n - 12                         # the last match must start 12 bytes before the end
    while i < limit:
        key = src[i:i + 4]
        cand = table.get(key)
        table[key] = i
        if cand is None or i - cand > 0xFFFF:
            i += 1
            continue
        mlen = 4
        while i + mlen < n - 5 and src[cand + mlen] == src[i + mlen]:
            mlen += 1
        _sequence(out, src[anchor:i], i - cand, mlen)
        i += mlen
        anchor = i
    _sequence(out, src[anchor:], None, 0)
    return bytes(out)


def _ext(out, v):
    while v >= 255:
        out.append(255)
        v -= 255
    out.append(v)


def _sequence(out, literals, offset, mlen):
    lit = len(literals)
    ml = mlen - 4 if offset else 0
    out.append((min(lit, 15) << 4) | min(ml, 15))
    if lit >= 15:
        _ext(out, lit - 15)
    out += literals
    if offset:
        out += struct.pack("<H", offset)
        if ml >= 15:
            _ext(out, ml - 15)


def _read_ext(src, i, length):
    """An LZ4 length continued in bytes of 255 and a last byte below it: (length, next i)."""
    while True:
        if i >= len(src):
            raise ValueError("lz4 batch: malformed lz4 data (truncated length)")
        b = src[i]
        i += 1
        length += b
        if b != 255:
            return length, i


def lz4_block_decompress(src, n):
    """Decode an LZ4 block of exactly n bytes; ValueError on anything malformed."""
    src = bytes(src)
    out = bytearray()
    i = 0
    while True:
        if i >= len(src):
            raise ValueError("lz4 batch: malformed lz4 data (truncated)")
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            lit, i = _read_ext(src, i, lit)
        if i + lit > len(src) or len(out) + lit > n:
            raise ValueError("lz4 batch: malformed lz4 data (literals overrun)")
        out += src[i:i + lit]
        i += lit
        if i == len(src):
            break                           # the last sequence has literals only
        if i + 2 > len(src):
            raise ValueError("lz4 batch: malformed lz4 data (truncated offset)")
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        if offset == 0 or offset > len(out):
            raise ValueError("lz4 batch: malformed lz4 data (bad match offset)")
        ml = token & 15
        if ml == 15:
            ml, i = _read_ext(src, i, ml)
        ml += 4
        if len(out) + ml > n:
            raise ValueError("lz4 batch: malformed lz4 data (match overrun)")
        for _ in range(ml):
            out.append(out[-offset])
    if len(out) != n:
        raise ValueError("lz4 batch: malformed lz4 data (decoded %d of %d bytes)" % (len(out), n))
    return bytes(out)


def compress(buf):
    data = bytes(buf)
    block = lz4_block_compress(data) if data else b""
    if 0 < len(block) < len(data):
        return _header(1, len(data)) + block
    return _header(0, len(data)) + data


def decompress(blob, expected_size):
    blob = bytes(blob)
    if len(blob) < 8:
        raise ValueError("lz4 batch: shorter than the header")
    if blob[:2] != b"L4" or blob[3] != 0 or blob[2] not in (0, 1):
        raise ValueError("lz4 batch: bad header")
    n = struct.unpack_from("<I", blob, 4)[0]
    if n != expected_size:
        raise ValueError("lz4 batch: the header says %d bytes, %d were expected" % (n, expected_size))
    if blob[2] == 0:
        if len(blob) - 8 != n:
            raise ValueError("lz4 batch: raw payload length mismatch")
        return blob[8:]
    if len(blob) == 8:
        raise ValueError("lz4 batch: bad lz4 payload length")
    return lz4_block_decompress(blob[8:], n)
