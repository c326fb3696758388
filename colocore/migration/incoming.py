"""The destination side: `--incoming tcp:HOST:PORT`.

The listener is bound at start-up (so a busy port is a start-up error). The incoming
thread accepts the primary, loads the initial live migration straight into guest RAM
(the guest has never run here, so there is nothing to protect yet), then either hands
over to `on_done()` (plain migration: serve) or to `on_colo(channel)` (COLO incoming
mode: the secondary loop runs on this thread). An initial migration that breaks half-way
is discarded (RAM zeroed again) and the node listens for the next attempt.
"""
import logging
import threading

from colocore_ext import pages

from colocore.errors import ColocoreError, StreamError
from colocore.migration.transport import Msg, PeerLost
from colocore.vmstate import unit as units
from colocore.vmstate.format import Section

log = logging.getLogger("colocore.incoming")

INITIAL_TIMEOUT = 60.0


class Incoming:
    def __init__(self, machine, settings, listener, set_status, on_done, on_colo):
        self.machine = machine
        self.settings = settings
        self.set_status = set_status      # the destination's migration status
        self.on_done = on_done
        self.on_colo = on_colo
        # set by an arbiter: checks the MACHINE section of a COLO stream (raises to
        # refuse), hears of a failed attempt, and bounds a stalled copy
        self.check_colo = None
        self.on_failed = None
        self.timeout = INITIAL_TIMEOUT
        self.listener = listener
        self.thread = None
        self.error = None
        self.closing = False

    def start(self):
        self.thread = threading.Thread(target=self._main, name="incoming", daemon=True)
        self.thread.start()

    def _main(self):
        while not self.closing:
            try:
                ch = self.listener.accept()
            except OSError:
                return
            log.info("incoming migration from %s", ch.peer)
            self.set_status("active")
            try:
                colo = self._initial(ch)
            except (PeerLost, StreamError, ColocoreError, OSError) as exc:
                self.error = str(exc)
                log.error("incoming migration failed: %s; waiting for another attempt", exc)
                ch.close()
                self._scrub()
                self.set_status("failed")
                if self.on_failed is not None:
                    self.on_failed()
                continue
            self.listener.close()
            if not colo:
                ch.close()
                self.on_done()
                return
            self.on_colo(ch)
            return

    def _scrub(self):
        mem = self.machine.memory
        pages.fill_zero(mem.ram, mem.all_pages())

    def _initial(self, ch):
        m = self.machine
        ch.set_timeout(self.timeout)
        ch.reader.read_header()
        ram = m.memory.ram

        def ram_sink(kind, pfns, data):
            if kind == Section.RAM:
                pages.scatter(ram, pfns, data)
            else:
                pages.fill_zero(ram, pfns)
        # the MACHINE section is checked (on_opening) before the first page is written
        unit = units.read_unit(ch.reader, "migration", npages=m.memory.npages,
                               ram_sink=ram_sink, on_opening=lambda i: self._check_peer(ch, i))
        info = unit.info
        units.check(unit, m, "the migration stream")
        units.apply(unit, m)          # the vCPU and devices: the pages are in already
        m.kernel, m.append = info.get("kernel"), info.get("append", "")
        colo = bool(info.get("x-colo"))
        if colo:
            # the SVM does not run in periodic mode; its output is held like the primary's
            m.hold_output()
            m.set_runstate("colo")
            self.set_status("colo")
            log.info("entering COLO incoming mode (secondary)")
        else:
            ch.send_msg(Msg.LOADED)
            self.set_status("completed")
        return colo

    def _check_peer(self, ch, info):
        """Refuse a migration this node cannot take, telling the source why."""
        m = self.machine
        mem_size = info["mem_size"]
        if mem_size != m.mem_size:
            reason = ("the secondary has %d MiB of guest memory, the primary's guest %d MiB; "
                      "start the secondary with -m %dM" % (m.mem_size >> 20, mem_size >> 20,
                                                          mem_size >> 20))
            ch.shut(reason)
            raise ColocoreError(reason)
        if info.get("x-colo"):
            if not self.settings.colo_supported:
                reason = "COLO is not supported on the secondary's host"
                ch.shut(reason)
                raise ColocoreError(reason)
            if self.check_colo is not None:
                try:
                    self.check_colo(info)
                except ColocoreError as exc:
                    ch.shut(str(exc))
                    raise
            self.settings.capabilities["x-colo"] = True   # learnt from the stream
            # a secondary that takes over protects itself the way its primary did
            for name, value in (info.get("parameters") or {}).items():
                if name in self.settings.parameters and name != "x-colo-heartbeat":
                    self.settings.parameters[name] = int(value)
            if (info.get("capabilities") or {}).get("compress"):
                self.settings.capabilities["compress"] = True

    def close(self):
        self.closing = True
        self.listener.close()
