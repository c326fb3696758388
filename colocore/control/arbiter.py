"""COLO under an arbiter (`--arbiter etcd:...`): who may serve, decided by an etcd lease.

What changes on a node with an arbiter (colocore/arbiter/ does the etcd side):
- Output (console, COM1, the NIC's frames) leaves only while the fence is open: the node's lease on KEY is
  valid with the margin (arbiter/fence.py), or, on a COLO primary, a secondary has just
  acknowledged the checkpoint that produced it and cannot yet have declared us silent
  (the commit window: `safe_until(time the checkpoint request left, silence)`). So a
  healthy pair keeps serving while etcd is unreachable, and a primary that can neither
  renew nor hear its secondary holds its output.
- A primary whose secondary is gone (closed or silent) first clears the pair in etcd
  (`go_alone`: from then on that secondary may never take over), then serves alone. While
  etcd does not answer, it waits with its output held.
- A secondary whose primary fell silent waits `silence` after the last byte it heard (so
  the primary's commit window has passed), then until the primary's lease has expired,
  and takes over only if it wins KEY in one transaction while KEY/state still names it.
  A secondary whose copy went stale (the primary served alone) never takes over: it stops.
- A primary that learns it lost the key stops its guest and never releases output again.
- `x_colo_lost_heartbeat` is the operator's override: the node serves without the key.
  If the other side is alive and reaches etcd, both may serve (split brain): use it only
  when you know the other node is down.
- A standby (role=standby) registers under KEY/standby/; a node serving alone protects
  itself onto one (`colo_protect`, or by itself with protect=auto).

Nodes that leave the service (lost the key, stale copy) quit after `ttl` with exit status
EXIT_NOT_SERVING, so that a supervisor (contrib/systemd) restarts them as standbys.
"""
import logging
import secrets
import socket
import threading
import time

from colocore.arbiter import Arbiter, Health, Held, Stale
from colocore.arbiter.fence import safe_until
from colocore.errors import ColocoreError

log = logging.getLogger("colocore.arbiter")

EXIT_NOT_SERVING = 3


class ColoArbiter:
    """One node's use of the arbiter. Engine hooks are called from the COLO threads; the
    arbiter's own thread renews; nothing here runs on the checkpoint pause path.

    Given what it uses (`attach`, `attach_incoming`): the machine (its output channels),
    the COLO state, the outgoing and incoming migrations, the settings, the control loop,
    `emit(event, data)` and `leave(status)` (quit the process with an exit status)."""

    def __init__(self, spec, name):
        self.spec = spec
        self.name = name
        self.arbiter = Arbiter(spec, name, on_lost=self._lost, on_change=self._changed)
        self.arbiter.on_renewed = self._kick_outputs
        self.silence_s = float(spec.ttl_s)
        # the longest a live migration to or from a standby may say nothing before it is
        # given up (a peer cut off mid-copy must not block the next attempt for long)
        self.stall_timeout = max(5.0, 5.0 * spec.ttl_s)
        self.override = None            # why the operator overrode the arbiter, if so
        self.pair = None                # secondary: the token we were named with
        self.incoming_uri = None
        self.stale_reason = None
        self.protecting = None          # the standby a protect is running onto
        self._failed_standbys = {}      # standby id -> when protecting onto it failed
        self.machine = self.colo = self.migration = self.incoming = self.settings = None
        self.loop = None
        self.emit = lambda name, data: None
        self.leave = lambda status: None
        self.quitting = False

    def attach(self, machine, colo, migration, settings, loop, emit, leave):
        """Wire the node's parts in; the fence guards the machine's output from now on."""
        self.machine, self.colo, self.migration = machine, colo, migration
        self.settings, self.loop, self.emit, self.leave = settings, loop, emit, leave
        colo.arbiter = self
        migration.colo_info = self.machine_info
        migration.stall_timeout = self.stall_timeout
        for out in self.outputs():
            out.fence = self.may_release
        if machine.nic is not None:
            machine.nic.fence = self.may_release

    def attach_incoming(self, incoming):
        """The node's destination side (created at start-up, or by migrate_incoming)."""
        self.incoming = incoming
        incoming.check_colo = self.incoming_colo
        incoming.on_failed = self.incoming_failed
        incoming.timeout = self.stall_timeout

    @property
    def lost(self):
        return self.arbiter.health == Health.LOST

    # ---- start-up -------------------------------------------------------------------

    def start_serving(self):
        """A node that boots a guest: it serves only once it holds KEY."""
        try:
            self.arbiter.serve_fresh()
        except Held as exc:
            exc.exit_status = EXIT_NOT_SERVING
            raise

    def start_incoming(self, uri, mem):
        self.incoming_uri = uri
        if self.spec.role == "standby":
            advertise = self.spec.advertise or uri
            host = advertise.split(":")[1]
            if host in ("", "0.0.0.0", "::"):
                raise ColocoreError("--arbiter role=standby: --incoming %s is not an address a "
                                    "primary can reach; give advertise=tcp:HOST:PORT" % uri)
            self.arbiter.register_standby({"uri": advertise, "mem": mem,
                                           "host": socket.gethostname()})

    # ---- the fence --------------------------------------------------------------------

    def may_release(self):
        """Checked right before output is written to its chardev (control thread)."""
        return self.override is not None or self.arbiter.fence.may_release()

    def outputs(self):
        m = self.machine
        return () if m is None else (m.console_out, m.serial_out)

    def _kick_outputs(self):
        if self.loop is None:
            return
        for out in self.outputs():
            self.loop.call_soon_threadsafe(out.kick)
        nic = self.machine.nic
        if nic is not None:
            nic.want_flush()

    # ---- primary ------------------------------------------------------------------------

    def machine_info(self):
        """What the secondary learns in the MACHINE section: our key, the token naming
        it in KEY/state once it is in COLO, and how long a silence it must wait out."""
        if self.arbiter.pair is not None or self.arbiter.pair_pending:
            raise ColocoreError("this node is still protected by another secondary (or etcd has "
                                "not yet confirmed that it serves alone); retry in a moment")
        self.pair = "pair-" + secrets.token_hex(6)
        return {"key": self.spec.key, "pair": self.pair,
                "silence-ms": int(self.silence_s * 1000)}

    def colo_started(self):
        """The secondary holds a complete copy now: name it in KEY/state."""
        self.arbiter.set_pair(self.pair)

    def checkpoint_acked(self, t_request):
        """vmstate-received for a checkpoint whose request left at local t_request: the
        secondary heard us after t_request, so it cannot call us silent before
        t_request + silence on its clock."""
        self.arbiter.fence.vouch(safe_until(t_request, self.silence_s))

    def primary_lost_secondary(self, serve_alone):
        """The secondary is gone: clear the pair in etcd (blocking while etcd is out of
        reach, output held), then `serve_alone()`. Runs on its own thread."""
        def run():
            try:
                done = self.arbiter.go_alone(cancel=lambda: self.quitting)
            except Stale as exc:
                log.error("COLO primary: %s", exc)
                return
            self.arbiter.fence.unvouch()
            if done:
                serve_alone()
        threading.Thread(target=run, name="arbiter-alone", daemon=True).start()

    # ---- secondary --------------------------------------------------------------------

    def incoming_colo(self, info):
        """The MACHINE section of a COLO stream: check the key, leave the standby list."""
        theirs = (info or {}).get("arbiter")
        if theirs is None:
            raise ColocoreError("the primary runs without --arbiter but this secondary has one "
                                "(key %s): start both with the same --arbiter" % self.spec.key)
        if theirs.get("key") != self.spec.key:
            raise ColocoreError("the primary serves key %s, this secondary was started for %s"
                                % (theirs.get("key"), self.spec.key))
        self.pair = theirs.get("pair")
        self.silence_s = max(0.5, theirs.get("silence-ms", self.silence_s * 1000) / 1000.0)
        self.arbiter.unregister_standby()
        self.arbiter.watch_as_secondary()

    def incoming_failed(self):
        """The initial copy broke off: offer this standby again."""
        if self.spec.role == "standby":
            self.arbiter.register_standby(self.arbiter.standby_info or {"uri": self.incoming_uri})

    def secondary_lost_primary(self, last_heard, failover_requested, take_over):
        """The primary fell silent or went: wait out the silence and its lease, then
        `take_over()` (the COLO failover) if we win KEY."""
        def cancelled():
            return failover_requested() or self.quitting

        def run():
            wait = last_heard + self.silence_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                won = self.arbiter.take_over(pair=self.pair, cancel=cancelled)
            except Stale as exc:
                self.stale_reason = str(exc)
                log.error("COLO secondary: %s; this copy stops", exc)
                self.colo.mark_stale(str(exc))
                self._leave_later()
                return
            if won:
                log.info("COLO secondary: won %s; taking over", self.spec.key)
                take_over()
        threading.Thread(target=run, name="arbiter-takeover", daemon=True).start()

    # ---- the operator ----------------------------------------------------------------

    def operator_failover(self, mode):
        """x_colo_lost_heartbeat: the operator decides; the arbiter is overridden on this
        node. In the background the node still tries to win (secondary) or clear the pair
        (primary) so that the other side learns, once etcd lets it, that it lost."""
        if self.override is not None:
            return
        self.override = "x_colo_lost_heartbeat on the %s" % mode
        log.warning("arbiter %s overridden by the operator (%s): this node serves without "
                    "the key; if the other side is alive and reaches etcd, both serve",
                    self.spec.key, self.override)

        def background():
            try:
                if mode == "secondary":
                    self.arbiter.take_over(pair=None, cancel=lambda: self.quitting)
                else:
                    self.arbiter.go_alone(cancel=lambda: self.quitting)
            except Stale:
                pass
        threading.Thread(target=background, name="arbiter-override", daemon=True).start()
        self._kick_outputs()

    def peer_took_over(self):
        """Our secondary announced a takeover (the operator's x_colo_lost_heartbeat there):
        this primary resigns the key and leaves, as after losing it."""
        if self.arbiter.role == "serving":
            threading.Thread(target=self.arbiter.resign, args=("the secondary took over",),
                             name="arbiter-resign", daemon=True).start()
        self._leave_later()

    # ---- losing ---------------------------------------------------------------------------

    def _lost(self, reason):
        """The key is someone else's: stop the guest, as after a TAKEOVER message."""
        if self.override is not None:
            log.error("arbiter: %s, but the operator overrode the arbiter here; serving on", reason)
            return
        self.loop.call_soon_threadsafe(self.colo.lost_key, reason)
        self._leave_later()

    def _leave_later(self):
        """Quit after ttl (monitors can read why meantime): a supervisor restarts this
        host as a standby."""
        t = threading.Timer(max(1.0, self.spec.ttl_s), self.leave, args=(EXIT_NOT_SERVING,))
        t.daemon = True
        t.start()

    # ---- re-protection -------------------------------------------------------------------

    def pick_standby(self, wanted=None):
        standbys = self.arbiter.refresh_standbys()
        if wanted:
            for s in standbys:
                if wanted in (s["name"], s["id"], s["uri"]):
                    return s
            raise ColocoreError("no standby %r is registered under %s (registered: %s)"
                                % (wanted, self.spec.standby_prefix,
                                   ", ".join(s["name"] for s in standbys) or "none"))
        if not standbys:
            raise ColocoreError("no standby is registered under %s: start one with "
                                "--incoming tcp:HOST:PORT --arbiter ...,role=standby"
                                % self.spec.standby_prefix)
        return self._order(standbys)[0]

    @staticmethod
    def _order(standbys):
        here = socket.gethostname()
        # another host first: a standby beside the primary survives only its process
        return sorted(standbys, key=lambda s: (s.get("host") == here, s["revision"]))

    def ordered_standbys(self):
        """The registered standbys, the one colo_protect would pick first."""
        return self._order(self.arbiter.refresh_standbys())

    def protect(self, wanted=None):
        """colo_protect: make a registered standby this node's COLO secondary. Control
        loop. The guest serves on during the initial copy (a live migration)."""
        if self.arbiter.role != "serving" or self.lost:
            raise ColocoreError("this node does not serve %s (arbiter: %s, %s); only the serving "
                                "node protects itself" % (self.spec.key, self.arbiter.health.value,
                                                          self.arbiter.role))
        if self.colo.mode != "none":
            raise ColocoreError("already protected: COLO %s" % self.colo.mode)
        if self.migration.status in ("setup", "active", "colo"):
            raise ColocoreError("a migration is in progress (status %s); protection starts "
                                "when it ends" % self.migration.status)
        standby = self.pick_standby(wanted)
        self.settings.set_capability("x-colo", True)
        fut = self.migration.start(standby["uri"])
        self.protecting = standby["name"]

        def done(f):
            self.protecting = None
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                self._failed_standbys[standby["id"]] = time.monotonic()
                log.error("protecting onto %s failed: %s", standby["name"], exc)
        fut.add_done_callback(done)
        log.info("protecting onto standby %s at %s", standby["name"], standby["uri"])
        return {"standby": standby["name"], "uri": standby["uri"], "id": standby["id"]}

    def auto_protect_tick(self):
        """Control loop, every ttl/3: protect=auto and serving alone -> protect."""
        if self.quitting:
            return
        self.loop.call_later(max(0.2, self.spec.ttl_s / 3.0), self.auto_protect_tick)
        if not self.may_auto_protect() or self.colo.mode != "none" \
                or self.migration.status in ("setup", "active", "colo"):
            return
        recent = time.monotonic() - 5.0
        fresh = [s for s in self.arbiter.standbys
                 if self._failed_standbys.get(s["id"], 0) < recent]
        if not fresh:
            return
        try:
            self.protect(fresh[0]["id"])
        except ColocoreError as exc:
            log.warning("automatic protection: %s", exc)

    def may_auto_protect(self):
        a = self.arbiter
        return (self.spec.protect == "auto" and a.role == "serving" and a.pair is None
                and not a.pair_pending and a.health == Health.HEALTHY
                and self.override is None and bool(a.standbys))

    # ---- reporting -------------------------------------------------------------------------

    def status(self):
        st = self.arbiter.status()
        st["may-release"] = self.may_release()
        st["override"] = self.override
        st["stale"] = self.stale_reason
        st["silence-ms"] = int(self.silence_s * 1000)
        st["takeover-at"] = self.arbiter.takeover_at
        st["protecting"] = self.protecting
        return st

    def _changed(self, status):
        self.emit("COLO_ARBITER", {k: status[k] for k in ("state", "role", "holder", "may-release")})

    def close(self):
        self.quitting = True
        self.arbiter.close()


# ---- HMP's words for the arbiter's data (control/hmp.py prints them) --------------------

def format_arbiter(a):
    lines = ["arbiter: %s, %s, key %s" % (a["state"], a["role"] or "none", a["key"])]
    if a["role"] == "serving":
        lines.append("arbiter lease: %d ms of %d (margin %.1f ms), output %s" % (
            a["lease-ms"], a["ttl-ms"], a["margin-ms"], "released" if a["may-release"] else "held"))
    elif a["holder"]:
        lines.append("arbiter holder: %s" % a["holder"])
    if a["phase"]:
        lines.append("arbiter phase: %s" % a["phase"])
    if a["state"] == "etcd unreachable":
        lines.append("arbiter: no automatic failover while etcd is unreachable")
    if a["override"]:
        lines.append("arbiter override: %s" % a["override"])
    if a["standbys"]:
        lines.append("standbys: %s" % ", ".join(a["standbys"]))
    return lines


def format_standbys(standbys):
    return "\n".join("%s %s%s" % (s["name"], s["uri"], "  (next)" if s["next"] else "")
                     for s in standbys) or "no standby registered"


def register_arbiter_hmp(hmp, ops):
    """The arbiter's HMP commands, in control/hmp.py's table."""
    hmp.info("colo_standbys", "show the standbys registered with the arbiter")(
        lambda args: format_standbys(ops.query_colo_standbys()))

    @hmp.command("colo_protect", "[standby]",
                 "protect this node (serving alone) onto a standby registered with the "
                 "arbiter (default: the one info colo_standbys lists first)")
    def _protect(args):
        if len(args) > 1:
            raise ColocoreError("usage: colo_protect [STANDBY]")
        out = ops.x_colo_protect(args[0] if args else None)
        return "protecting onto standby %s at %s" % (out["standby"], out["uri"])
