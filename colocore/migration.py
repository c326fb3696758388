"""Outgoing migration: status, figures, and the migration thread.

`start(uri)` validates the URI on the caller's thread (so `migrate` answers errors at
once), then runs the transfer on the migration thread. Status names are QEMU's: none,
setup, active, completed, failed, cancelled (and colo, once COLO exists).
"""
import array
import asyncio
import json
import logging
import threading
import time

from . import memory, snapshot, stream
from .checkpoint import Stager
from .errors import ColocoreError
from .stream import Section
from .transport import Channel, Msg, parse_tcp_uri

log = logging.getLogger("colocore.migration")

MAX_ROUNDS = 30
LOADED_TIMEOUT = 60.0


class MigrationCancelled(Exception):
    pass


STATUSES = ("none", "setup", "active", "completed", "failed", "cancelled", "colo")
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
    def __init__(self, node):
        self.node = node
        self.status = "none"
        self.error = None
        self._lock = threading.Lock()
        self._thread = None
        self.channel = None
        self.rounds = 0
        self.cancel_requested = threading.Event()
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
        self.node.emit_event("MIGRATION", {"status": new})
        return old

    def start(self, uri):
        """Begin a migration; returns a future that completes when it ends."""
        if self.node.machine.runstate in ("guest-panicked", "internal-error", "shutdown",
                                          "inmigrate", "colo"):
            raise ColocoreError("cannot migrate a guest in state %s" % self.node.machine.runstate)
        if self.status == "colo":
            raise ColocoreError("the guest is protected by COLO; end that first with "
                                "x_colo_lost_heartbeat")
        if self.status in ("setup", "active"):
            raise ColocoreError("a migration is already in progress (status %s); "
                                "migrate_cancel it first" % self.status)
        kind, sep, target = uri.partition(":")
        if kind == "tcp":
            parse_tcp_uri(uri)
            work = lambda: self._to_tcp(uri)  # noqa: E731
        elif kind == "file" and target:
            work = lambda: self._to_file(target)  # noqa: E731
        else:
            raise ColocoreError("migrate: unsupported URI %r; use tcp:HOST:PORT or file:PATH" % uri)
        self.cancel_requested.clear()
        self.error = None
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
                work()
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
        m = self.node.machine
        t0 = time.monotonic()
        was_running = m.runstate == "running"
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
            m.set_runstate("paused")
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

    def colo_finished(self):
        """The primary left COLO (failover): the migration is over."""
        if self.status == "colo":
            self.set_status("completed")

    def info_text(self):
        lines = ["Migration status: %s" % self.status]
        if self.status != "none":
            total = self.total_ms if self.status != "active" or not self.start_time \
                else (time.monotonic() - self.start_time) * 1000
            # QEMU's words and order where QEMU has the figure
            lines += ["total time: %d ms" % total,
                      "downtime: %d ms" % self.downtime_ms,
                      "setup: %d ms" % self.setup_ms,
                      "transferred ram: %d kbytes" % (self.transferred // 1024),
                      "total ram: %d kbytes" % (self.node.machine.mem_size // 1024),
                      "normal: %d pages" % self.pages,
                      "dirty sync count: %d" % self.rounds]
        st = self.node.colo.stats
        if self.status == "colo" or st.checkpoints:
            lines += ["colo checkpoints: %d" % st.checkpoints,
                      "colo last pause: %.3f ms" % st.last_pause_ms,
                      "colo mean pause: %.3f ms" % st.mean_pause_ms,
                      "colo max pause: %.3f ms" % st.max_pause_ms,
                      "colo last dirty pages: %d" % st.last_dirty_pages,
                      "colo last bytes: %d" % st.last_bytes,
                      "colo last latency: %.3f ms" % st.last_latency_ms,
                      "colo compression ratio: %.2f" % st.compression_ratio,
                      "colo pause mode: %s" % (st.last_mode or "-"),
                      "colo last hot pages: %d" % st.last_hot_pages,
                      "colo last cow pages: %d" % st.last_cow_pages,
                      "colo last wp faults: %d" % st.last_wp_faults,
                      "colo last unchanged pages: %d" % st.last_unchanged_pages]
        if self.error:
            lines.append("error: %s" % self.error)
        return "\n".join(lines)

    # ---- live migration over TCP ---------------------------------------------------

    def _check_cancel(self):
        if self.cancel_requested.is_set():
            raise MigrationCancelled()

    def _send_pages(self, ch, pfns, staging, compress, send_zero, limit):
        """Send pages `pfns` (read while the guest may run); returns pages sent."""
        ram = self.node.machine.memory.ram
        sent = 0
        t0, b0 = time.monotonic(), ch.bytes_sent
        for i in range(0, len(pfns), memory.BATCH_PAGES):
            self._check_cancel()
            payload, zero = memory.encode_ram(ram, pfns[i:i + memory.BATCH_PAGES], staging, compress)
            if payload is not None:
                ch.send_section(Section.RAM, payload)
                sent += memory.RAM_HEAD.unpack_from(payload)[3]
            if send_zero and len(zero):
                ch.send_section(Section.RAM_ZERO, zero.tobytes())
            if limit:
                # max-bandwidth: sleep off whatever ran ahead of the budget
                ahead = (ch.bytes_sent - b0) / limit - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        self.transferred = ch.bytes_sent
        self.pages += sent
        return sent

    def _to_tcp(self, uri):
        node, m = self.node, self.node.machine
        settings = node.settings
        caps = dict(settings.capabilities)
        params = dict(settings.parameters)
        colo = caps.get("x-colo", False)
        compress = caps.get("compress", False)
        limit = params["max-bandwidth"]
        ch = Channel.connect(uri)
        self.channel = ch
        t_setup = time.monotonic()
        self.setup_ms = (t_setup - self.start_time) * 1000
        try:
            self.set_status("active")
            ch.set_timeout(LOADED_TIMEOUT)
            ch.send(stream.header())
            info = m.machine_info()
            info["x-colo"] = colo
            info["capabilities"] = caps
            ch.send_section(Section.MACHINE, json.dumps(info).encode())
            mem = m.memory
            staging = bytearray(memory.BATCH_PAGES * memory.PAGE)
            was_running = m.runstate == "running"
            # Reset the dirty log before the first full pass: a page written after its copy
            # was read shows up in the next harvest. Harvest with the vCPU parked, because
            # device emulation marks the software bitmap from the vCPU thread.
            self._harvest_parked()
            self._send_pages(ch, mem.all_pages(), staging, compress, False, limit)
            self.rounds = 1
            best = None
            while True:
                self._check_cancel()
                t_round = time.monotonic()
                dirty = self._harvest_parked()
                bw = max(limit or 1 << 40, 1)
                seconds = len(dirty) * memory.PAGE / min(bw, self._measured_bw(ch, t_setup))
                if seconds * 1000 <= params["downtime-limit"] or self.rounds >= MAX_ROUNDS \
                        or (best is not None and len(dirty) >= best and self.rounds >= 5):
                    break
                best = len(dirty) if best is None else min(best, len(dirty))
                self._send_pages(ch, dirty, staging, compress, True, limit)
                self.rounds += 1
                self.dirty_rate = len(dirty) / max(time.monotonic() - t_round, 1e-6)
            # stop and copy
            t_down = time.monotonic()
            if was_running:
                m.pause("finish-migrate", event=True)
            else:
                m.set_runstate("finish-migrate")
            try:
                # The pages of the last harvest were not sent yet: they go with the final
                # ones (dropping them here would leave the destination with stale pages).
                final = mem.harvest()
                if len(dirty):
                    final = array.array("I", sorted(set(dirty).union(final)))
                self._send_pages(ch, final, staging, compress, True, 0)
                if colo:
                    # From here on guest output is held until the secondary has the state
                    # that produced it (output commit); what is pending now is in DEVICES.
                    m.console_out.hold = True
                    m.serial_out.hold = True
                marks = (m.console_out.produced, m.serial_out.produced)
                from . import cpustate
                from .machine import encode_devices
                ch.send_section(Section.CPU, cpustate.encode(m.vcpu.get_state()))
                ch.send_section(Section.DEVICES, encode_devices(m.device_states()))
                ch.send_section(Section.END, b"")
                self.transferred = ch.bytes_sent
                if colo:
                    ch.set_timeout(LOADED_TIMEOUT)
                    ch.expect(Msg.CHECKPOINT_READY)
                else:
                    ch.expect(Msg.LOADED)
            except BaseException:
                m.console_out.hold = m.serial_out.hold = False
                m.console_out.release()
                m.serial_out.release()
                m.set_runstate("paused")
                if was_running:
                    m.resume()
                raise
            self.downtime_ms = (time.monotonic() - t_down) * 1000
            self.total_ms = (time.monotonic() - self.start_time) * 1000
            log.info("migrated to %s: %d bytes, %d rounds, %.0f ms, downtime %.1f ms", uri,
                     self.transferred, self.rounds, self.total_ms, self.downtime_ms)
            if not colo:
                m.set_runstate("postmigrate")
                self.set_status("completed")
                ch.close()
                return
            self.set_status("colo")
            m.console_out.release(marks[0])
            m.serial_out.release(marks[1])
            if was_running:
                m.resume()
            else:
                m.set_runstate("paused")
        except BaseException:
            ch.close()
            self.channel = None
            raise
        self.channel = None
        stager = Stager(m, settings, verify=node.args_verify)
        try:
            node.colo.run_primary(ch, stager)
        finally:
            # COLO is over (failover, error, quit): no page may stay write-protected
            stager.close()

    def _harvest_parked(self):
        m = self.node.machine
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
