"""The COLO secondary's input log: the frames the primary's kernel mirrored toward its
guest, matched at every checkpoint against how far that guest had consumed its input, so
that a takeover can inject the frames the checkpoint does not contain.

Why it is needed: a frame that reached the primary's tap but that its guest had not read
yet is in no checkpoint (it sits in the kernel's tap queue, which is not device state),
and neither is a frame the guest read after the checkpoint's pause. When the primary dies
those frames are gone; the client's TCP sends them again only after its retransmission
timer (200 ms at least, often more). The secondary holds a copy of each.

Matching. The primary's virtio-net state in a checkpoint says how many frames its guest
consumed (`rx_consumed`, C), the FNV-1a 64 hash of the last one (`rx_last_hash`, H) and
a hash chained over all of them in order (`rx_chain`). The mirror numbers frames in
arrival order (sequence numbers of colocore_ext.framelog). Once a checkpoint was matched
at sequence number `anchor` with count C0 and chain X0, the next one is expected at
anchor + (C - C0), and the frames anchor+1 .. expected folded onto X0 must give its
chain: exactly those frames, in that order. Then everything up to it is dropped from the
log and what follows is exactly what the guest has not consumed: replayable. Anything
else is detected (H then says where the checkpoint really is) and makes the log not
replayable until a later checkpoint matches again:
- the chain differs at the expected place: frames reordered (or lost and others come
  in their place);
- H found earlier than expected: mirror frames were lost (the link dropped them, or the
  socket's buffer overflowed: `FrameLog.socket_drops`), or reordered;
- H found later than expected: the log holds frames the guest never consumed (the
  primary's tap queue overflowed and dropped them after the mirror copied them), or the
  mirror reordered them;
- H not found: lost;
- the expected frame has not arrived yet (the mirror is behind the checkpoint): pending,
  retried when more frames arrived and at the takeover;
- frames after the anchor were evicted (the log's bound: a flood) or a socket drop
  happened after it: the tail is incomplete.
After such a disagreement the log is trusted again only once REMATCH_STREAK checkpoints
in a row agree (a single agreement can be chance: identical frames swapped). A skipped
replay loses nothing: the guest's output was held until the checkpoint, so the client has
not seen an acknowledgement of anything the checkpoint lacks, and its TCP retransmits it
(only later).

The first checkpoint (the state the initial migration brought) has no count to go by: its
H is looked for from the newest frame back; not found means its guest consumed nothing
that was mirrored.
"""
import logging
import os
import select
import socket
import struct
import threading

from colocore_ext.framelog import FrameLog

from colocore.net.tap import NicError

log = logging.getLogger("colocore.net")

DEFAULT_FRAMES = 4096
DEFAULT_BYTES = 8 << 20
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
SO_RCVBUFFORCE = 33
RCVBUF = 8 << 20
POLL_MS = 200
REMATCH_STREAK = 3


class MirrorLog:
    """The frame log and its matching against checkpoints (see the module doc). Thread
    safe: the reader thread fills it, the COLO threads match and replay."""

    def __init__(self, max_frames=DEFAULT_FRAMES, max_bytes=DEFAULT_BYTES):
        self.log = FrameLog(max_frames, max_bytes)
        self.lock = threading.Lock()
        self.anchor = None          # sequence number of the last frame the matched
        self.anchor_consumed = 0    # checkpoint's guest consumed (first - 1: none in the
        self.anchor_hash = None     # log), and its rx_consumed, rx_last_hash and rx_chain
        self.anchor_chain = None
        self.target = None          # (consumed, hash, chain) of the newest checkpoint
        self.replayable = False
        self.note = "no checkpoint yet"
        self.gap_through = -1       # frames may be missing up to this sequence number
        self.socket_dropped = 0
        self.matched = 0            # checkpoints matched by count and chain
        self.streak = 0             # of them in a row
        self.faulted = False        # the log disagreed with a checkpoint once
        self.unmatched = 0          # checkpoints where the log did not agree
        self.pending = False
        # hybrid COLO: the log feeds the secondary's guest live (a packet socket on its
        # tap); `feed_next` is the next frame to send, everything before it was sent
        self.feed_fd = -1
        self.feeding = False
        self.feed_next = 0

    # ---- filling (the reader thread) ----------------------------------------------------

    def fill(self, fd):
        with self.lock:
            n = self.log.fill(fd)
            drops = FrameLog.socket_drops(fd)
            if drops:
                # they would have come somewhere before the next frame
                self.socket_dropped += drops
                self.gap_through = self.log.next
                log.warning("COLO mirror: the socket dropped %d mirrored frames (the reader "
                            "fell behind); the log is not replayed until a checkpoint "
                            "matches it again", drops)
            if self.pending and n:
                self._match()
            if self.feeding:
                self.feed_next = self.log.send_from(self.feed_fd, self.feed_next)
            return n

    # ---- hybrid COLO: the live feed -----------------------------------------------------

    def feed_stop(self):
        """The guest is parked (checkpoint-request, takeover): send nothing more; returns
        the first frame not sent."""
        with self.lock:
            self.feeding = False
            return self.feed_next

    def feed_start(self, fd):
        """A checkpoint was loaded (matched by checkpoint()): the guest holds the primary's
        state, which consumed the log up to the match; it gets every frame after it, in
        order, from now on, including those still to come when the checkpoint is ahead
        of the mirror (pending)."""
        with self.lock:
            if self.anchor is None:
                nxt = self.log.first
            elif self.pending:
                nxt = self.anchor + (self.target[0] - self.anchor_consumed) + 1
            else:
                nxt = self.anchor + 1
            self.feed_fd = fd
            self.feeding = True
            self.feed_next = self.log.send_from(fd, nxt)
            return nxt

    def unfed(self, limit):
        """The frames the live feed has not sent yet (a hybrid takeover injects them)."""
        with self.lock:
            return self.log.frames_from(self.feed_next, limit)

    def append(self, frame):
        """Log one frame by hand (tests)."""
        with self.lock:
            self.log.append(frame)

    # ---- matching (the COLO secondary's loop) ------------------------------------------

    def checkpoint(self, consumed, last_hash, chain):
        """A checkpoint was loaded: its guest had consumed `consumed` frames, the last of
        them with hash `last_hash`, all of them with chained hash `chain`. Returns whether
        the log is replayable now."""
        with self.lock:
            if self.target is not None and consumed < self.target[0]:
                self.anchor = None          # a state older than the last: start afresh
            # the frames the previous checkpoint waited for did not come before this one:
            # the mirror, far faster than a checkpoint, lost them
            give_up = self.pending
            self.target = (consumed, last_hash, chain)
            self._match(give_up)
            return self.replayable

    def _set(self, anchor, good, note):
        consumed, h, chain = self.target
        self.anchor, self.anchor_consumed = anchor, consumed
        self.anchor_hash, self.anchor_chain = h, chain
        self.log.drop_through(anchor)
        self.pending = False
        self.streak = self.streak + 1 if good else 0
        self.faulted = self.faulted or not good
        # A link that lost or reordered frames once is trusted again only after several
        # checkpoints in a row agree: a single agreement can be a coincidence (identical
        # frames swapped), and nothing can check the frames after the last checkpoint.
        self.replayable = good and (not self.faulted or self.streak >= REMATCH_STREAK)
        self.note = note if self.replayable or not good else (
            "%s, but the log disagreed lately: it is replayed again once %d checkpoints in "
            "a row agree" % (note, REMATCH_STREAK))
        if good:
            self.matched += 1
        else:
            self.unmatched += 1
            log.warning("COLO mirror: %s; the log will not be replayed at a takeover unless a "
                        "later checkpoint matches it (TCP retransmission covers what is "
                        "missing)", note)

    def _match(self, give_up=False):
        consumed, h, chain = self.target
        lg = self.log
        newest = lg.next - 1
        if self.anchor is None:
            q = lg.find(h, lg.first, lg.next, max(newest, 0))
            if q >= 0:
                self._set(q, True, "matched the first checkpoint by its hash")
            else:
                self._set(lg.first - 1, True, "the first checkpoint consumed no mirrored frame")
            self._check_tail()
            return
        delta = consumed - self.anchor_consumed
        expected = self.anchor + delta
        if delta == 0 and chain == self.anchor_chain:
            # nothing consumed since: no new evidence either way
            self.replayable = self.replayable and not self.pending
            self.pending = False
            self._check_tail()
            return
        if expected > newest and not give_up:
            if not self.pending:
                self.pending = True
                self.replayable = False
                self.note = "waiting for %d mirrored frames the checkpoint consumed" % (
                    expected - newest)
            return
        if expected <= newest:
            folded = lg.chain(self.anchor + 1, expected, self.anchor_chain)
            if folded == chain:
                self._set(expected, True, "matched")
                self._check_tail()
                return
            if folded is None and lg.first <= expected and lg.hash_at(expected) == h:
                # frames consumed since the last match were evicted (a flood): count and
                # last hash still place the checkpoint; the frames after it are whole
                self._set(expected, True, "matched by count and hash (the log overflowed "
                                          "before it)")
                self._check_tail()
                return
        q = lg.find(h, self.anchor + 1, lg.next, expected)
        if q >= 0 and q != expected:
            why = ("%d mirrored frames missing before it (lost on the mirror link)"
                   % (expected - q) if q < expected else
                   "%d mirrored frames before it that its guest never consumed (dropped at "
                   "the primary's tap)" % (q - expected))
            self._set(q, False, "a checkpoint's last consumed frame is mirror frame %d, not "
                      "%d: %s, or frames reordered" % (q, expected, why))
        elif q == expected:
            self._set(q, False, "the frames a checkpoint consumed are in the log in another "
                      "order (reordered on the mirror link) or with others among them")
        else:
            self._set(min(expected, newest), False,
                      "a checkpoint's last consumed frame is not in the log (%s)" % (
                          "evicted: the log overflowed" if expected < lg.first
                          else "lost on the mirror link, or it never came"))
        self._check_tail()

    def _check_tail(self):
        """The frames after the anchor must all be there."""
        lg = self.log
        if lg.evicted_through > self.anchor:
            self.replayable = False
            self.note = ("the log overflowed its bound (%d frames, %d bytes): frames the "
                         "guest had not consumed were dropped" % (lg.max_frames, lg.max_bytes))
        elif self.gap_through > self.anchor:
            self.replayable = False
            self.note = "the mirror socket dropped frames after the last matched checkpoint"

    # ---- the takeover -------------------------------------------------------------------

    def replay(self, limit):
        """(frames, None) to inject: what the last checkpoint loaded does not contain, in
        order (at most `limit`); or ([], why) when the log cannot be trusted."""
        with self.lock:
            if self.target is None:
                return [], "no checkpoint was loaded"
            if self.pending:
                self._match()
            if self.pending:
                return [], self.note + " (they never arrived)"
            self._check_tail()
            if not self.replayable:
                return [], self.note
            return self.log.frames_from(self.anchor + 1, limit), None

    def status(self):
        lg = self.log
        return {"logged": lg.next, "log-frames": lg.frames, "log-bytes": lg.bytes_held,
                "log-evicted": lg.evicted, "socket-dropped": self.socket_dropped,
                "matched": self.matched, "unmatched": self.unmatched,
                "replayable": self.replayable, "note": self.note}


class MirrorReader:
    """An AF_PACKET socket on the secondary's end of the mirror link and a thread that
    fills a MirrorLog from it (poll, then one C call per batch: no Python per frame)."""

    def __init__(self, ifname, mlog):
        self.ifname = ifname
        self.mlog = mlog
        self.sock = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = None, None     # ends the poll at once on stop()
        self._thread = None

    def open(self):
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise NicError("--nic mirror=%s: cannot open a packet socket: permission denied "
                           "(needs CAP_NET_RAW: run the node as root)" % self.ifname) from None
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind((self.ifname, ETH_P_ALL))
            index = socket.if_nametoindex(self.ifname)
            # frames for the guest's MAC are not this host's: take them all
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                         struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
        except OSError as exc:
            s.close()
            raise NicError("--nic mirror=%s: cannot read the mirror link: %s; create the link "
                           "toward the primary first (README 'A networked guest under COLO')"
                           % (self.ifname, exc.strerror or exc)) from None
        s.setblocking(False)
        self.sock = s
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="colo-mirror", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN)
        p.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                if p.poll(POLL_MS) and not self._stop.is_set():
                    self.mlog.fill(self.sock.fileno())
            except (OSError, ValueError) as exc:
                if not self._stop.is_set():
                    log.error("COLO mirror: reading %s failed: %s; the log is not replayed",
                              self.ifname, exc)
                    with self.mlog.lock:
                        self.mlog.replayable = False
                        self.mlog.note = "the mirror link failed: %s" % exc
                return

    def drain(self):
        """Read what is waiting now (on the caller's thread)."""
        if self.sock is not None:
            try:
                self.mlog.fill(self.sock.fileno())
            except OSError:
                pass

    def stop(self):
        """Stop the thread; the socket stays open for a last drain()."""
        self._stop.set()
        if self._wake_w is not None:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None

    def close(self):
        self.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
