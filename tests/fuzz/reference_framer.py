"""The byte-by-byte JSON framer colocore's QMP used before issue 11, kept as the oracle
of the differential fuzzer: the fast framer (control/qmp.py) must cut every stream, in
every chunking, exactly as this one does."""
from colocore.control.jsonframer import MAX_MESSAGE, MAX_NESTING
from colocore.errors import QmpError


class JsonFramer:
    """Cut a byte stream into JSON texts by bracket depth (strings and escapes aware).

    `feed(data)` returns a list of items: bytes (one JSON text, possibly malformed) or a
    QmpError (the input broke a limit; the framer has skipped to the next newline)."""

    def __init__(self, limit=MAX_MESSAGE):
        self.limit = limit
        self.buf = bytearray()
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.skipping = False     # after an oversized message: drop input up to a newline

    def feed(self, data):
        out = []
        for b in data:
            if self.skipping:
                if b == 0x0a:
                    self.skipping = False
                continue
            if self.depth == 0 and not self.in_string:
                if b in b" \t\r\n":
                    if self.buf:                    # a bare scalar ended
                        out.append(bytes(self.buf))
                        self.buf.clear()
                    continue
                if b == 0xff:                       # QEMU: 0xff resets the parser
                    self.buf.clear()
                    continue
                if b in b"}]":
                    self.buf.append(b)
                    out.append(bytes(self.buf))
                    self.buf.clear()
                    continue
                if b in b"{[" and self.buf:
                    out.append(bytes(self.buf))
                    self.buf.clear()
            self.buf.append(b)
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif b == 0x5c:
                    self.escape = True
                elif b == 0x22:
                    self.in_string = False
            elif b == 0x22:
                self.in_string = True
            elif b in b"{[":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    out.append(self._overflow("JSON nesting depth limit exceeded"))
                    continue
            elif b in b"}]":
                self.depth -= 1
                if self.depth == 0:
                    out.append(bytes(self.buf))
                    self.buf.clear()
            if len(self.buf) > self.limit:
                out.append(self._overflow("JSON message exceeds the size limit of %d bytes"
                                          % self.limit))
        return out

    def _overflow(self, why):
        self.buf.clear()
        self.depth = 0
        self.in_string = self.escape = False
        self.skipping = True
        return QmpError(why)
