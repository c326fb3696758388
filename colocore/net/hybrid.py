"""Hybrid COLO's network side: the secondary's output travels to the primary's comparer,
which releases the primary's frames as soon as both copies produced them and asks for a
checkpoint when they diverge. docs/DESIGN.md ("Hybrid mode, the network side") has the
whole picture; in short:

    primary guest --tx--> FrameQueue (held) --frames_since()--> Comparer <-- LINK <-- tee
    (notify_fd: an eventfd per transmit batch)      |  release_output(.., upto)     |
                                                    v                      secondary guest
                                                   tap                    (fed from its log)

- The secondary's NIC sends a copy of every frame its guest transmits (NetPath.tee_fd, in
  C on its vCPU thread) to the mirror link, the reverse direction of the mirror: the
  link carries nothing else, has no address and is on no bridge, so those frames reach
  the primary's comparer and nothing else. The secondary's own held frames stay held
  (device state; released only at a takeover).
- Epochs. At checkpoint-request the secondary parks its guest, then sends a MARKER frame
  with the checkpoint's number on the link, then checkpoint-reply: every frame it sent
  before the marker belongs to the old epoch. The primary's comparer starts epoch k at
  vmstate-received of checkpoint k (the checkpoint's frames are released by the
  checkpoint loop there) and takes the secondary's frames for epoch k only after marker k:
  earlier ones are stale (they were compared already or are covered by the checkpoint),
  later ones that come before the primary started epoch k wait in `early`. So frames the
  secondary produced before its suspension are never compared with frames the primary
  produced after its capture.
- The comparer thread (`PrimaryComparer`) sleeps in poll() on the eventfd, the link's
  packet socket and a wake pipe, with the next timeout as its deadline. It owns the
  Comparer; the checkpoint loop reaches it only through epoch() and loaded(), under
  `lock`, off the pause path. A divergence found while a checkpoint is under way is
  dropped at epoch(): it concerned frames the checkpoint releases, or a secondary that
  the checkpoint replaces.
"""
import collections
import logging
import os
import select
import socket
import struct
import threading

from colocore_ext.framelog import FrameLog

from colocore.net.tap import NicError

log = logging.getLogger("colocore.net")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
BUF = 16 << 20
# The epoch marker: an IEEE "local experimental" EtherType, from and to nobody.
MARKER_TYPE = 0x88B5
MARKER_MAGIC = b"COLOHYB1"
_MARKER = struct.Struct(">6s6sH8sQ")
EARLY_MAX = 65536


def marker(epoch):
    return _MARKER.pack(b"\xff" * 6, b"\x02\x00\x00\x00\x00\x00", MARKER_TYPE, MARKER_MAGIC, epoch)


def marker_epoch(frame):
    """The epoch of a marker frame, or None for any other frame."""
    if len(frame) >= _MARKER.size and frame[12:14] == b"\x88\xb5" and \
            frame[14:22] == MARKER_MAGIC:
        return _MARKER.unpack_from(frame)[4]
    return None


def link_socket(ifname, what):
    """A non-blocking AF_PACKET socket bound to the mirror link, promiscuous (the frames
    on it are addressed to the guest's peers, not to this host)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError:
        raise NicError("hybrid COLO: cannot open a packet socket on %s: permission denied "
                       "(needs CAP_NET_RAW: run the node as root)" % ifname) from None
    try:
        for opt, fallback in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, BUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, fallback, BUF)
        s.bind((ifname, ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                     struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b""))
    except OSError as exc:
        s.close()
        raise NicError("hybrid COLO: cannot use the mirror link %s for %s: %s" % (
            ifname, what, exc.strerror or exc)) from None
    s.setblocking(False)
    return s


class PrimaryComparer:
    """The primary's comparer thread (see the module doc)."""

    def __init__(self, machine, sock, comparer, request_checkpoint):
        self.machine = machine
        self.nic = machine.nic
        self.sock = sock                # link_socket() on the mirror link (it closes it)
        self.link = sock.getsockname()[0]
        self.request_checkpoint = request_checkpoint     # (cause) -> None, any thread
        self.cmp = comparer             # colo/compare.py's Comparer
        self.lock = threading.Lock()
        self.rx = FrameLog(65536, 64 << 20)     # the secondary's frames, per wake-up
        self.event_fd = -1
        self._wake_r = self._wake_w = None
        self._stop = threading.Event()
        self._thread = None
        self.next_seq = 0               # the primary's next frame to compare
        self.epoch = 0                  # the checkpoint the comparison started from
        self.marker_seen = -1           # the newest epoch the secondary announced
        self.early = collections.deque()
        self.requested = None           # the cause asked for in this epoch
        self.stale = 0                  # secondary frames of a finished epoch, dropped
        self.released = 0               # frames released by matching (not checkpoints)
        self._upto = 0
        self.epoch_mark = 0             # the last checkpoint's mark

    def start(self):
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        with self.lock:
            # what the initial state held was released at checkpoint-ready; the guest's
            # frames since are compared with the secondary's after its marker 0
            self.next_seq = self.epoch_mark = self._upto = self.nic.out.releasable
        self.nic.path.notify_fd = self.event_fd
        self._thread = threading.Thread(target=self._run, name="colo-compare", daemon=True)
        self._thread.start()
        log.info("COLO hybrid: comparing the guest's frames with the secondary's (link %s, "
                 "x-compare-timeout %.0f ms)", self.link, self.cmp.timeout * 1000)
        return self

    def stop(self):
        self.nic.path.notify_fd = -1
        self._stop.set()
        if self._wake_w is not None:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        for fd in (self.event_fd, self._wake_r, self._wake_w):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.event_fd, self._wake_r, self._wake_w = -1, None, None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ---- the thread -----------------------------------------------------------------------

    def _run(self):
        p = select.poll()
        for fd in (self.sock.fileno(), self.event_fd, self._wake_r):
            p.register(fd, select.POLLIN)
        clock = self.cmp.clock
        try:
            while not self._stop.is_set():
                deadline = self.cmp.deadline()
                wait = 1000 if deadline is None else max(0, (deadline - clock()) * 1000 + 0.5)
                p.poll(min(wait, 1000))
                if self._stop.is_set():
                    break
                try:
                    os.eventfd_read(self.event_fd)
                except BlockingIOError:
                    pass
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
                self.step()
        except Exception:  # noqa: BLE001 - the comparer must not die silently
            log.exception("COLO hybrid: the comparer failed; checkpoints are periodic only "
                          "from now on (the output stays held until each checkpoint)")

    def step(self):
        """Take what both guests produced since the last step, release the matched prefix,
        ask for a checkpoint on divergence."""
        with self.lock:
            c = self.cmp
            first, frames = self.nic.out.frames_since(self.next_seq)
            for n, raw in enumerate(frames):
                c.primary(raw, first + n)
            self.next_seq = first + len(frames)
            self.rx.fill(self.sock.fileno())
            if self.rx.frames:
                got = self.rx.frames_from(self.rx.first, self.rx.frames)
                self.rx.drop_through(self.rx.next - 1)
                for raw in got:
                    self._secondary(raw)
            upto = c.releasable()
            if upto is not None:
                self.released += max(0, upto - max(self._upto, self.epoch_mark))
                self._upto = max(self._upto, upto)
            cause = c.divergence()
            if cause is not None and self.requested is None:
                # asked under the lock: epoch_start() then either precedes it (a request
                # for the new epoch) or follows it (the checkpoint loop drops it)
                self.requested = cause
                log.info("COLO hybrid: checkpoint for a %s: %s", cause, c.describe(cause))
                self.request_checkpoint(cause)
        if upto is not None:
            # through Machine.release_output, so that a fence on releases (the arbiter's
            # lease) covers the comparer's releases as it covers a checkpoint's
            self.machine.release_output(self.machine.net_marks(upto))

    def _secondary(self, raw):
        e = marker_epoch(raw)
        if e is not None:
            self.marker_seen = e
            return
        if self.marker_seen < self.epoch:
            self.stale += 1                 # sent before the secondary's suspension
        elif self.marker_seen > self.epoch:
            if len(self.early) < EARLY_MAX:
                self.early.append(raw)      # the secondary runs epoch k, we are not there yet
            else:
                self.stale += 1             # beyond the bound: its pair times out instead
        else:
            self.cmp.secondary(raw)

    # ---- the checkpoint loop's calls -----------------------------------------------------

    def epoch_start(self, epoch, captured):
        """vmstate-received of checkpoint `epoch`: the frames up to `captured` (its mark)
        were released with it; compare afresh from its state."""
        with self.lock:
            self.cmp.new_epoch(captured)
            self.epoch_mark = max(self.epoch_mark, captured)
            if self.next_seq < captured:
                self.next_seq = captured
            self.epoch = epoch
            self.requested = None
            early, self.early = self.early, collections.deque()
            if self.marker_seen == epoch:
                for raw in early:
                    self.cmp.secondary(raw)
        if self._wake_w is not None:
            os.write(self._wake_w, b"x")

    def loaded(self):
        """vmstate-loaded: the secondary's guest runs again."""
        with self.lock:
            self.cmp.restart_clock()

    def status(self):
        st = self.cmp.stats
        return {"compared": st["compared"], "matched": st["matched"],
                "mismatched": st["mismatched"], "passed": st["passed"],
                "held": len(self.cmp.held), "held-max": self.cmp.held_max,
                "bound-frames": self.cmp.max_frames, "released": self.released,
                "stale": self.stale, "timeout-ms": round(self.cmp.timeout * 1000, 3),
                "paired-after": self.cmp.lagged,
                "mean-lag-ms": round(self.cmp.lag_us / self.cmp.lagged / 1000, 3)
                if self.cmp.lagged else 0.0}
