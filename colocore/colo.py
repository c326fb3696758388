"""COLO: the primary's checkpoint loop, the secondary's incoming loop, and failover.

Primary (migration thread, after the initial live migration):

    <- checkpoint-ready
    every x-checkpoint-delay:
      -> checkpoint-request   <- checkpoint-reply
      pause: dirty log, hot/cow split, copy, vCPU, devices, resume    (Stager.stage)
      -> vmstate-send [RAM ... END] vmstate-size N [N bytes devices]  (guest runs on)
      <- vmstate-received     release output held up to this checkpoint
      <- vmstate-loaded

Secondary (incoming thread): receives each checkpoint whole into a PendingCheckpoint,
verifies it, answers vmstate-received, and only then applies it (RAM, vCPU, devices) and
answers vmstate-loaded. A checkpoint cut off anywhere before its last byte is dropped
whole; the VM stays at the previous one.

Failover (x_colo_lost_heartbeat, or the optional x-colo-heartbeat timeout) changes the
failover state only through Failover.compare_and_set. Who may decide:
- a secondary takes over only when told (or by the heartbeat): a silent primary may be
  alive behind a partition;
- a primary whose channel was closed or reset by the secondary's end leaves COLO by
  itself: that secondary's process is gone and can never serve a newer state; silence
  keeps the output held until someone decides;
- a secondary that takes over says so on the return path, and a primary that hears it
  stops its guest, so that one copy serves.
"""
import logging
import threading
import time

from colocore_ext import pages
from . import faults
from .checkpoint import receive
from .errors import ColocoreError, StreamError
from .failover import Failover, FailoverState
from .transport import Msg, PeerLost, PeerTookOver

log = logging.getLogger("colocore.colo")

READY_TIMEOUT = 60.0
REPLY_TIMEOUT = 10.0
# The primary says something at least this often, even with a long checkpoint delay, so
# that a secondary notices a silent primary (a dead host, a partition) and reports it;
# without x-colo-heartbeat it still waits for the operator to decide.
IDLE_HEARTBEAT = 1.0
# How often the primary pre-copies between checkpoints (x-colo-precopy): the pages a
# pause still has to handle are those written since the last pre-copy.
PRECOPY_EVERY = 0.02
SILENCE_TIMEOUT = 5.0


def colo_supported(machine):
    """Whether this host can do COLO (QEMU's colo_supported()): KVM with dirty logging on
    the guest's memslot, which every checkpoint harvests."""
    return machine is not None and bool(machine.vm.dirty_log)


class ColoStats:
    def __init__(self):
        self.checkpoints = 0
        self.last_pause_ms = 0.0
        self.total_pause_ms = 0.0
        self.max_pause_ms = 0.0
        self.last_dirty_pages = 0
        self.last_bytes = 0
        self.last_raw = 0
        self.total_bytes = 0
        self.total_raw = 0
        self.last_latency_ms = 0.0
        self.verify_mismatches = 0
        self.verified = 0
        self.last_mode = ""
        self.last_hot_pages = 0
        self.last_cow_pages = 0
        self.last_wp_faults = 0
        self.last_unchanged_pages = 0

    @property
    def mean_pause_ms(self):
        return self.total_pause_ms / self.checkpoints if self.checkpoints else 0.0

    @property
    def compression_ratio(self):
        return self.last_raw / self.last_bytes if self.last_bytes else 0.0


class Colo:
    """COLO state of one node: mode, last mode, exit reason, failover, peer."""

    def __init__(self, node):
        self.node = node
        self.mode = "none"
        self.last_mode = "none"
        self.reason = "none"
        self.failover = Failover()
        self.stats = ColoStats()
        self.channel = None
        self.peer_state = "none"          # none, connected, lost
        self.peer_error = None
        self.trigger = threading.Event()  # checkpoint now (delay changed, failover)
        self.exit_sent = False
        self.apply_lock = threading.Lock()
        self.loading = False
        self.incoming_thread = None
        self.takeover_done = threading.Event()

    # ---- reporting -----------------------------------------------------------------

    def info_text(self):
        lines = ["COLO mode: %s" % self.mode,
                 "last mode: %s" % self.last_mode,
                 "reason: %s" % self.reason,
                 "failover state: %s" % self.failover.state.value,
                 "peer: %s%s" % (self.peer_state, (" (%s)" % self.peer_error) if self.peer_error else ""),
                 "checkpoints: %d" % self.stats.checkpoints]
        if self.stats.verified or self.stats.verify_mismatches:
            lines.append("verified checkpoints: %d, mismatches: %d"
                         % (self.stats.verified, self.stats.verify_mismatches))
        return "\n".join(lines)

    def status(self):
        return {"mode": self.mode, "last-mode": self.last_mode, "reason": self.reason}

    def _exit_event(self, reason):
        if not self.exit_sent:
            self.exit_sent = True
            self.node.emit_event("COLO_EXIT", {"mode": self.mode if self.mode != "none" else self.last_mode,
                                               "reason": reason})

    def peer_lost(self, error):
        """The channel broke: report it, keep the guest safe; failover stays the operator's."""
        if self.peer_state == "lost":
            return
        self.peer_state = "lost"
        self.peer_error = str(error)
        if self.failover.state == FailoverState.NONE:
            self.reason = "error"
            self._exit_event("error")
            closed = getattr(error, "closed", False)
            if self.mode == "primary" and closed:
                # The secondary's end closed or reset the connection without announcing a
                # takeover: its process is gone and can never serve a newer state, so the
                # primary leaves COLO and serves alone without waiting for anyone.
                log.error("COLO primary: the secondary is gone (%s); leaving COLO and serving "
                          "alone, unprotected", error)
                self._auto_failover()
                return
            log.error("COLO %s: lost the peer: %s; the guest is %s. Run x_colo_lost_heartbeat "
                      "here to %s", self.mode, error,
                      "running, output held" if self.mode == "primary" else "at its last complete checkpoint",
                      "serve alone" if self.mode == "primary" else "take over")
            hb = self.node.settings.parameters["x-colo-heartbeat"]
            if hb:
                log.warning("x-colo-heartbeat is %d ms: failing over by itself", hb)
                self._auto_failover()

    def _auto_failover(self):
        try:
            self.request_failover(auto=True)
        except ColocoreError:
            pass

    def _stopped_by_takeover(self, exc):
        """The secondary took over while this primary still runs: stop the guest here, so
        that only one copy serves. Its held output stays held: the secondary has the state
        that produced what was released, and nothing newer may reach a client."""
        m = self.node.machine
        self.peer_state = "took over"
        self.peer_error = str(exc)
        self.reason = "error"
        try:
            if m.runstate == "running":
                m.pause("paused")
        except ColocoreError as perr:
            log.error("COLO primary: could not stop the guest: %s", perr)
        log.error("COLO primary: %s; this guest is stopped so that only one copy serves. "
                  "Quit this node (or re-protect from the new primary)", exc)
        self._exit_event("error")
        self.last_mode, self.mode = "primary", "none"
        self.node.migration.colo_finished()

    # ---- failover --------------------------------------------------------------------

    def request_failover(self, auto=False):
        """x_colo_lost_heartbeat: accepted once; the work runs on the COLO thread/loop."""
        if self.mode == "none":
            raise ColocoreError("VM is not in COLO mode")
        found = self.failover.compare_and_set(FailoverState.NONE, FailoverState.REQUIRE)
        if found != FailoverState.NONE:
            raise ColocoreError("COLO failover is already active")
        if self.reason == "none":
            self.reason = "request"
        log.info("COLO %s: failover requested%s", self.mode, " (automatic)" if auto else "")
        if self.mode == "primary":
            # the migration thread notices at its next step; closing the channel wakes it
            self.trigger.set()
            if self.channel is not None:
                self.channel.close()
        else:
            if self.loading:
                # a checkpoint is being loaded: let it finish, then fail over from it
                self.failover.compare_and_set(FailoverState.REQUIRE, FailoverState.RELAUNCH)
                log.info("COLO secondary: a checkpoint is being loaded; failover relaunches "
                         "once it is in")
            if self.channel is not None:
                # a primary that is still alive must learn that it has to stop
                self.channel.announce_takeover()
            self.node.loop.call_soon_threadsafe(self.node.schedule_takeover)

    # ---- primary -----------------------------------------------------------------------

    def _begin(self):
        """A new COLO run on this node (also after an earlier one ended in a failover):
        the failover state and exit bookkeeping start afresh; counters carry on."""
        self.failover = Failover()
        self.reason = "none"
        self.exit_sent = False
        self.peer_error = None
        self.trigger.clear()
        self.takeover_done.clear()

    def run_primary(self, ch, stager):
        """The checkpoint loop (migration thread). Returns when COLO ends; the guest runs."""
        node, m = self.node, self.node.machine
        self._begin()
        self.channel = ch
        self.mode = "primary"
        self.peer_state = "connected"
        params = node.settings.parameters
        try:
            # checkpoint-ready was received by the migration thread before it resumed the
            # guest at the end of the initial migration
            checkpoint_id = 0
            while self.failover.state == FailoverState.NONE:
                self._wait_delay(ch, params, stager.precopy)
                if self.failover.state != FailoverState.NONE:
                    break
                checkpoint_id += 1
                hb = params["x-colo-heartbeat"]
                ch.set_timeout(hb / 1000.0 if hb else REPLY_TIMEOUT)
                t0 = time.perf_counter()
                ch.send_msg(Msg.CHECKPOINT_REQUEST)
                ch.expect(Msg.CHECKPOINT_REPLY)
                faults.crash("after-request", checkpoint_id)
                st = stager.stage()
                sent, raw, _ = stager.send(ch, st, checkpoint_id)
                ch.expect(Msg.VMSTATE_RECEIVED)
                faults.crash("after-received", checkpoint_id)
                # output commit: the secondary holds the state that produced these bytes
                m.console_out.release(st.marks[0])
                m.serial_out.release(st.marks[1])
                ch.expect(Msg.VMSTATE_LOADED)
                faults.crash("after-loaded", checkpoint_id)
                self._account(checkpoint_id, st, sent, raw, (time.perf_counter() - t0) * 1000)
        except PeerTookOver as exc:
            self.channel = None
            ch.close()
            self._stopped_by_takeover(exc)
            return
        except (PeerLost, StreamError, ColocoreError, OSError) as exc:
            if self.failover.state == FailoverState.NONE:
                self.peer_lost(exc)
        finally:
            self.channel = None
        # Wait for the operator (or the heartbeat) to fail over; the guest runs meanwhile,
        # its output held: releasing it before a failover decision could lose it.
        while self.failover.state not in (FailoverState.REQUIRE, FailoverState.RELAUNCH):
            time.sleep(0.01)
            if self.node.quitting:
                return
        self._primary_failover(ch)

    def _wait_delay(self, ch, params, between=None):
        """Sleep x-checkpoint-delay, waking early on trigger; heartbeat while idle;
        `between()` (the pre-copy) every PRECOPY_EVERY (at least twice per delay)."""
        delay = params["x-checkpoint-delay"] / 1000.0
        hb = params["x-colo-heartbeat"] / 1000.0
        every = hb / 3 if hb else IDLE_HEARTBEAT
        now = time.monotonic()
        deadline, next_hb = now + delay, now + every
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0 or self.failover.state != FailoverState.NONE:
                break
            step = min(left, next_hb - now)
            if between is not None:
                step = min(step, max(PRECOPY_EVERY / 4, min(PRECOPY_EVERY, delay / 2)))
            if self.trigger.wait(max(step, 0)):
                self.trigger.clear()
                break
            if between is not None and time.monotonic() < deadline:
                between()
            now = time.monotonic()
            if now < deadline and now >= next_hb:
                ch.send_msg(Msg.HEARTBEAT)
                next_hb = now + every
        self.trigger.clear()

    def _account(self, checkpoint_id, st, sent, raw, latency_ms):
        s = self.stats
        s.checkpoints += 1
        pause_ms = st.pause_s * 1000
        s.last_pause_ms = pause_ms
        s.total_pause_ms += pause_ms
        s.max_pause_ms = max(s.max_pause_ms, pause_ms)
        s.last_dirty_pages = st.dirty
        s.last_mode = st.mode
        s.last_hot_pages = st.hot
        s.last_cow_pages = st.cow
        s.last_wp_faults = st.faults
        s.last_unchanged_pages = st.skipped
        s.last_bytes = sent
        s.last_raw = raw
        s.total_bytes += sent
        s.total_raw += raw
        s.last_latency_ms = latency_ms
        self.node.emit_event("COLO_CHECKPOINT", {
            "id": checkpoint_id, "pause-ms": round(pause_ms, 3),
            "dirty-pages": st.dirty, "bytes": sent, "raw-bytes": raw,
            "compression-ratio": round(raw / sent, 3) if sent else 0.0,
            "latency-ms": round(latency_ms, 3), "mode": st.mode,
            "hot-pages": st.hot, "cow-pages": st.cow, "pause-copied-pages": st.in_pause,
            "unchanged-pages": st.skipped, "wp-faults": st.faults,
            "pause-steps-us": {k: round(v, 1) for k, v in st.steps_us.items()}})

    def _primary_failover(self, ch):
        m = self.node.machine
        self.failover.compare_and_set(FailoverState.REQUIRE, FailoverState.ACTIVE)
        if ch is not None:
            try:
                ch.send_msg(Msg.QUIT)
            except ColocoreError:
                pass
            ch.close()
        _release_all_output(m)
        self.last_mode, self.mode = "primary", "none"
        if self.peer_state == "connected":
            self.peer_state = "none"          # we closed the channel ourselves
        self._exit_event(self.reason if self.reason != "none" else "request")
        self.node.migration.colo_finished()
        self.failover.compare_and_set(FailoverState.ACTIVE, FailoverState.COMPLETED)
        log.info("COLO primary: failover completed, serving alone")

    # ---- secondary ---------------------------------------------------------------------

    def run_secondary(self, ch):
        """The COLO incoming loop (incoming thread). Returns when COLO ends."""
        node, m = self.node, self.node.machine
        self.channel = ch
        self.mode = "secondary"
        self.peer_state = "connected"
        params = node.settings.parameters
        try:
            ch.send_msg(Msg.CHECKPOINT_READY)
            while self.failover.state == FailoverState.NONE:
                hb = params["x-colo-heartbeat"]
                ch.set_timeout(hb / 1000.0 if hb else SILENCE_TIMEOUT)
                msg = ch.recv_msg()
                if msg == Msg.CHECKPOINT_REQUEST:
                    ch.send_msg(Msg.CHECKPOINT_REPLY)
                elif msg == Msg.VMSTATE_SEND:
                    t0 = time.perf_counter()
                    cp = receive(ch, m)
                    # The whole checkpoint is here and verified: from now on it is applied
                    # even if the primary dies (it is the newest complete state).
                    ch.send_msg(Msg.VMSTATE_RECEIVED)
                    self._load(cp)
                    # the VM is at this checkpoint now, whether or not the primary hears so
                    self.stats.checkpoints += 1
                    self.stats.last_bytes = cp.bytes
                    self.stats.last_dirty_pages = cp.info.get("dirty", 0)
                    self.stats.last_latency_ms = (time.perf_counter() - t0) * 1000
                    if cp.digest is not None:
                        self._verify(cp)
                    ch.send_msg(Msg.VMSTATE_LOADED)
                elif msg == Msg.QUIT:
                    raise PeerLost("the primary left COLO (failover on the primary)")
                else:
                    raise StreamError("COLO protocol: unexpected %s" % msg.name)
        except (PeerLost, StreamError, ColocoreError, OSError) as exc:
            if self.failover.state == FailoverState.NONE:
                self.peer_lost(exc)
            else:
                log.info("COLO secondary: channel closed for failover")
        finally:
            self.channel = None
            ch.close()

    def _load(self, cp):
        with self.apply_lock:
            self.loading = True
            try:
                if faults.SLOW_LOAD_S:
                    time.sleep(faults.SLOW_LOAD_S)
                cp.apply(self.node.machine)
            finally:
                self.loading = False

    def _verify(self, cp):
        mem = self.node.machine.memory
        mine = pages.page_hashes(mem.ram, mem.all_pages())
        bad = [] if mine == cp.digest else \
            [p for p, (a, b) in enumerate(zip(mine, cp.digest)) if a != b]
        self.stats.verified += 1
        if bad:
            self.stats.verify_mismatches += 1
            log.error("COLO verify: checkpoint %s: %d pages differ from the primary (first: %s)",
                      cp.info.get("id"), len(bad), ", ".join("0x%x" % p for p in bad[:8]))
            self.node.emit_event("COLO_VERIFY_MISMATCH", {"id": cp.info.get("id"), "pages": len(bad)})

    def takeover_prepare(self):
        """Secondary failover, thread part: wait for the incoming thread and any load."""
        t = self.incoming_thread
        if t is not None:
            t.join()
        with self.apply_lock:
            pass            # no load in flight: RAM, vCPU and devices are one checkpoint
        # the load a relaunch waited for is complete: the failover can run now
        self.failover.compare_and_set(FailoverState.RELAUNCH, FailoverState.REQUIRE)
        self.failover.compare_and_set(FailoverState.REQUIRE, FailoverState.ACTIVE)

    def takeover_finish(self):
        _release_all_output(self.node.machine)
        self.last_mode, self.mode = "secondary", "none"
        if self.peer_state == "connected":
            self.peer_state = "none"          # we closed the channel ourselves
        self.node.migration_in_status("completed")
        self._exit_event(self.reason if self.reason != "none" else "request")
        self.failover.compare_and_set(FailoverState.ACTIVE, FailoverState.COMPLETED)
        self.takeover_done.set()
        log.info("COLO secondary: failover completed, serving")


def _release_all_output(m):
    """Leaving COLO: nothing is held any more, and what was held goes out now (it may
    repeat what the old primary already released; it must never be lost)."""
    for out in (m.console_out, m.serial_out):
        out.hold = False
        out.release()
