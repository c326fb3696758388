"""The network side of COLO on one node: the primary's mirror, the secondary's input log,
its replay at a takeover and its entry onto the service network. docs/DESIGN.md ("COLO's
network path") has the whole picture; in short:

    --nic tap,ifname=TAP,br=BRIDGE,mirror=LINK        (the same spelling on both hosts)

- primary (from the start of an x-colo `migrate` until COLO ends): the kernel mirrors every
  frame that reaches TAP toward the guest to LINK (net/mirror.py: tc clsact + u32 +
  mirred). The guest's own frames are held by the machine's output commit
  (Machine.release_output), not here.
- secondary (an `--incoming tcp:` node, from start-up): TAP exists but stays off BRIDGE,
  so its copy of the guest can never answer a client; LINK is read into the input log
  (net/inputlog.py) and matched with every checkpoint it loads.
- takeover (the guest still parked): the last read of LINK, the tap's queue emptied of
  what the host left in it, the frames of the log that the checkpoint does not contain
  injected into the tap's queue toward the guest, TAP onto BRIDGE; then the node resumes
  the guest, announces it (after the tap is on the bridge: announcing from a tap that is
  on no network teaches nobody) and releases the held output.
The colo package calls this object through the hooks of colo/state.py (it may not import
net/); control/node.py wires it.
"""
import errno
import logging
import os
import socket
import time

from colocore.net.hybrid import PrimaryComparer, link_socket, marker
from colocore.net.inputlog import DEFAULT_FRAMES, MirrorLog, MirrorReader
from colocore.net.mirror import TapMirror, tune_mirror_in
from colocore.net.tap import NicError, off_loop

log = logging.getLogger("colocore.net")

# At a takeover the mirror may still deliver frames the last checkpoint consumed (they
# left the primary's host before it died): wait this long for them at most.
REPLAY_GRACE_S = 0.05


def _open_iproute():
    from pyroute2 import IPRoute
    return IPRoute()


class ColoNet:
    def __init__(self, machine, backend, spec, emit):
        self.machine = machine
        self.backend = backend          # TapBackend
        self.spec = spec                # NicSpec (mirror=, br=)
        self.emit = emit
        self.mode = "none"
        self.mirror = None              # TapMirror while this primary mirrors
        self.mlog = None                # MirrorLog, on a destination with mirror=
        self.reader = None
        self.tuning = None
        self.takeover_result = None
        self._ipr = None
        self._inject_sock = None
        self._last = None               # (mark, written, rx_consumed, mirrored) at the
                                        # last checkpoint
        self.held_total = 0
        self.released_total = 0
        self.hybrid = False
        self.starve = False
        self.comparer = None            # PrimaryComparer, a hybrid primary with mirror=
        self._tee = None                # a hybrid secondary's socket toward the comparer
        self._cmp_sock = None           # a primary's socket for the secondary's output

    # ---- a destination: from start-up ----------------------------------------------------

    def start_log(self):
        """An --incoming tcp: node with mirror=: read the mirror link from now on (before
        the primary can install its mirror, so the log misses nothing)."""
        if not self.spec.mirror:
            return
        self.tuning = tune_mirror_in(self.spec.mirror)
        self.mlog = MirrorLog(max_frames=max(DEFAULT_FRAMES, self.backend.txqlen or 0))
        self.reader = MirrorReader(self.spec.mirror, self.mlog).open()
        # Opened now for the takeover, where every millisecond counts: a netlink socket
        # (~7 ms to open here) and the packet socket that injects into the tap (closing or
        # binding a packet socket waits for an RCU grace period, ~10 ms here).
        self._ipr = off_loop(_open_iproute)
        self._inject_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._inject_sock.bind((self.backend.ifname, 0))
        log.info("COLO: logging frames mirrored to %s (at most %d frames, %d MiB)",
                 self.spec.mirror, self.mlog.log.max_frames, self.mlog.log.max_bytes >> 20)

    def stop_log(self):
        """Nothing more is logged; the link's settings go back (after a takeover: once
        the guest serves, this costs tens of milliseconds)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.tuning is not None:
            self.tuning.restore()
            self.tuning = None
        if self._inject_sock is not None:
            self._inject_sock.close()
            self._inject_sock = None
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception:  # noqa: BLE001 - closing a socket
                pass
            self._ipr = None

    def attach_service(self):
        """The destination starts serving: its tap joins the service bridge. Returns the
        error (a one-line string) if it could not; the guest runs anyway."""
        try:
            self.backend.join_bridge(self._ipr)
        except NicError as exc:
            log.error("the guest's network: %s", exc)
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - the guest must run whatever the network does
            log.error("the guest's network: could not attach tap %s to bridge %s: %s",
                      self.backend.ifname, self.spec.bridge, exc)
            return "could not attach tap %s to bridge %s: %s" % (
                self.backend.ifname, self.spec.bridge, exc)
        return None

    # ---- COLO runs (hooks of colo/state.py) -------------------------------------------

    def prepare_primary(self):
        """Start of an x-colo `migrate`, before the first page leaves: the kernel mirrors
        the tap from now on. Returns what undoes it (the migration failed)."""
        if not self.spec.mirror:
            return lambda: None
        self.mirror = TapMirror(self.backend.ifname, self.spec.mirror).install()
        # A hybrid secondary sends its first frames (marker 0 first) as soon as it loaded
        # the initial state, before this primary's COLO loop runs: the socket that
        # receives them for the comparer is opened now, so that none is lost.
        self._cmp_sock = link_socket(self.spec.mirror, "the secondary's output")
        return self._remove_mirror

    def _remove_mirror(self):
        m, self.mirror = self.mirror, None
        if m is not None:
            m.teardown()
        sock, self._cmp_sock = self._cmp_sock, None
        if sock is not None:
            sock.close()

    def begin(self, mode):
        self.mode = mode
        nic = self.machine.nic
        if mode == "primary" and nic is not None:
            self._last = (nic.out.produced, nic.out.written, nic.path.rx_consumed,
                          self.mirror.sent() if self.mirror is not None else None)

    # ---- hybrid COLO (net/hybrid.py) --------------------------------------------------

    def hybrid_begin(self, comparer=None, request=None, starve=False):
        """Hybrid COLO starts. Primary: the comparer thread (needs mirror=: the link also
        carries the secondary's output). Secondary, its guest parked at the initial state:
        its transmitted frames go to the link from now on, after marker 0, and its input
        is fed live from the log (never with starve, a fault for tests: colo/faults.py).
        Returns False when there is nothing to compare."""
        nic = self.machine.nic
        if nic is None or not self.spec.mirror:
            return False
        self.hybrid = True
        self.starve = starve
        if self.mode == "primary":
            if self._cmp_sock is None:
                self._cmp_sock = link_socket(self.spec.mirror, "the secondary's output")
            sock, self._cmp_sock = self._cmp_sock, None
            self.comparer = PrimaryComparer(self.machine, sock, comparer, request).start()
            return True
        self._tee = link_socket(self.spec.mirror, "the guest's output toward the comparer")
        nic.path.tee_fd = self._tee.fileno()
        self._tee.send(marker(0))
        self.hybrid_resume()
        return True

    def hybrid_suspend(self, epoch):
        """Secondary, its guest just parked at checkpoint-request `epoch`: no more input;
        the marker tells the comparer that everything before it is of the old epoch."""
        if self.mlog is not None:
            self.mlog.feed_stop()
        if self._tee is not None:
            try:
                self._tee.send(marker(epoch))
            except OSError as exc:          # the comparer times out and checkpoints again
                log.warning("COLO hybrid: the epoch marker could not be sent: %s", exc)

    def hybrid_resume(self):
        """Secondary, a checkpoint loaded and matched, its guest still parked: the tap's
        queue holds frames fed for the state it had, not for the checkpoint's: empty it,
        then feed from the frame after the checkpoint's last consumed one."""
        if self.mlog is None or self._inject_sock is None or self.starve:
            return
        try:
            self._drain_tap()
        except NicError as exc:
            log.error("COLO hybrid: %s", exc)
            return
        if self.reader is not None:
            self.reader.drain()
        self.mlog.feed_start(self._inject_sock.fileno())

    def hybrid_epoch(self, epoch, mark):
        """Primary, vmstate-received of checkpoint `epoch`: its frames up to `mark` were
        released; the comparison starts afresh."""
        if self.comparer is not None:
            self.comparer.epoch_start(epoch, mark)

    def hybrid_loaded(self):
        if self.comparer is not None:
            self.comparer.loaded()

    def _hybrid_end(self):
        if self.comparer is not None:
            self.comparer.stop()
            self.comparer = None
        nic = self.machine.nic
        if nic is not None:
            nic.path.tee_fd = -1
        if self.mlog is not None:
            self.mlog.feed_stop()
        if self._tee is not None:
            self._tee.close()
            self._tee = None

    def end(self):
        """This node left COLO: what COLO set up goes."""
        self._hybrid_end()
        self.hybrid = self.starve = False
        if self.mode == "primary":
            self._remove_mirror()
        elif self.mode == "secondary":
            self.stop_log()
        self.mode = "none"

    def close(self):
        """The node exits."""
        self._hybrid_end()
        self._remove_mirror()
        self.stop_log()

    def checkpoint_figures(self, cap):
        """The primary's figures of one checkpoint for COLO_CHECKPOINT: frames its guest
        sent in the epoch (held until vmstate-received), frames written to the tap since
        the last checkpoint (released), frames its guest consumed in the epoch. Counter
        reads only."""
        nic = self.machine.nic
        if nic is None or self._last is None:
            return {}
        mark = cap.marks[-1]
        written = nic.out.written
        rx = cap.devices["virtio-net"]["counters"]["rx_consumed"]
        mirror = self.mirror
        sent = mirror.sent() if mirror is not None else None
        last_mark, last_written, last_rx, last_sent = self._last
        self._last = (mark, written, rx, sent)
        held, released = mark - last_mark, written - last_written
        self.held_total += held
        self.released_total += released
        figures = {"net-held": held, "net-released": released, "net-rx": rx - last_rx}
        if sent is not None:
            figures["net-mirrored"] = sent - (last_sent or 0)
        return figures

    def loaded(self):
        """The secondary loaded a checkpoint (its NIC holds the primary's counters now):
        match the log against it. Returns figures for COLO_CHECKPOINT_LOADED."""
        nic = self.machine.nic
        if nic is None or self.mlog is None:
            return {}
        if self.reader is not None:
            self.reader.drain()
        path = nic.path
        replayable = self.mlog.checkpoint(path.rx_consumed, path.rx_last_hash, path.rx_chain)
        st = self.mlog.status()
        return {"net-logged": st["logged"], "net-log-frames": st["log-frames"],
                "net-replayable": replayable}

    # ---- the takeover -----------------------------------------------------------------

    def takeover(self):
        """Secondary failover, before the guest runs: replay into the tap's queue, then the
        tap onto the service bridge. Never raises: the takeover completes, and what went
        wrong with the network is said once, clearly (log, COLO_NET_TAKEOVER, info colo)."""
        result = {"replayed": 0, "replay-skipped": None, "tap": self.backend.ifname,
                  "bridge": self.spec.bridge, "error": None}
        try:
            frames, why = self._replay_plan()
            result["replay-skipped"] = why
            if frames:
                result["replayed"] = self._inject(frames)
        except Exception as exc:  # noqa: BLE001 - see the doc
            result["error"] = "the replay failed: %s" % exc
        error = self.attach_service()
        if error:
            result["error"] = (result["error"] + "; " if result["error"] else "") + error
        if result["replay-skipped"]:
            log.warning("COLO takeover: the mirrored frames are not replayed: %s",
                        result["replay-skipped"])
        log.info("COLO takeover: %d mirrored frames replayed into tap %s%s",
                 result["replayed"], self.backend.ifname,
                 ", tap on bridge %s" % self.spec.bridge if self.spec.bridge and not error else "")
        if result["error"]:
            log.error("COLO takeover: the guest runs, but its network is not right: %s",
                      result["error"])
        self.takeover_result = result
        self.emit("COLO_NET_TAKEOVER", dict(result))
        return result

    def _replay_plan(self):
        if self.mlog is None:
            return [], "this node has no mirror link (--nic ...,mirror=LINK)"
        if self.reader is not None:
            self.reader.stop()
        if self.hybrid:
            # the guest ran on the live feed and is not rolled back: it gets what the feed
            # did not send yet, after what sits in its tap's queue
            self.mlog.feed_stop()
            nic = self.machine.nic
            if nic is not None:
                nic.path.tee_fd = -1
            if self.reader is not None:
                self.reader.drain()
            return self.mlog.unfed(self.backend.txqlen or DEFAULT_FRAMES), None
        limit = self.backend.txqlen or DEFAULT_FRAMES
        deadline = time.monotonic() + REPLAY_GRACE_S
        while True:
            if self.reader is not None:
                self.reader.drain()
            frames, why = self.mlog.replay(limit)
            if not (why and self.mlog.pending) or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        return frames, why

    def _inject(self, frames):
        """Frames into the tap's queue toward the guest (what the guest reads next): an
        AF_PACKET send on the tap is a transmit on it, which the tap queues for its
        reader. The queue is emptied first: while the guest was parked the host may have
        queued its own frames (IPv6 neighbour discovery) that no checkpoint knows."""
        if not self.hybrid:
            self._drain_tap()
        s = self._inject_sock
        sent = 0
        for f in frames:
            try:
                s.send(f)
                sent += 1
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENODEV, errno.ENETDOWN):
                    raise NicError("tap %s: %s" % (self.backend.ifname, exc.strerror)) from None
                log.warning("COLO takeover: a replayed frame of %d bytes was refused: %s",
                            len(f), exc.strerror)
        return sent

    def _drain_tap(self):
        fd = self.backend.fd
        if fd < 0:
            raise NicError("tap %s is closed" % self.backend.ifname)
        while True:
            try:
                os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                raise NicError("tap %s: %s (deleted under the node?)" % (
                    self.backend.ifname, exc.strerror or exc)) from None

    # ---- reporting ------------------------------------------------------------------------

    def status(self):
        """The network part of query-colo-status."""
        nic = self.machine.nic
        if nic is None:
            return None
        mirror = self.mirror            # the COLO thread may remove it meanwhile
        st = {"tap": self.backend.ifname, "bridge": self.spec.bridge, "mirror": self.spec.mirror,
              "held": nic.out.pending, "held-total": self.held_total,
              "released-total": self.released_total,
              "mirrored": mirror.sent() if mirror is not None else None}
        if self.mlog is not None:
            st["log"] = self.mlog.status()
        if self.takeover_result is not None:
            st["takeover"] = dict(self.takeover_result)
        comparer = self.comparer
        if comparer is not None:
            st["compare"] = comparer.status()
        if self.mlog is not None and self.hybrid:
            st["fed"] = self.mlog.feed_next
            st["tee-sent"] = nic.path.tee_sent
            st["tee-dropped"] = nic.path.tee_dropped
        return st
