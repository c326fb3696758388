"""The destination side: `--incoming tcp:HOST:PORT`.

The listener is bound at start-up (so a busy port is a start-up error). The incoming
thread accepts every connection and gives each a thread of its own and a deadline for its
first bytes (the stream header and a valid MACHINE section): a connection that says
nothing, or trickles, holds only itself, never the port. The first connection whose
MACHINE section this node accepts claims the destination; later ones are refused with a
reason (SHUT). The claimed migration is loaded straight into guest RAM (the guest has
never run here, so there is nothing to protect yet), then hands over to `on_done()`
(plain migration: serve) or to `on_colo(channel)` (COLO incoming mode: the secondary
loop runs on that connection's thread). A claimed migration that breaks half-way is
discarded (RAM zeroed again) and the destination waits for the next attempt.

Who may connect is not decided here: without TLS (migrate_set_parameter tls-creds) any
host that reaches the port may claim the destination; see README, "Trust".
"""
import logging
import threading
import time

from colocore_ext import pages

from colocore.errors import ColocoreError, StreamError
from colocore.migration.transport import Msg, PeerLost
from colocore.vmstate import unit as units
from colocore.vmstate.format import Section

log = logging.getLogger("colocore.incoming")

FIRST_BYTES = 5.0       # seconds for a connection to deliver its header and MACHINE section
STREAM_TIMEOUT = 60.0   # then: seconds of silence allowed inside a claimed migration
MAX_WAITING = 8         # connections holding a thread before they claimed (each buffers
                        # at most vmstate/unit.py's OPENING_MAX)


class Busy(ColocoreError):
    """Another connection claimed this destination first."""


class _Arrival:
    """One accepted connection and how far it got."""

    def __init__(self, ch):
        self.ch = ch
        self.waiting = True       # holds one of the MAX_WAITING places
        self.began = False        # sent a valid MACHINE section: a migration attempt


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
        self.timeout = STREAM_TIMEOUT
        self.listener = listener
        self.thread = None
        self.error = None
        self.closing = False
        self._lock = threading.Lock()
        self._waiting = 0                 # connections before their claim
        self._claimed = None              # the channel whose migration is loading
        self._done = False                # a migration is in: no other may claim

    def start(self):
        self.thread = threading.Thread(target=self._accept_loop, name="incoming", daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.closing:
            try:
                ch = self.listener.accept()
            except OSError:
                return                    # the listener was closed: a migration is in
            with self._lock:
                full = self._waiting >= MAX_WAITING
                if not full:
                    self._waiting += 1
            if full:
                log.warning("incoming: refused %s: %d connections are already waiting",
                            ch.peer, MAX_WAITING)
                ch.close()
                continue
            threading.Thread(target=self._connection, args=(_Arrival(ch),), daemon=True,
                             name="incoming-%s" % ch.peer).start()

    def _connection(self, arrival):
        """One connection, on its own thread; whatever it sends, it ends here."""
        ch = arrival.ch
        try:
            colo = self._migrate(arrival)
        except Busy as exc:
            self._stop_waiting(arrival)
            log.warning("incoming: refused %s: %s", ch.peer, exc)
            ch.close()
            return
        except (PeerLost, StreamError, ColocoreError, OSError) as exc:
            self._failed(arrival, exc)
            return
        except Exception as exc:  # noqa: BLE001 - nothing a peer sends may kill the listener
            log.exception("incoming: internal error on the migration from %s", ch.peer)
            self._failed(arrival, ColocoreError("internal error: %s" % exc))
            return
        self.listener.close()
        if colo:
            self.on_colo(ch)
        else:
            ch.close()
            self.on_done()

    def _stop_waiting(self, arrival):
        with self._lock:
            if arrival.waiting:
                arrival.waiting = False
                self._waiting -= 1

    def _failed(self, arrival, exc):
        """A connection ended in an error. One that never sent a valid MACHINE section is
        noise (a scanner, a stranger, a silent socket): a warning. One that did was a
        migration attempt: it failed, and what it wrote into RAM is scrubbed."""
        ch = arrival.ch
        ch.close()
        self._stop_waiting(arrival)
        with self._lock:
            claimed = self._claimed is ch
            if claimed:
                self._claimed = None
        if not arrival.began:
            log.warning("incoming: dropped %s before it began a migration: %s", ch.peer, exc)
            return
        self.error = str(exc)
        log.error("incoming migration failed: %s; waiting for another attempt", exc)
        if claimed:
            self._scrub()
        self.set_status("failed")
        if self.on_failed is not None:
            self.on_failed()

    def _claim(self, arrival, info):
        """A valid MACHINE section arrived: this connection's migration may begin, unless
        another one began first or this node cannot take it (SHUT says why)."""
        ch = arrival.ch
        arrival.began = True
        self._check_peer(ch, info)
        with self._lock:
            if self._done or self._claimed is not None:
                other = self._claimed.peer if self._claimed is not None else "an earlier one"
                busy = True
            else:
                self._claimed = ch
                busy = False
        self._stop_waiting(arrival)
        if busy:
            ch.shut("a migration from %s is already arriving here" % other)
            raise Busy("a migration from %s is already arriving" % other)
        ch.set_deadline(None)
        ch.set_timeout(self.timeout)
        log.info("incoming migration from %s", ch.peer)
        self.set_status("active")

    def _scrub(self):
        mem = self.machine.memory
        pages.fill_zero(mem.ram, mem.all_pages())

    def _migrate(self, arrival):
        m, ch = self.machine, arrival.ch
        ch.set_deadline(time.monotonic() + FIRST_BYTES)
        ch.reader.read_header()
        ram = m.memory.ram

        def ram_sink(kind, pfns, data):
            if kind == Section.RAM:
                pages.scatter(ram, pfns, data)
            else:
                pages.fill_zero(ram, pfns)
        # the MACHINE section is checked and the destination claimed (_claim) before the
        # first page is written
        unit = units.read_unit(ch.reader, "migration", npages=m.memory.npages,
                               ram_sink=ram_sink, on_opening=lambda i: self._claim(arrival, i))
        info = unit.info
        units.check(unit, m, "the migration stream")
        colo = bool(info.get("x-colo"))
        # A destination's output is held from before the state is applied until it serves
        # (on_done / a takeover releases it): applying must not send the frames the source
        # still held before this node is on the service network (they would be lost), nor,
        # as a COLO secondary (whose guest does not run in periodic mode), ever before a
        # takeover.
        m.hold_output()
        units.apply(unit, m)          # the vCPU and devices: the pages are in already
        m.kernel, m.append = info.get("kernel"), info.get("append", "")
        with self._lock:
            self._done = True
        if colo:
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
            # learnt from the stream: the primary decides how the pair works
            self.settings.capabilities["x-colo"] = True
            self.settings.capabilities["x-colo-hybrid"] = bool(
                info.get("capabilities", {}).get("x-colo-hybrid"))
            # a secondary that takes over protects itself the way its primary did: the
            # same checkpoint delay and compression (checked like an operator's values)
            delay = (info.get("parameters") or {}).get("x-checkpoint-delay")
            if delay is not None:
                try:
                    self.settings.set_parameter(
                        "x-checkpoint-delay", self.settings.check_parameter("x-checkpoint-delay", delay))
                except ColocoreError:
                    pass
            if (info.get("capabilities") or {}).get("compress"):
                self.settings.capabilities["compress"] = True

    def close(self):
        self.closing = True
        self.listener.close()
