"""colocore streams taken apart and put back together, and a structure-aware mutator.

A mutation that leaves the CRCs wrong is refused by the first reader it meets; most of
what this mutator makes has its CRCs recomputed, so it reaches the section decoders, the
unit checks and the apply behind them."""
import json
import random
import struct
import zlib

HEADER = struct.Struct(">8sII")
SECTION = struct.Struct(">IQ")
CRC = struct.Struct(">I")
MAGIC = b"COLOCORE"
KINDS = range(1, 9)          # MACHINE .. RAM_DELTA (vmstate/format.py Section)
JSON_KINDS = (1, 5, 7)       # MACHINE, DEVICES, CHECKPOINT

HOSTILE_NUMBERS = [0, -1, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 + 7, 10 ** 9,
                   10 ** 30, 1e308, -1e308, 0.5, float("nan"), float("inf")]
HOSTILE_VALUES = HOSTILE_NUMBERS + [None, True, False, "", "x" * 1000, [], {}, [1] * 50,
                                    {"__b64__": "*"}, {"__b64__": "AAAA"}, [[[[[]]]]]]


def split_sections(data, offset=HEADER.size):
    """[(kind, payload)] of a well-formed run of sections from `offset`; stops at the
    first thing that is not a whole section. Returns (sections, end offset)."""
    out = []
    pos = offset
    while pos + SECTION.size + CRC.size <= len(data):
        kind, length = SECTION.unpack_from(data, pos)
        end = pos + SECTION.size + length + CRC.size
        if kind not in KINDS or end > len(data):
            break
        out.append((kind, bytes(data[pos + SECTION.size:pos + SECTION.size + length])))
        pos = end
        if kind == 6:                      # END
            break
    return out, pos


def section(kind, payload, fix_crc=True, length=None):
    head = SECTION.pack(kind, len(payload) if length is None else length)
    crc = zlib.crc32(payload, zlib.crc32(head)) if fix_crc else zlib.crc32(payload) ^ 0x5a5a
    return head + payload + CRC.pack(crc & 0xffffffff)


def join(sections, header=True):
    return (HEADER.pack(MAGIC, 1, 0) if header else b"") + b"".join(section(k, p) for k, p in sections)


def _mutate_json(payload, rng):
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    def walk(o, depth=0):
        if isinstance(o, dict) and o:
            key = rng.choice(list(o))
            if rng.random() < 0.5 or depth > 3:
                o[key] = rng.choice(HOSTILE_VALUES)
            else:
                walk(o[key], depth + 1)
            if rng.random() < 0.1 and o:
                del o[rng.choice(list(o))]
        elif isinstance(o, list) and o:
            i = rng.randrange(len(o))
            if rng.random() < 0.5 or depth > 3:
                o[i] = rng.choice(HOSTILE_VALUES)
            else:
                walk(o[i], depth + 1)
    walk(obj)
    if rng.random() < 0.05:
        obj = rng.choice(HOSTILE_VALUES)
    try:
        return json.dumps(obj).encode()
    except ValueError:
        return payload


def _mutate_bytes(payload, rng):
    b = bytearray(payload)
    op = rng.randrange(6)
    if op == 0 and b:                          # flip bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1 and len(b) >= 4:              # a hostile u32 somewhere (counts, sizes)
        i = rng.randrange(len(b) - 3)
        b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 0xffffffff, 0x7fffffff, 1 << 20,
                                                   1 << 18, 65536, 4097]))
    elif op == 2 and b:                        # truncate
        del b[rng.randrange(len(b)):]
    elif op == 3:                              # grow
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 4 and len(b) >= 8:              # the small header of a RAM/delta section
        b[rng.randrange(8)] = rng.randrange(256)
    else:
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(b)


def mutate_sections(sections, rng):
    """A mutated copy: one to three changes to sections, their order or their framing.
    Returns (sections, raw tail bytes to append instead of clean framing, or None)."""
    secs = list(sections)
    for _ in range(rng.randint(1, 3)):
        if not secs:
            break
        i = rng.randrange(len(secs))
        kind, payload = secs[i]
        op = rng.randrange(10)
        if op <= 3:
            payload = _mutate_json(payload, rng) if kind in JSON_KINDS else _mutate_bytes(payload, rng)
            secs[i] = (kind, payload)
        elif op == 4:
            secs[i] = (rng.choice(KINDS), payload)
        elif op == 5:
            secs.insert(rng.randrange(len(secs) + 1), secs[rng.randrange(len(secs))])
        elif op == 6 and len(secs) > 1:
            del secs[i]
        elif op == 7 and len(secs) > 1:
            j = rng.randrange(len(secs))
            secs[i], secs[j] = secs[j], secs[i]
        elif op == 8:
            secs[i] = (kind, _mutate_bytes(payload, rng))
        else:
            # framing itself: a lying length or a bad CRC on this section, cut after it
            raw = b"".join(section(k, p) for k, p in secs[:i])
            lie = rng.choice([len(payload) + 1, len(payload) * 2 + 4096, 1 << 26, 1 << 40])
            raw += section(kind, payload, fix_crc=rng.random() < 0.5,
                           length=lie if rng.random() < 0.5 else None)
            return secs[:i], raw
    return secs, None


def render(sections, tail, header=True):
    if tail is not None:
        return (HEADER.pack(MAGIC, 1, 0) if header else b"") + tail
    return join(sections, header)


def case_rng(seed, index):
    return random.Random((seed << 32) ^ index)
