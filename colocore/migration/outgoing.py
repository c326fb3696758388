"""Outgoing migration: status, figures, and the migration thread.

`start(uri)` validates the URI on the caller's thread (so `migrate` answers errors at
once), then runs the transfer on the migration thread. Status names are QEMU's: none,
setup, active, completed, failed, cancelled, colo.

A live migration with x-colo on does not end: the channel it opened is handed to
`on_colo(channel)` (the COLO primary's checkpoint loop, on this same thread) and the
status stays `colo` until the primary leaves COLO (`colo_finished()`).
"""
import array
import asyncio
import logging
import threading
import time

from colocore.errors import ColocoreError
from colocore.migration.transport import Channel, Msg, PeerLost, parse_tcp_uri
from colocore.vmstate import format as stream, snapshot, unit as units
from colocore.vmstate.format import Section
from colocore.vmstate.sections import BATCH_PAGES, PAGE

log = logging.getLogger("colocore.migration")

MAX_ROUNDS = 30
LOADED_TIMEOUT = 60.0
# The guest is paused from stop-and-copy until the destination says it loaded the state:
# every send and the wait for its answer must finish within this, or the guest resumes
# here (a destination that is busy, stalled or not colocore must not hold it paused).
FINISH_TIMEOUT = 5.0


class MigrationCancelled(Exception):
    pass


TRANSITIONS = {
    "none": {"setup"},
    "setup": {"active", "failed", "cancelled"},
    "active": {"completed", "failed", "cancelled", "colo"},
    "completed": {"setup"},
    "failed": {"setup"},
    "cancelled": {"setup"},
    "colo": {"completed", "failed"},
}


class Migration:
    def __init__(self, machine, settings, emit, on_colo, prepare_colo=None):
        self.machine = machine
        self.settings = settings
        self.emit = emit
        self.on_colo = on_colo
        # prepare_colo(): called before an x-colo migration sends anything (the network
        # mirror is set up then); returns what undoes it if COLO is not reached
        self.prepare_colo = prepare_colo or (lambda: (lambda: None))
        # set by an arbiter: what the secondary must learn in the MACHINE section, and how
        # long a copy to a standby may stall before it is given up
        self.colo_info = None
        self.stall_timeout = LOADED_TIMEOUT
        self.status = "none"
        self.error = None
        self._lock = threading.Lock()
        self._thread = None
        self.channel = None
        self.rounds = 0
        self.cancel_requested = threading.Event()
        self.channel_security = None     # tls.Security of the last channel (query-migrate)
        self.reset_figures()

    def reset_figures(self):
        self.start_time = None
        self.total_ms = 0
        self.setup_ms = 0
        self.downtime_ms = 0
        self.transferred = 0
        self.pages = 0
        self.rounds = 0
        self.dirty_rate = 0

    def set_status(self, new):
        with self._lock:
            old = self.status
            if new not in TRANSITIONS[old]:
                raise ColocoreError("cannot switch migration status from %s to %s" % (old, new))
            self.status = new
        self.emit("MIGRATION", {"status": new})
        return old

    def start(self, uri):
        """Begin a migration; returns a future that completes when it ends."""
        if self.machine.runstate in ("guest-panicked", "internal-error", "shutdown",
                                          "inmigrate", "colo"):
            raise ColocoreError("cannot migrate a guest in state %s" % self.machine.runstate)
        if self.status == "colo":
            raise ColocoreError("the guest is protected by COLO; end that first with "
                                "x_colo_lost_heartbeat")
        if self.status in ("setup", "active"):
            raise ColocoreError("a migration is already in progress (status %s); "
                                "migrate_cancel it first" % self.status)
        kind, sep, target = uri.partition(":")
        if kind == "tcp":
            parse_tcp_uri(uri)
            secure = self.settings.client_secure()     # a bad tls-creds is refused at once
            work = lambda: self._to_tcp(uri, secure)  # noqa: E731
        elif kind == "file" and target:
            work = lambda: self._to_file(target)  # noqa: E731
        else:
            raise ColocoreError("migrate: unsupported URI %r; use tcp:HOST:PORT or file:PATH" % uri)
        self.cancel_requested.clear()
        self.error = None
        self.channel_security = None
        self.reset_figures()
        self.start_time = time.monotonic()
        self.set_status("setup")
        loop = asyncio.get_event_loop()
        fut = loop.create_future()

        def done(exc):
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

        def run():
            exc = None
            try:
                ch = work()
                if ch is not None:
                    self.on_colo(ch)        # the checkpoint loop; returns when COLO ends
            except MigrationCancelled:
                exc = MigrationCancelled()
            except ColocoreError as e:
                # migrate_cancel closes the channel: the send that fails is the cancel
                exc = MigrationCancelled() if self.cancel_requested.is_set() else e
            except Exception as e:  # noqa: BLE001
                if self.cancel_requested.is_set():
                    exc = MigrationCancelled()
                else:
                    log.exception("migration failed")
                    exc = ColocoreError("migration failed: %s" % e)
            if isinstance(exc, MigrationCancelled):
                log.info("migration cancelled; the guest keeps running here")
                self.channel = None
                try:
                    self.set_status("cancelled")
                except ColocoreError:
                    pass
                exc = None
            if exc is not None:
                self.error = str(exc)
                log.error("%s", exc)
                try:
                    self.set_status("failed")
                except ColocoreError:
                    pass
            loop.call_soon_threadsafe(done, exc)

        self._thread = threading.Thread(target=run, name="migration", daemon=True)
        self._thread.start()
        return fut

    def _to_file(self, path):
        m = self.machine
        t0 = time.monotonic()
        before = m.runstate
        was_running = before == "running"
        self.setup_ms = (time.monotonic() - t0) * 1000
        self.set_status("active")
        if was_running:
            m.pause("finish-migrate", event=True)
        else:
            m.set_runstate("finish-migrate")
        t_down = time.monotonic()
        try:
            self.transferred, self.pages = snapshot.save(m, path)
        except Exception:
            # the guest goes on as it was: a failed save loses nothing
            m.set_runstate("postmigrate" if before == "postmigrate" else "paused")
            if was_running:
                m.resume()
            raise
        m.set_runstate("postmigrate")
        self.downtime_ms = (time.monotonic() - t_down) * 1000
        self.total_ms = (time.monotonic() - self.start_time) * 1000
        self.set_status("completed")
        log.info("migrated to %s: %d bytes, %d pages, %.0f ms", path, self.transferred,
                 self.pages, self.total_ms)

    def cancel(self):
        """migrate_cancel: only before COLO begins; the guest keeps running here."""
        if self.status not in ("setup", "active"):
            return
        self.cancel_requested.set()
        ch = self.channel
        if ch is not None:
            ch.close()

    def set_incoming_status(self, status):
        """The destination's side of `info migrate`, set by the incoming thread (QEMU's
        destination goes active -> failed -> active ... -> completed or colo)."""
        self.status = status
        self.emit("MIGRATION", {"status": status})

    def colo_finished(self):
        """The primary left COLO (failover): the migration is over."""
        if self.status == "colo":
            self.set_status("completed")

    # ---- live migration over TCP ---------------------------------------------------

    def _check_cancel(self):
        if self.cancel_requested.is_set():
            raise MigrationCancelled()

    def _send_pages(self, w, pfns, staging, compress, send_zero, limit):
        """Send pages `pfns` (read while the guest may run); returns pages sent."""
        t0, b0 = time.monotonic(), w.bytes

        def between():
            self._check_cancel()
            if limit:
                # max-bandwidth: sleep off whatever ran ahead of the budget
                ahead = (w.bytes - b0) / limit - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        self._check_cancel()
        sent = w.pages(self.machine.memory.ram, pfns, staging, compress, zero=send_zero,
                       between=between)
        self.transferred = w.bytes
        self.pages += sent
        return sent

    def _to_tcp(self, uri, secure=None):
        m = self.machine
        caps = dict(self.settings.capabilities)
        params = dict(self.settings.parameters)
        colo = caps.get("x-colo", False)
        compress = caps.get("compress", False)
        limit = params["max-bandwidth"]
        undo = self.prepare_colo() if colo else None
        try:
            ch = Channel.connect(uri, secure=secure)
        except BaseException:
            if undo is not None:
                undo()
            raise
        self.channel = ch
        self.channel_security = ch.security
        t_setup = time.monotonic()
        self.setup_ms = (t_setup - self.start_time) * 1000
        try:
            self.set_status("active")
            ch.set_timeout(self.stall_timeout)
            ch.send(stream.header())
            w = units.UnitWriter(ch.send)
            info = dict(m.machine_info(), **{
                "x-colo": colo, "capabilities": caps,
                # what a secondary that takes over protects itself with
                "parameters": {"x-checkpoint-delay": params["x-checkpoint-delay"]}})
            if colo and self.colo_info is not None:
                info["arbiter"] = self.colo_info()
            w.json(Section.MACHINE, info)
            mem = m.memory
            staging = bytearray(BATCH_PAGES * PAGE)
            was_running = m.runstate == "running"
            # Reset the dirty log before the first full pass: a page written after its copy
            # was read shows up in the next harvest. Harvest with the vCPU parked, because
            # device emulation marks the software bitmap from the vCPU thread.
            self._harvest_parked()
            self._send_pages(w, mem.all_pages(), staging, compress, False, limit)
            self.rounds = 1
            best = None
            while True:
                self._check_cancel()
                t_round = time.monotonic()
                dirty = self._harvest_parked()
                bw = max(limit or 1 << 40, 1)
                seconds = len(dirty) * PAGE / min(bw, self._measured_bw(ch, t_setup))
                if seconds * 1000 <= params["downtime-limit"] or self.rounds >= MAX_ROUNDS \
                        or (best is not None and len(dirty) >= best and self.rounds >= 5):
                    break
                best = len(dirty) if best is None else min(best, len(dirty))
                self._send_pages(w, dirty, staging, compress, True, limit)
                self.rounds += 1
                self.dirty_rate = len(dirty) / max(time.monotonic() - t_round, 1e-6)
            # stop and copy
            t_down = time.monotonic()
            if was_running:
                m.pause("finish-migrate", event=True)
            else:
                m.set_runstate("finish-migrate")
            try:
                ch.set_deadline(time.monotonic() + FINISH_TIMEOUT)
                # The pages of the last harvest were not sent yet: they go with the final
                # ones (dropping them here would leave the destination with stale pages).
                final = mem.harvest()
                if len(dirty):
                    final = array.array("I", sorted(set(dirty).union(final)))
                self._send_pages(w, final, staging, compress, True, 0)
                if colo:
                    # From here on guest output is held until the secondary has the state
                    # that produced it (output commit); what is pending now is in DEVICES.
                    m.hold_output()
                marks = m.output_marks()
                w.vcpu_and_devices(m.vcpu.get_state(), m.device_states())
                w.end()
                self.transferred = ch.bytes_sent
                ch.expect(Msg.CHECKPOINT_READY if colo else Msg.LOADED)
                ch.set_deadline(None)
            except BaseException as exc:
                m.release_held_output()
                m.set_runstate("paused")
                if was_running:
                    m.resume()
                if isinstance(exc, PeerLost) and not exc.closed:
                    raise ColocoreError(
                        "the destination %s did not take the final state within %.0f s (busy "
                        "with another connection, stalled, or not a colocore destination); "
                        "the guest runs on here" % (uri, FINISH_TIMEOUT)) from None
                raise
            self.downtime_ms = (time.monotonic() - t_down) * 1000
            self.total_ms = (time.monotonic() - self.start_time) * 1000
            log.info("migrated to %s: %d bytes, %d rounds, %.0f ms, downtime %.1f ms", uri,
                     self.transferred, self.rounds, self.total_ms, self.downtime_ms)
            if not colo:
                m.set_runstate("postmigrate")
                self.set_status("completed")
                ch.close()
                return None
            self.set_status("colo")
            m.release_output(marks)
            if was_running:
                m.resume()
            else:
                m.set_runstate("paused")
        except BaseException:
            ch.close()
            self.channel = None
            if undo is not None:
                undo()
            raise
        self.channel = None
        return ch

    def _harvest_parked(self):
        m = self.machine
        if m.runstate != "running":
            return m.memory.harvest()
        was_running = m.park_quietly()
        try:
            return m.memory.harvest()
        finally:
            m.unpark_quietly(was_running)

    def _measured_bw(self, ch, t0):
        dt = time.monotonic() - t0
        return max(ch.bytes_sent / dt, 64 << 20) if dt > 0.01 else 1 << 40
