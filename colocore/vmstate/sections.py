"""What each section of the stream means: one encoder and one decoder per section kind.

Every decoder validates before it returns and raises StreamError for anything malformed,
whatever the cause (a short payload, bad JSON, a wrong type, a page past the guest's end),
so that every reader (snapshot, end of migration, checkpoint) refuses a bad section the
same way. Decoders never touch the VM: applying is vmstate/unit.py's job.

Payloads (little endian; page numbers are 4 KiB guest frame numbers):

    MACHINE     JSON object: mem_size, name, kernel, append, and for a migration x-colo
    CHECKPOINT  JSON object: id, dirty, zero (opens a checkpoint unit); inside the device
                part of a checkpoint, the debug page digest (u64 per guest page)
    RAM         u8 encoding (0 raw, 1 lz4batch) | u8 flags | u16 reserved | u32 npages |
                npages x u32 pfn | npages*4096 bytes raw, or one lz4batch blob of them
    RAM_ZERO    npages x u32 pfn (pages that are all zeroes now)
    RAM_DELTA   u32 n | n x u32 pfn | n x i32 encoded length | XBZRLE deltas against the
                receiver's current copy of each page (QEMU's XBZRLE: zero-run and
                literal-run lengths as ULEB128, literal bytes)
    CPU         named vCPU state blobs: u16 name length | name | u32 length | blob, ...
    DEVICES     JSON object: one object per device; bytes as {"__b64__": ...}
"""
import array
import base64
import json
import struct

from colocore_ext import lz4batch, xbzrle

from colocore.errors import StreamError

PAGE = 4096
BATCH_PAGES = 1024               # 4 MiB of raw pages per RAM section
RAM_HEAD = struct.Struct("<BBHI")
DELTA_HEAD = struct.Struct("<I")
ENC_RAW, ENC_LZ4 = 0, 1
LZ4_MAX_RATIO = 256
MAX_DEVICE_VALUES = 1 << 16


# ---- JSON sections (MACHINE, CHECKPOINT, DEVICES) --------------------------------------

def encode_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _decode_json_object(payload, what):
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise StreamError("%s section is not valid JSON" % what) from None
    if not isinstance(obj, dict):
        raise StreamError("%s section is not a JSON object" % what)
    return obj


def decode_machine(payload):
    info = _decode_json_object(payload, "MACHINE")
    size = info.get("mem_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE:
        raise StreamError("MACHINE section: mem_size %r is not a page multiple" % (size,))
    for key in ("kernel", "append", "name"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise StreamError("MACHINE section: %s is not a string" % key)
    caps = info.get("capabilities", {})
    if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
        raise StreamError("MACHINE section: capabilities are not a map of on/off")
    if not isinstance(info.get("x-colo", False), bool):
        raise StreamError("MACHINE section: x-colo is not on/off")
    return info


def decode_checkpoint_info(payload):
    info = _decode_json_object(payload, "CHECKPOINT")
    for key in ("id", "dirty", "zero"):
        value = info.get(key, 0)
        if type(value) is not int or value < 0:
            raise StreamError("CHECKPOINT section: %s %.40r is not a count" % (key, value))
    if "id" not in info:
        raise StreamError("CHECKPOINT section has no id")
    return info


def _to_json(obj):
    if isinstance(obj, (bytes, bytearray)):
        return {"__b64__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__b64__"}:
            return base64.b64decode(obj["__b64__"], validate=True)
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def encode_devices(states):
    return encode_json(_to_json(states))


def decode_devices(payload):
    # Parsed JSON costs memory per value, not per byte: bound the values (commas and
    # colons; base64 strings hold neither) before parsing.
    if payload.count(b",") + payload.count(b":") > MAX_DEVICE_VALUES:
        raise StreamError("DEVICES section holds more than %d values" % MAX_DEVICE_VALUES)
    states = _decode_json_object(payload, "DEVICES")
    try:
        return _from_json(states)
    except (ValueError, TypeError, RecursionError):
        raise StreamError("DEVICES section holds malformed bytes") from None


# ---- RAM ----------------------------------------------------------------------------------

def encode_ram(pfns, raw, compress):
    """A RAM payload for pages `pfns` whose bytes are `raw` (len(pfns) pages); None if empty."""
    n = len(pfns)
    if n == 0:
        return None
    if compress:
        blob = lz4batch.compress(raw)
        return b"".join((RAM_HEAD.pack(ENC_LZ4, 0, 0, n), pfns.tobytes(), blob))
    return b"".join((RAM_HEAD.pack(ENC_RAW, 0, 0, n), pfns.tobytes(), raw))


def claimed_pages(kind_name, payload):
    """How many pages a RAM, RAM_ZERO or RAM_DELTA payload says it carries, read from its
    head alone (0 when too short to say: its decoder refuses it)."""
    name = getattr(kind_name, "name", kind_name)
    if name == "RAM_ZERO":
        return len(payload) // 4
    head = RAM_HEAD if name == "RAM" else DELTA_HEAD
    if len(payload) < head.size:
        return 0
    return head.unpack_from(payload)[-1]


def _pfn_list(data, npages_total, what):
    pfns = array.array("I")
    pfns.frombytes(data)
    if len(pfns) and max(pfns) >= npages_total:
        raise StreamError("%s has page %d, the guest has %d pages: a stream for a bigger "
                          "guest?" % (what, max(pfns), npages_total))
    return pfns


def decode_ram(payload, npages_total):
    """(pfns, page bytes) of a RAM payload, validated."""
    if len(payload) < RAM_HEAD.size:
        raise StreamError("RAM section too short")
    enc, _flags, _r, n = RAM_HEAD.unpack_from(payload)
    off = RAM_HEAD.size
    if off + 4 * n > len(payload):
        raise StreamError("RAM section page list truncated")
    if n > npages_total:
        raise StreamError("RAM section claims %d pages, the guest has %d" % (n, npages_total))
    pfns = _pfn_list(payload[off:off + 4 * n], npages_total, "RAM section")
    off += 4 * n
    if enc == ENC_RAW:
        data = payload[off:]
        if len(data) != n * PAGE:
            raise StreamError("RAM section holds %d bytes for %d pages" % (len(data), n))
    elif enc == ENC_LZ4:
        # lz4 cannot expand more than ~255 times (measured 254.7 on zeroes): a claim beyond that is a lie, refused
        # before its output buffer is allocated
        if n * PAGE > LZ4_MAX_RATIO * (len(payload) - off) + PAGE:
            raise StreamError("RAM section: %d lz4 bytes cannot hold %d pages"
                              % (len(payload) - off, n))
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
    return _pfn_list(payload, npages_total, "RAM_ZERO section")


def encode_delta(pfns, lengths, deltas):
    return b"".join((DELTA_HEAD.pack(len(pfns)), pfns.tobytes(), lengths.tobytes(), deltas))


def decode_delta(payload, ram, npages_total):
    """RAM_DELTA -> (pfns, page bytes): the deltas applied to copies of the current pages
    (`ram` is read, never written)."""
    if len(payload) < DELTA_HEAD.size:
        raise StreamError("RAM_DELTA section too short")
    (n,) = DELTA_HEAD.unpack_from(payload)
    off = DELTA_HEAD.size
    if off + 8 * n > len(payload):
        raise StreamError("RAM_DELTA page list truncated")
    if n > npages_total:
        raise StreamError("RAM_DELTA claims %d pages, the guest has %d" % (n, npages_total))
    pfns = _pfn_list(payload[off:off + 4 * n], npages_total, "RAM_DELTA section")
    lengths = array.array("i")
    lengths.frombytes(payload[off + 4 * n:off + 8 * n])
    # every page of the section has a delta of its own (an unchanged page is not sent),
    # so the deltas' lengths account for the section's bytes exactly
    if n and (min(lengths) <= 0 or sum(lengths) != len(payload) - off - 8 * n):
        raise StreamError("RAM_DELTA delta lengths do not add up to the section's bytes")
    base = bytearray(n * PAGE)
    for k, p in enumerate(pfns):
        base[k * PAGE:(k + 1) * PAGE] = ram[p * PAGE:(p + 1) * PAGE]
    try:
        xbzrle.decode_batch(memoryview(payload)[off + 8 * n:], lengths, base)
    except ValueError as exc:
        raise StreamError("RAM_DELTA: %s" % exc) from None
    return pfns, bytes(base)


# ---- CPU ------------------------------------------------------------------------------------

_NAME_LEN = struct.Struct("<H")
_BLOB_LEN = struct.Struct("<I")


def encode_cpu(state):
    out = []
    for name, blob in state.items():
        n = name.encode()
        out.append(_NAME_LEN.pack(len(n)) + n + _BLOB_LEN.pack(len(blob)) + blob)
    return b"".join(out)


def decode_cpu(payload):
    state, off = {}, 0
    while off < len(payload):
        if off + 2 > len(payload):
            raise StreamError("CPU section truncated")
        (nl,) = _NAME_LEN.unpack_from(payload, off)
        name = bytes(payload[off + 2:off + 2 + nl]).decode("ascii", "replace")
        off += 2 + nl
        if off + 4 > len(payload):
            raise StreamError("CPU section truncated in %r" % name)
        (bl,) = _BLOB_LEN.unpack_from(payload, off)
        off += 4
        if off + bl > len(payload):
            raise StreamError("CPU section: %r runs past the section" % name)
        state[name] = bytes(payload[off:off + bl])
        off += bl
    return state


def decode_digest(payload, npages_total):
    if len(payload) != 8 * npages_total:
        raise StreamError("page digest has %d bytes for %d guest pages"
                          % (len(payload), npages_total))
    digest = array.array("Q")
    digest.frombytes(payload)
    return digest
