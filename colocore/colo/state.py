"""A node's COLO state: mode, last mode, exit reason, failover, peer, figures.

The checkpoint loops run on it (colo/primary.py on the migration thread, colo/secondary.py
on the incoming thread); operators act on it (x_colo_lost_heartbeat, query-colo-status).
It is given only what it uses: the machine, the migration settings, `emit(event, data)`,
`serve()` (a secondary that takes over opens its guest chardevs and runs its guest),
`migration_over()` (the migration that turned into COLO is finished) and `network`, the
network side of COLO (net/colo_net.py: the primary's mirror, the secondary's input log
and replay), which the colo package reaches only through the hooks NoNetwork lists.
Under `--arbiter`, `arbiter` is the node's control/arbiter.py object: it decides what
peer_lost() does, and the loops tell it about acknowledged checkpoints (duck-typed: colo
imports no arbiter).
"""
import logging
import threading

from colocore.colo import primary, secondary
from colocore.colo.failover import Failover, FailoverState, may_decide_alone
from colocore.errors import ColocoreError

log = logging.getLogger("colocore.colo")


def colo_supported(machine):
    """Whether this host can do COLO (QEMU's colo_supported()): KVM with dirty logging on
    the guest's memslot, which every checkpoint harvests."""
    return machine is not None and bool(machine.vm.dirty_log)


class NoNetwork:
    """The network hooks of a COLO run, for a node without a NIC (and their contract):

    begin(mode)             COLO starts on this node
    end()                   this node left COLO: what COLO set up on the network goes
    checkpoint_figures(cap) primary, after a checkpoint: figures for COLO_CHECKPOINT
    loaded()                secondary, after loading a checkpoint: match the input log
    takeover()              secondary failover, before the guest runs: replay, attach
    status()                the "net" part of query-colo-status (None: no NIC)
    hybrid COLO (x-colo-hybrid), net/hybrid.py:
    hybrid_begin(comparer, request, starve)  both sides, COLO starts (primary: compare
                            with `comparer`, ask `request(cause)` for checkpoints);
                            False: nothing to compare
    hybrid_suspend(epoch)   secondary, its guest parked at checkpoint-request `epoch`
    hybrid_resume()         secondary, a checkpoint loaded, its guest still parked
    hybrid_epoch(epoch, mark)  primary, vmstate-received: compare afresh after `mark`
    hybrid_loaded()         primary, vmstate-loaded: the secondary's guest runs again"""

    def begin(self, mode):
        pass

    def end(self):
        pass

    def checkpoint_figures(self, cap):
        return {}

    def loaded(self):
        return {}

    def takeover(self):
        return None

    def status(self):
        return None

    def hybrid_begin(self, comparer=None, request=None, starve=False):
        return False

    def hybrid_suspend(self, epoch):
        pass

    def hybrid_resume(self):
        pass

    def hybrid_epoch(self, epoch, mark):
        pass

    def hybrid_loaded(self):
        pass


# Why a checkpoint was taken: the delay ran out (periodic), the comparer found the copies
# diverged (mismatch), a frame waited longer than x-compare-timeout (timeout), the
# comparer's queues reached their bound (bound), or an operator or a parameter change
# asked (request).
CAUSES = ("periodic", "mismatch", "timeout", "bound", "request")


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
        self.last_latency_ms = 0.0
        self.verify_mismatches = 0
        self.verified = 0
        self.reverted_pages = 0           # hybrid secondary: its own writes undone by loads
        self.last_mode = ""               # the primary's pause mode (checkpoint.pause_mode)
        self.last_hot_pages = 0
        self.last_cow_pages = 0
        self.last_wp_faults = 0
        self.last_unchanged_pages = 0
        self.causes = dict.fromkeys(CAUSES, 0)    # a primary's checkpoints by cause
        self.compare_active = False               # a hybrid primary compares frames

    @property
    def mean_pause_ms(self):
        return self.total_pause_ms / self.checkpoints if self.checkpoints else 0.0

    @property
    def compression_ratio(self):
        return self.last_raw / self.last_bytes if self.last_bytes else 0.0


class Colo:
    def __init__(self, machine, settings, emit, serve, migration_over, verify=False,
                 network=None):
        self.machine = machine
        self.network = network or NoNetwork()
        self.settings = settings
        self.emit = emit
        self.serve = serve
        self.migration_over = migration_over
        self.verify = verify
        self.mode = "none"
        self.last_mode = "none"
        self.reason = "none"
        self.failover = Failover()
        self.stats = ColoStats()
        self.channel = None
        self.peer_state = "none"          # none, connected, lost, took over
        self.peer_error = None
        self.trigger = threading.Event()  # checkpoint now (delay changed, failover)
        self.cause = None                 # why `trigger` was set (CAUSES), None: request
        self._cause_lock = threading.Lock()
        self.exit_sent = False
        self.hybrid = False
        self.apply_lock = threading.Lock()
        self.loading = False
        self.secondary_done = threading.Event()   # the secondary loop has returned
        self.takeover_done = threading.Event()
        self.quitting = threading.Event()
        self.arbiter = None               # control/arbiter.py under --arbiter
        self.last_heard = 0.0             # secondary: when the primary's last byte came
        self.unusable = None              # why this secondary may not take over, if so
        self.cache = None                 # hybrid secondary: RAM as of the last checkpoint

    # ---- reporting -----------------------------------------------------------------

    def status(self):
        """query-colo-status: QEMU's fields, then colocore's (peer, checkpoints, verify, and
        the network side on a node with a NIC)."""
        s = self.stats
        st = {"mode": self.mode, "last-mode": self.last_mode, "reason": self.reason,
              "failover-state": self.failover.state.value,
              "checkpoint-mode": "hybrid" if self.hybrid else "periodic",
              "checkpoint-causes": dict(s.causes),
              "peer": self.peer_state,
              "peer-error": self.peer_error, "checkpoints": s.checkpoints,
              "reverted-pages": s.reverted_pages,
              "verified": s.verified, "verify-mismatches": s.verify_mismatches}
        net = self.network.status()
        if net is not None:             # QMP leaves an absent optional member out
            st["net"] = net
        return st

    def request_checkpoint(self, cause):
        """A checkpoint now, for `cause` (the comparer's thread, an operator): the first
        cause asked for wins until the checkpoint loop takes it."""
        with self._cause_lock:
            if self.cause is None:
                self.cause = cause
        self.trigger.set()

    def take_cause(self, default):
        """The checkpoint loop starts a checkpoint: why (and nobody asked any more)."""
        with self._cause_lock:
            cause, self.cause = self.cause, None
        return cause or default

    def drop_compare_request(self):
        """A checkpoint made the comparer's pending request moot (it concerned the epoch
        that checkpoint ended): forget it, unless an operator's or a failover's."""
        with self._cause_lock:
            if self.cause in ("mismatch", "timeout", "bound"):
                self.cause = None
                self.trigger.clear()

    def exit_event(self, reason):
        if not self.exit_sent:
            self.exit_sent = True
            self.emit("COLO_EXIT", {"mode": self.mode if self.mode != "none" else self.last_mode,
                                    "reason": reason})

    # ---- a run ---------------------------------------------------------------------

    def begin(self, mode, ch):
        """A new COLO run on this node (also after an earlier one ended in a failover):
        the failover state and exit bookkeeping start afresh; counters carry on."""
        self.failover = Failover()
        self.reason = "none"
        self.exit_sent = False
        self.peer_error = None
        self.trigger.clear()
        self.takeover_done.clear()
        self.secondary_done.clear()
        self.channel = ch
        self.mode = mode
        self.peer_state = "connected"
        self.unusable = None
        self.cache = None
        # hybrid (x-colo-hybrid, the primary's choice; a secondary learns it from the
        # stream): the secondary's guest runs between checkpoints
        self.hybrid = bool(self.settings.capabilities.get("x-colo-hybrid"))
        self.network.begin(mode)

    def leave(self):
        """This node is out of COLO (failover done, or stopped by a takeover)."""
        self.last_mode, self.mode = self.mode, "none"
        if self.peer_state == "connected":
            self.peer_state = "none"          # we closed the channel ourselves
        self.network.end()

    def run_primary(self, ch, checkpointer):
        """The checkpoint loop, on the migration thread; returns when COLO ended."""
        try:
            primary.run(self, ch, checkpointer)
        finally:
            # COLO is over (failover, error, quit): no page may stay write-protected
            checkpointer.close()

    def run_secondary(self, ch):
        """The COLO incoming loop, on the incoming thread; returns when COLO ended."""
        try:
            secondary.run(self, ch)
        finally:
            self.secondary_done.set()

    # ---- failover --------------------------------------------------------------------

    def request_failover(self, auto=False):
        """x_colo_lost_heartbeat: accepted once; the work runs on the COLO thread (primary)
        or on a takeover thread (secondary)."""
        if self.mode == "none":
            raise ColocoreError("VM is not in COLO mode")
        if self.unusable:
            raise ColocoreError("this secondary cannot take over: %s" % self.unusable)
        self.failover.request(loading=self.mode == "secondary" and self.loading)
        if self.reason == "none":
            self.reason = "request"
        log.info("COLO %s: failover requested%s", self.mode, " (automatic)" if auto else "")
        if self.arbiter is not None and not auto:
            self.arbiter.operator_failover(self.mode)
        if self.mode == "primary":
            # the migration thread notices at its next step; closing the channel wakes it
            self.trigger.set()
            if self.channel is not None:
                self.channel.close()
            return
        if self.failover.state == FailoverState.RELAUNCH:
            log.info("COLO secondary: a checkpoint is being loaded; failover relaunches "
                     "once it is in")
        if self.channel is not None:
            # a primary that is still alive must learn that it has to stop
            self.channel.announce_takeover()
        threading.Thread(target=secondary.takeover, args=(self,), name="takeover",
                         daemon=True).start()

    def peer_lost(self, error):
        """The channel broke: report it, keep the guest safe; fail over only where
        failover.may_decide_alone() says this side may."""
        if self.peer_state == "lost":
            return
        self.peer_state = "lost"
        self.peer_error = str(error)
        if self.failover.state != FailoverState.NONE:
            return
        arb = self.arbiter
        if arb is not None and arb.lost:
            return                        # lost_key() stopped this node already
        self.reason = "error"
        self.exit_event("error")
        if arb is not None and arb.override is None:
            # the arbiter decides (failover.py: may_decide_alone's arbiter rule)
            self._arbiter_decides(arb, error)
            return
        decide, why = may_decide_alone(self.mode, getattr(error, "closed", False),
                                       self.settings.parameters["x-colo-heartbeat"])
        if decide:
            log.error("COLO %s: lost the peer (%s); %s: failing over by itself", self.mode,
                      error, why)
            try:
                self.request_failover(auto=True)
            except ColocoreError:
                pass
            return
        log.error("COLO %s: lost the peer: %s; the guest is %s. Run x_colo_lost_heartbeat "
                  "here to %s", self.mode, error,
                  "running, output held" if self.mode == "primary" else "at its last complete checkpoint",
                  "serve alone" if self.mode == "primary" else "take over")

    def _arbiter_decides(self, arb, error):
        def auto():
            try:
                self.request_failover(auto=True)
            except ColocoreError:
                pass
        if self.mode == "primary":
            log.error("COLO primary: lost the secondary (%s); serving alone once etcd confirms "
                      "that it may no longer take over", error)
            arb.primary_lost_secondary(auto)
        else:
            log.error("COLO secondary: lost the primary (%s); taking over if its lease expires "
                      "and this node wins the key", error)
            arb.secondary_lost_primary(self.last_heard, lambda: self.failover.state != FailoverState.NONE,
                                       auto)

    def stop_for_good(self, who):
        """Another copy serves now: stop this guest so that only one does (the caller keeps
        its held output held and logs why)."""
        self.reason = "error"
        m = self.machine
        try:
            if m.runstate == "running":
                m.pause("paused")
        except ColocoreError as perr:
            log.error("%s: could not stop the guest: %s", who, perr)

    def lost_key(self, reason):
        """The arbiter's key is someone else's: as after a TAKEOVER message, the guest stops
        and nothing it produced is released any more (the fence is closed for ever)."""
        self.peer_error = "lost the key: %s" % reason
        self.stop_for_good("arbiter")
        log.error("arbiter: this node lost the key (%s); its guest is stopped so that only "
                  "one copy serves; it quits shortly", reason)
        if self.mode != "none":
            self.exit_event("error")
            was = self.mode
            ch = self.channel
            if ch is not None:
                ch.close()
            self.leave()
            if was == "primary":
                self.migration_over()

    def mark_stale(self, reason):
        """A secondary whose copy may never serve: the primary went on without it."""
        self.peer_error = "stale: %s" % reason

    def close(self):
        self.quitting.set()
        ch = self.channel
        if ch is not None:
            ch.close()

