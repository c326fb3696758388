"""Cutting QMP's byte stream into JSON texts, as QEMU's json-streamer does: messages
need no newline and may span lines; strings and escapes are respected; 0xff resets.

Fast on purpose: it runs on the node's control thread, and a Python loop per byte (what
it replaced) ran at ~11 MiB/s there, so a few clients could stall the guest's console.
"""
import re

from colocore.errors import QmpError

# One JSON message may not be bigger than this (QEMU limits token size and count too).
MAX_MESSAGE = 1 << 20
MAX_NESTING = 1024


# Each pattern runs over what does not matter and stops at the next byte that does. sre
# runs a character class at ~70 MB/s here, bytes.find at GB/s: long strings (what a big or
# hostile message is made of) are crossed with find, the rest with sre over a small window.
_WINDOW = 4096
_NESTED_SKIP = re.compile(rb'[^{}\[\]"]*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"[^{}\[\]"]*+)*+',
                          re.DOTALL)              # content and whole strings, in a nesting
_TOP = re.compile(rb'[^{}\[\]"\xff \t\r\n]*+')    # between messages: a bare token


def _next_quote_or_escape(data, pos, n):
    q = data.find(b'"', pos)
    e = data.find(b"\\", pos, q if q >= 0 else n)
    return e if e >= 0 else q if q >= 0 else n


class JsonFramer:
    """Cut a byte stream into JSON texts by bracket depth (strings and escapes aware).

    Each chunk is scanned with compiled regexes that jump from one structural byte to the
    next (a Python loop per byte ran at ~11 MiB/s on the control thread); the bytes of an
    unfinished message are kept once per chunk, not per byte.

    `feed(data)` returns a list of items: bytes (one JSON text, possibly malformed) or a
    QmpError (the input broke a limit; the framer has skipped to the next newline).
    `pending` is the number of bytes of the unfinished message held."""

    def __init__(self, limit=MAX_MESSAGE):
        self.limit = limit
        self.buf = bytearray()
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.scalar = False       # a bare token at depth 0 is being collected
        self.skipping = False     # after an oversized message: drop input up to a newline

    @property
    def pending(self):
        return len(self.buf)

    def feed(self, data):
        out = []
        n = len(data)
        pos = 0
        start = 0                 # where the unfinished message begins in `data`
        while True:
            if pos >= n:
                # an escape may have stepped over the end: the held bytes still count
                if not self.skipping and (self.depth or self.in_string or self.scalar) \
                        and len(self.buf) + n - start > self.limit:
                    pos = self._overflow_at(out, start + self.limit - len(self.buf))
                    continue
                break
            if self.skipping:
                i = data.find(b"\n", pos)
                if i < 0:
                    return out
                self.skipping = False
                pos = start = i + 1
                continue
            if self.escape:
                self.escape = False
                pos += 1
                continue
            top = self.depth == 0 and not self.in_string
            if self.in_string:
                i = _next_quote_or_escape(data, pos, n)
                m = i < n
            elif self.depth:
                # one match over plain content and whole strings, up to the next bracket,
                # or a string that does not end within the window (then the string's
                # own search, memchr-fast, takes over)
                i = _NESTED_SKIP.match(data, pos, min(n, pos + _WINDOW)).end()
                m = i < n
            else:
                i = _TOP.match(data, pos).end()
                m = i < n
            if top and i > pos:
                self.scalar = True                # bare bytes at the top level
            # The message may not grow past the limit. The bytes before i are plain
            # content; the first one past the limit is where input is dropped up to the
            # next newline (exactly where a byte-by-byte framer would drop it).
            held = len(self.buf) - start
            if (self.depth or self.in_string or self.scalar) and held + i > self.limit:
                pos = self._overflow_at(out, start + self.limit - len(self.buf))
                continue
            if not m:
                break
            c = data[i]
            pos = i + 1
            closes = not self.in_string and self.depth == 1 and c in b"}]"
            if not (top and c in b"{}[]\xff \t\r\n") and not closes \
                    and held + pos > self.limit:
                pos = self._overflow_at(out, i)
                continue
            if self.in_string:
                if c == 0x5c:
                    self.escape = True
                else:
                    self.in_string = False
                continue
            if top:
                if c in b"{[":
                    if self.scalar:
                        out.append(self._take(data, start, i))
                        self.scalar = False
                    start = i
                    self.depth = 1
                elif c in b"}]":
                    out.append(self._take(data, start, pos))
                    self.scalar = False
                    start = pos
                elif c == 0x22:                   # a string at the top level
                    self.scalar = True
                    self.in_string = True
                else:                             # whitespace or 0xff ends a bare token
                    if self.scalar and c != 0xff:
                        out.append(self._take(data, start, i))
                    if c == 0xff:                 # QEMU: 0xff resets the parser
                        self.buf.clear()
                    self.scalar = False
                    start = pos
                continue
            if c == 0x22:
                self.in_string = True
            elif c in b"{[":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    out.append(self._overflow("JSON nesting depth limit exceeded"))
            else:
                self.depth -= 1
                if self.depth == 0:
                    out.append(self._take(data, start, pos))
                    start = pos
        if not self.skipping and (self.depth or self.in_string or self.scalar or self.escape):
            self.buf += data[start:]
        return out

    def _overflow_at(self, out, j):
        """The byte at j broke the size limit: report it, skip from the next byte."""
        out.append(self._overflow("JSON message exceeds the size limit of %d bytes" % self.limit))
        return j + 1

    def _take(self, data, start, end):
        if self.buf:
            item = bytes(self.buf) + data[start:end]
            self.buf.clear()
        else:
            item = bytes(data[start:end])
        return item

    def _overflow(self, why):
        self.buf.clear()
        self.depth = 0
        self.in_string = self.escape = self.scalar = False
        self.skipping = True
        return QmpError(why)
