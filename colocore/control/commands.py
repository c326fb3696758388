"""Every operator operation, written once, returning data in QMP's shapes.

QMP (control/qmp.py) serialises what these return; HMP (control/hmp.py) prints it in
QEMU's words; tools read the QMP data, never HMP text. A refusal is a ColocoreError whose
message says what to do; both spellings pass it on.
"""
import time

from colocore import __version__
from colocore.errors import ColocoreError

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
BUSY = ("setup", "active", "colo")
XP_MAX = 65536


def version_info():
    return {"qemu": dict(QEMU_VERSION), "package": "colocore %s" % __version__}


class Commands:
    def __init__(self, machine, settings, migration, colo, emit, request_quit, announce=None,
                 migrate_incoming=None, arbiter=None):
        self.arbiter = arbiter          # control/arbiter.py under --arbiter
        self.machine = machine
        self._migrate_incoming = migrate_incoming
        self.settings = settings
        self.migration = migration
        self.colo = colo
        self.emit = emit
        self.request_quit = request_quit
        self.announce = announce        # announce the NIC's MAC on the network (control loop)

    # ---- the VM -----------------------------------------------------------------------

    def query_status(self):
        st = self.machine.runstate
        return {"running": st == "running", "singlestep": False, "status": st}

    def stop(self):
        m = self.machine
        if m.runstate == "running":
            m.pause("paused")

    def cont(self):
        m = self.machine
        if m.runstate == "running":
            return
        if m.runstate == "inmigrate":
            raise ColocoreError("guest is waiting for an incoming migration")
        if m.runstate == "colo":
            # a running secondary would diverge from the checkpoints it still applies
            raise ColocoreError("this is a COLO secondary: its guest runs only after a "
                                "failover (x_colo_lost_heartbeat)")
        if m.runstate in ("guest-panicked", "internal-error", "shutdown"):
            raise ColocoreError("cannot continue: %s" % (m.stop_reason or m.runstate))
        if m.runstate in ("postmigrate", "prelaunch"):
            m.set_runstate("paused")
        m.resume()

    def quit(self):
        # the reply goes out first; SHUTDOWN, then the process ends (as QEMU)
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.request_quit()

    def xp(self, addr, length):
        """Guest physical memory (debug; HMP only, as in QEMU)."""
        ram = self.machine.memory.ram
        if addr < 0 or length <= 0 or length > XP_MAX or addr + length > len(ram):
            raise ColocoreError("xp: 0x%x+%d is outside guest RAM (%d bytes)"
                                % (addr, length, len(ram)))
        return bytes(ram[addr:addr + length])

    # ---- migration --------------------------------------------------------------------

    def query_migrate_capabilities(self):
        caps = self.settings.capabilities
        return [{"capability": c, "state": caps[c]} for c in self.settings.capability_names()]

    def migrate_set_capabilities(self, wanted):
        """[(name, state)]: all or nothing."""
        busy = self.migration.status in BUSY
        if busy and wanted:
            raise ColocoreError("There's a migration process in progress")
        for name, state in wanted:
            self.settings.check_capability(name)
        for name, state in wanted:
            self.settings.set_capability(name, state)

    def query_migrate_parameters(self):
        return self.settings.query_parameters()

    def migrate_set_parameters(self, values):
        """{name: value}: all or nothing (every value is checked before one is set)."""
        checked = {name: self.settings.check_parameter(name, value)
                   for name, value in values.items()}
        for name, value in checked.items():
            self.settings.set_parameter(name, value)

    def migrate(self, uri):
        """Start a migration; returns a future that completes when it ends."""
        return self.migration.start(uri)

    def migrate_incoming(self, uri):
        """Start listening on a node started with --incoming defer (QEMU's order: set
        tls-creds and the other parameters first, then migrate_incoming)."""
        if self._migrate_incoming is None:
            raise ColocoreError("'-incoming' was not specified on the command line")
        self._migrate_incoming(uri)

    def migrate_cancel(self):
        self.migration.cancel()

    def query_migrate(self):
        mig = self.migration
        info = {"status": mig.status}
        if mig.status != "none":
            total = mig.total_ms
            if mig.status in ("setup", "active") and mig.start_time:
                total = (time.monotonic() - mig.start_time) * 1000
            info.update({
                "total-time": int(total),
                "setup-time": int(mig.setup_ms),
                "downtime": int(mig.downtime_ms),
                "ram": {"transferred": int(mig.transferred), "normal": int(mig.pages),
                        "normal-bytes": int(mig.pages) * 4096, "duplicate": 0, "skipped": 0,
                        "remaining": 0, "total": int(self.machine.memory.size),
                        "dirty-sync-count": int(mig.rounds),
                        "dirty-pages-rate": int(mig.dirty_rate), "page-size": 4096,
                        "mbps": round(mig.transferred * 8 / 1e6 / (total / 1000.0), 3)
                        if total else 0},
            })
        st = self.colo.stats
        if mig.status == "colo" or st.checkpoints:
            info["x-colo"] = {"checkpoints": st.checkpoints,
                              "last-pause-ms": round(st.last_pause_ms, 3),
                              "mean-pause-ms": round(st.mean_pause_ms, 3),
                              "max-pause-ms": round(st.max_pause_ms, 3),
                              "last-dirty-pages": st.last_dirty_pages,
                              "last-bytes": st.last_bytes,
                              "total-bytes": st.total_bytes,
                              "last-latency-ms": round(st.last_latency_ms, 3),
                              "compression-ratio": round(st.compression_ratio, 3),
                              "pause-mode": st.last_mode,
                              "last-hot-pages": st.last_hot_pages,
                              "last-cow-pages": st.last_cow_pages,
                              "last-wp-faults": st.last_wp_faults,
                              "last-unchanged-pages": st.last_unchanged_pages}
        if mig.channel_security is not None:
            # colocore's: whether the channel is authenticated, and as whom
            info["x-channel"] = mig.channel_security.as_dict()
        if mig.error:
            info["error-desc"] = mig.error
        return info

    # ---- COLO ---------------------------------------------------------------------------

    def x_colo_lost_heartbeat(self):
        self.colo.request_failover()

    def query_colo_status(self):
        st = self.colo.status()
        if self.arbiter is not None:
            st["arbiter"] = self.arbiter.status()
        return st

    # ---- the network card -------------------------------------------------------------

    def _nic(self):
        nic = self.machine.nic
        if nic is None:
            raise ColocoreError("no network card: start the node with --nic tap,ifname=NAME")
        return nic

    def query_net(self):
        """The virtio-net card: MAC, link, tap, counters, and the vCPU's exits and WAITs
        (how many frames each exit moves)."""
        info = self._nic().query()
        info["vcpu-exits"] = self.machine.vcpu.exits
        info["waits"] = self.machine.platform.waits
        return info

    def announce_self(self):
        """QEMU's announce-self: RARP rounds from the guest's MAC, and ANNOUNCE."""
        self._nic()
        self.announce()

    # ---- the arbiter ------------------------------------------------------------------

    def _need_arbiter(self, what):
        if self.arbiter is None:
            raise ColocoreError("%s needs --arbiter (standbys register there); without it: "
                                "migrate_set_capability x-colo on, then migrate tcp:HOST:PORT"
                                % what)
        return self.arbiter

    def x_colo_protect(self, standby=None):
        """Protect this node (serving alone) onto a registered standby; the guest serves on
        during the initial copy. Returns the standby used."""
        return self._need_arbiter("colo_protect").protect(standby)

    def query_colo_standbys(self):
        """The registered standbys, the one x_colo_protect would use first."""
        return [{"name": s["name"], "id": s["id"], "uri": s["uri"], "next": i == 0}
                for i, s in enumerate(self._need_arbiter("query-colo-standbys").ordered_standbys())]
