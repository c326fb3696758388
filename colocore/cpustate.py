"""vCPU state <-> CPU section payload: named blobs, `u16 name length | name | u32 length | blob`."""
import struct

from .errors import StreamError


def encode(state):
    out = []
    for name, blob in state.items():
        n = name.encode()
        out.append(struct.pack("<H", len(n)) + n + struct.pack("<I", len(blob)) + blob)
    return b"".join(out)


def decode(payload):
    state, off = {}, 0
    while off < len(payload):
        if off + 2 > len(payload):
            raise StreamError("CPU section truncated")
        (nl,) = struct.unpack_from("<H", payload, off)
        name = payload[off + 2:off + 2 + nl].decode("ascii", "replace")
        off += 2 + nl
        if off + 4 > len(payload):
            raise StreamError("CPU section truncated in %r" % name)
        (bl,) = struct.unpack_from("<I", payload, off)
        off += 4
        if off + bl > len(payload):
            raise StreamError("CPU section: %r runs past the section" % name)
        state[name] = bytes(payload[off:off + bl])
        off += bl
    return state
