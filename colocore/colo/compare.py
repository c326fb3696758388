"""The comparer (QEMU's colo-compare, without its known faults): in hybrid mode, which of
the primary guest's frames may go out, and when the two copies diverged.

Both guests run from the same checkpoint on the same input. Every frame the primary's
guest sends is held, numbered in the order it was produced, until the secondary's guest
produced the same output; frames go out in that order, as a prefix of matched frames
(`releasable()`), so the wire sees exactly what the primary's guest sent. What the
secondary's guest sends is only compared, never sent anywhere.

What "the same output" means, per kind of frame:
- TCP, per connection (guest address and port, peer address and port): by payload byte
  range, so different segmentation still matches. A primary segment is matched once the
  secondary sent every byte of its range with the same values (SYN and FIN count as one
  sequence number each, as in TCP), and the secondary acknowledged at least as much of
  the peer's data as the segment does (its ACK is covered by both sides: the secondary
  has the input the primary's answer depends on). A pure ACK needs that ACK covered.
  A byte that differs is a mismatch. Retransmissions of matched bytes match again.
- UDP and ICMP, per flow: the payload of the primary's next frame equals the secondary's
  next one on that flow.
- ARP and anything that is not IPv4 (IPv6, VLAN...): released at once, not compared.

A mismatch, a primary frame left unmatched for longer than `timeout` seconds (the
migration parameter x-compare-timeout), or queues past their bound (`max_frames` frames
or `max_bytes` bytes of the secondary's output held) end the comparison: `divergence()`
says why, and the caller takes a checkpoint. At a checkpoint (`new_epoch`), the primary's
frames produced before its capture go out with it and what the secondary sent before
its suspension is dropped: comparing starts afresh from the checkpoint's state.

Pure Python: one dict operation per frame on the fast path (below); a handful of dict
lookups and one bytes comparison per frame on the rules, no loop over bytes. The frames
are only read, never changed. Long because the frame parser, the secondary's TCP stream
and the rules read best side by side.
"""
import bisect
import collections
import struct
import time

ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MOD = 1 << 32
PAIRED_KEEP = 4096
_U16 = struct.Struct(">H").unpack_from
_TCP = struct.Struct(">HHIIBB").unpack_from


def _after(a, b):
    """TCP sequence comparison: a is at or after b (modulo 2^32)."""
    return ((a - b) % MOD) < (1 << 31)


class Frame:
    """One parsed frame: what the comparer needs of it."""
    __slots__ = ("seqno", "raw", "born", "kind", "key", "seq", "ack", "flags", "payload",
                 "matched")

    def __init__(self, raw, seqno=None, born=0.0, parse=True):
        self.raw = raw
        self.seqno = seqno
        self.born = born
        self.kind = None
        self.matched = False
        if parse:
            self.parse()

    def parse(self):
        raw = self.raw
        self.kind = "other"
        self.key = None
        self.seq = self.ack = self.flags = 0
        self.payload = b""
        if len(raw) < ETH_HLEN + 20 or _U16(raw, 12)[0] != ETHERTYPE_IPV4:
            return
        ihl = (raw[ETH_HLEN] & 0x0F) * 4
        total = _U16(raw, ETH_HLEN + 2)[0]
        proto = raw[ETH_HLEN + 9]
        src, dst = raw[ETH_HLEN + 12:ETH_HLEN + 16], raw[ETH_HLEN + 16:ETH_HLEN + 20]
        l4 = ETH_HLEN + ihl
        end = min(len(raw), ETH_HLEN + total)
        if ihl < 20 or end < l4:
            return
        if proto == PROTO_TCP and end >= l4 + 20:
            sport, dport, seq, ack, off, flags = _TCP(raw, l4)
            hl = (off >> 4) * 4
            if hl < 20 or l4 + hl > end:
                return
            self.kind = "tcp"
            self.key = (src, sport, dst, dport)
            self.seq, self.ack, self.flags = seq, ack, flags
            self.payload = raw[l4 + hl:end]
        elif proto in (PROTO_UDP, PROTO_ICMP):
            self.kind = "flow"
            ident = raw[l4:l4 + 4] if proto == PROTO_UDP else raw[l4 + 4:l4 + 6]
            self.key = (proto, src, dst, bytes(ident))
            self.payload = raw[l4:end] if proto == PROTO_ICMP else raw[l4 + 8:end]


def _rel(seq, origin):
    """seq relative to origin, as a signed 32-bit TCP distance."""
    return ((seq - origin + (1 << 31)) % MOD) - (1 << 31)


class _Stream:
    """What the secondary's guest sent on one TCP connection in this epoch: its segments by
    start (relative to the first one seen; they may come in any order, as the fast path
    parses some of them late), SYN and FIN as markers, its highest ACK, a RST if any.
    Segments wholly before `floor` were matched and dropped (trim), so a primary
    retransmission of those bytes matches again without them."""
    KEEP = 1 << 20

    def __init__(self):
        self.origin = None       # sequence number offsets count from
        self.segs = {}           # offset -> bytes (the longest seen at that offset)
        self.starts = []         # their offsets, sorted
        self.floor = None        # bytes before this offset were matched and dropped
        self.matched = None      # offset up to which primary segments matched
        self.held = 0            # bytes in segs
        self.syn = None          # the secondary's SYN sequence number
        self.fin = None          # the sequence number its FIN took
        self.ack = None          # highest ACK it sent
        self.rst = None          # sequence number of its RST

    def add(self, f):
        """Take one of the secondary's segments; returns the bytes it added to the store."""
        if f.flags & TCP_ACK and (self.ack is None or _after(f.ack, self.ack)):
            self.ack = f.ack
        if f.flags & TCP_RST:
            self.rst = f.seq
            return 0
        start = f.seq
        if f.flags & TCP_SYN:
            self.syn = f.seq
            start = (f.seq + 1) % MOD
        added = 0
        if f.payload:
            if self.origin is None:
                self.origin = start
            off = _rel(start, self.origin)
            old = self.segs.get(off)
            if old is None:
                bisect.insort(self.starts, off)
                self.segs[off] = f.payload
                added = len(f.payload)
            elif len(f.payload) > len(old):
                self.segs[off] = f.payload
                added = len(f.payload) - len(old)
            self.held += added
        if f.flags & TCP_FIN:
            self.fin = (start + len(f.payload)) % MOD
        return added

    def _piece(self, pos):
        """(offset, bytes) of a segment holding offset pos, or None."""
        i = bisect.bisect_right(self.starts, pos) - 1
        for j in range(i, max(i - 8, -1), -1):     # overlapping segments: a few back
            o = self.starts[j]
            if pos < o + len(self.segs[o]):
                return o, self.segs[o]
        return None

    def covers(self, start, payload):
        """True if the secondary sent `payload` at `start`; False if some byte of that
        range it sent differs; None while part of the range is still missing."""
        if self.origin is None:
            return None
        pos = _rel(start, self.origin)
        end = pos + len(payload)
        if self.floor is not None and pos < self.floor:
            pos = min(self.floor, end)                # matched before, dropped since
        while pos < end:
            found = self._piece(pos)
            if found is None:
                return None
            o, piece = found
            n = min(o + len(piece), end) - pos
            at = pos - (end - len(payload))
            if piece[pos - o:pos - o + n] != payload[at:at + n]:
                return False
            pos += n
        if self.matched is None or end > self.matched:
            self.matched = end
        return True

    def trim(self):
        """Drop segments that end KEEP bytes before what was matched; returns bytes dropped."""
        if self.matched is None:
            return 0
        limit = self.matched - self.KEEP
        dropped = 0
        while self.starts and self.starts[0] + len(self.segs[self.starts[0]]) <= limit:
            o = self.starts.pop(0)
            dropped += len(self.segs.pop(o))
        if dropped:
            self.floor = limit if self.floor is None else max(self.floor, limit)
            self.held -= dropped
        return dropped


class Comparer:
    def __init__(self, timeout, max_frames=4096, max_bytes=16 << 20, clock=time.monotonic):
        self.timeout = timeout
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.clock = clock
        self.held = collections.deque()          # the primary's frames not yet released
        self.waiting = {}                        # key -> deque of its unmatched frames
        self.streams = {}                        # TCP key -> _Stream (the secondary's)
        self.flows = {}                          # flow key -> deque of payloads
        self.sec_frames = 0
        self.sec_bytes = 0
        self.mismatch = None                     # why the copies diverged, if they did
        self.stats = collections.Counter()       # compared, matched, mismatched, ...
        # the fast path: frames not parsed yet, by their bytes
        self.pri_raw = {}                        # bytes -> deque of the primary's Frames
        self.pri_pending = 0
        self.sec_raw = {}                        # bytes -> count of the secondary's frames
        self.sec_pending = 0
        self.held_max = 0                        # the most frames held at once
        self.lag_us = 0                          # how long primary frames waited for their
        self.lagged = 0                          # pair (those that came first), in total
        # the secondary's TCP frames paired by bytes lately, for a primary retransmission
        self.sec_paired = collections.deque(maxlen=PAIRED_KEEP)

    # ---- input ---------------------------------------------------------------------------
    # The fast path: two deterministic copies mostly send byte-identical frames, and a
    # primary frame equal byte for byte to one of the secondary's is matched by the rules
    # below too (same connection, bytes, flags and ACK). So frames are first paired by
    # their bytes, with one dict operation and no parsing; only when both sides hold
    # frames the other has not (another segmentation, ACKs sent at other times, or a
    # divergence) does settle() parse the unpaired ones into the rules. A pairing that
    # settle() misses (bytes of the secondary paired by bytes, later needed by another
    # segmentation of the primary) ends in a timeout, i.e. a checkpoint: never a release
    # of what the secondary did not produce.

    def primary(self, raw, seqno):
        """The primary's guest produced frame number `seqno` (consecutive numbers)."""
        f = Frame(raw, seqno, self.clock(), parse=False)
        self.held.append(f)
        if len(self.held) > self.held_max:
            self.held_max = len(self.held)
        if raw[12:14] != b"\x08\x00":
            f.kind = "other"
            f.matched = True                     # ARP, IPv6, ...: not compared
            self.stats["passed"] += 1
            return
        self.stats["compared"] += 1
        n = self.sec_raw.get(raw)
        if n:
            if n == 1:
                del self.sec_raw[raw]
            else:
                self.sec_raw[raw] = n - 1
            self.sec_pending -= 1
            self.sec_bytes -= len(raw)
            f.matched = True
            self.stats["matched"] += 1
            self.sec_paired.append(raw)
            return
        q = self.pri_raw.get(raw)
        if q is None:
            self.pri_raw[raw] = collections.deque((f,))
        else:
            q.append(f)
        self.pri_pending += 1

    def secondary(self, raw):
        """The secondary's guest produced a frame (it never leaves the comparer)."""
        if raw[12:14] != b"\x08\x00":
            return
        q = self.pri_raw.get(raw)
        if q:
            f = q.popleft()
            if not q:
                del self.pri_raw[raw]
            self.pri_pending -= 1
            f.matched = True
            self.stats["matched"] += 1
            self.sec_paired.append(raw)
            self.lag_us += int((self.clock() - f.born) * 1e6)
            self.lagged += 1
            return
        self.sec_raw[raw] = self.sec_raw.get(raw, 0) + 1
        self.sec_pending += 1
        self.sec_bytes += len(raw)

    def settle(self):
        """When both sides hold unpaired frames: parse them and apply the rules."""
        if self.sec_pending and (self.pri_pending or self.waiting):
            self._apply_rules()

    def _apply_rules(self):
        """Parse every unpaired frame into the rules; the secondary's TCP frames paired by
        bytes lately go in too (an unpaired primary segment may span them, or retransmit
        them), each parsed once."""
        paired, self.sec_paired = self.sec_paired, collections.deque(maxlen=PAIRED_KEEP)
        for raw in paired:
            f = Frame(raw)
            if f.kind == "tcp":
                self._add_segment(f)
        sec, self.sec_raw, self.sec_pending = self.sec_raw, {}, 0
        for raw, n in sec.items():
            self.sec_bytes -= len(raw) * n
            for _ in range(n):
                self._slow_secondary(raw)
        pri, self.pri_raw, self.pri_pending = self.pri_raw, {}, 0
        for f in sorted((f for q in pri.values() for f in q), key=lambda f: f.seqno):
            f.parse()
            if f.kind == "other":                # IPv4, but nothing the rules compare
                f.matched = True
                continue
            self.waiting.setdefault(f.key, collections.deque()).append(f)
        for key in list(self.waiting):
            self._match(key)

    def _add_segment(self, f):
        """A secondary TCP segment into its connection's byte stream; the stream."""
        st = self.streams.get(f.key)
        if st is None:
            st = self.streams[f.key] = _Stream()
        self.sec_bytes += st.add(f)
        return st

    def _slow_secondary(self, raw):
        f = Frame(raw)
        if f.kind == "tcp":
            st = self._add_segment(f)
            if st.held > 2 * st.KEEP:
                self.sec_bytes -= st.trim()
        elif f.kind == "flow":
            self.flows.setdefault(f.key, collections.deque()).append(f.payload)
            self.sec_bytes += len(f.payload)
            self.sec_frames += 1
        else:
            return
        self._match(f.key)

    # ---- verdicts ---------------------------------------------------------------------

    def _match(self, key):
        """Match the waiting frames of one connection or flow, in order."""
        q = self.waiting.get(key)
        while q:
            verdict = self._verdict(q[0])
            if verdict is None:
                return                           # wait for more of the secondary's output
            f = q.popleft()
            if verdict is False:
                self.mismatch = self.mismatch or "%s frame %d differs" % (f.kind, f.seqno)
                self.stats["mismatched"] += 1
                return
            f.matched = True
            self.stats["matched"] += 1
        self.waiting.pop(key, None)

    def _verdict(self, f):
        if f.kind == "flow":
            q = self.flows.get(f.key)
            if not q:
                return None
            payload = q.popleft()
            self.sec_bytes -= len(payload)
            self.sec_frames -= 1
            return payload == f.payload
        s = self.streams.get(f.key)
        if s is None:
            return None
        if f.flags & TCP_RST:
            return None if s.rst is None else s.rst == f.seq
        start = f.seq
        if f.flags & TCP_SYN:
            if s.syn is None:
                return None
            if s.syn != f.seq:
                return False
            start = (f.seq + 1) % MOD
        if f.payload:
            covered = s.covers(start, f.payload)
            if covered is not True:
                return covered
        if f.flags & TCP_FIN:
            if s.fin is None:
                return None
            if s.fin != (start + len(f.payload)) % MOD:
                return False
        if f.flags & TCP_ACK:
            # the secondary must have the peer's data this segment acknowledges
            if s.ack is None or not _after(s.ack, f.ack):
                return None
        return True

    def releasable(self):
        """Release the longest prefix of matched frames: returns the frame number up to
        which (exclusive) the primary's frames may go out, or None if none may."""
        self.settle()
        upto = None
        while self.held and self.held[0].matched:
            upto = self.held.popleft().seqno + 1
        return upto

    def divergence(self):
        """Why a checkpoint is due now, or None: "mismatch", "timeout" or "bound". Call it
        after releasable(): the oldest held frame is then the oldest unmatched one."""
        self.settle()
        if self.held and not self.held[0].matched and not self.mismatch:
            if self.clock() - self.held[0].born > self.timeout / 2 and \
                    (self.sec_paired or self.pri_pending):
                self._apply_rules()             # a primary retransmission, perhaps
        if self.mismatch:
            return "mismatch"
        if self.held and not self.held[0].matched and \
                self.clock() - self.held[0].born > self.timeout:
            return "timeout"
        if len(self.held) >= self.max_frames or self.sec_bytes >= self.max_bytes or \
                self.sec_frames + self.sec_pending >= self.max_frames:
            return "bound"
        return None

    def describe(self, cause):
        """One line on what made `cause` (for the log)."""
        if cause == "mismatch":
            return self.mismatch
        if cause == "timeout" and self.held:
            f = self.held[0]
            if f.kind is None:
                f.parse()
            return "%s frame %d unmatched (%s, flags 0x%02x, seq %d, ack %d, %d bytes)" % (
                f.kind, f.seqno, f.key[1:2] + f.key[3:] if f.kind == "tcp" else f.key,
                f.flags, f.seq, f.ack, len(f.payload))
        return "%d frames held, %d bytes of the secondary's output" % (len(self.held), self.sec_bytes)

    def deadline(self):
        """When the oldest held frame times out (clock time), or None."""
        return self.held[0].born + self.timeout if self.held else None

    def restart_clock(self):
        """The secondary's guest runs again (vmstate-loaded): the frames held meanwhile
        have waited for a copy that was not running; their time starts now."""
        now = self.clock()
        for f in self.held:
            f.born = now

    def new_epoch(self, captured):
        """A checkpoint: frames up to number `captured` (exclusive; the primary's output
        mark at its capture) leave with it; the secondary's output so far is dropped and
        the primary's later frames wait to be compared afresh."""
        while self.held and self.held[0].seqno < captured:
            self.held.popleft()
        self.waiting.clear()
        self.pri_raw.clear()
        self.sec_raw.clear()
        self.sec_paired.clear()
        self.pri_pending = self.sec_pending = 0
        for f in self.held:
            if f.kind != "other":
                f.matched = False
                q = self.pri_raw.get(f.raw)
                if q is None:
                    self.pri_raw[f.raw] = collections.deque((f,))
                else:
                    q.append(f)
                self.pri_pending += 1
        self.streams.clear()
        self.flows.clear()
        self.sec_frames = self.sec_bytes = 0
        self.mismatch = None
