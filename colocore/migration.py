"""Outgoing migration: status, figures, and the migration thread.

`start(uri)` validates the URI on the caller's thread (so `migrate` answers errors at
once), then runs the transfer on the migration thread. Status names are QEMU's: none,
setup, active, completed, failed, cancelled (and colo, once COLO exists).
"""
import asyncio
import logging
import threading
import time

from . import snapshot
from .errors import ColocoreError

log = logging.getLogger("colocore.migration")

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
        self.cancel_requested = threading.Event()
        self.reset_figures()

    def reset_figures(self):
        self.start_time = None
        self.total_ms = 0
        self.setup_ms = 0
        self.downtime_ms = 0
        self.transferred = 0
        self.pages = 0

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
        if self.status in ("setup", "active", "colo"):
            raise ColocoreError("a migration is already in progress (status %s); "
                                "migrate_cancel it first" % self.status)
        if self.node.machine.runstate in ("guest-panicked", "internal-error", "shutdown", "inmigrate"):
            raise ColocoreError("cannot migrate a guest in state %s" % self.node.machine.runstate)
        kind, sep, target = uri.partition(":")
        if kind != "file" or not sep or not target:
            raise ColocoreError("migrate: unsupported URI %r; use file:PATH" % uri)
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
                self._to_file(target)
            except ColocoreError as e:
                exc = e
            except Exception as e:  # noqa: BLE001
                log.exception("migration failed")
                exc = ColocoreError("migration failed: %s" % e)
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
        if self.status not in ("setup", "active"):
            return
        self.cancel_requested.set()

    def info_text(self):
        lines = ["Migration status: %s" % self.status]
        if self.status != "none":
            total = self.total_ms if self.status != "active" or not self.start_time \
                else (time.monotonic() - self.start_time) * 1000
            lines += ["total time: %d ms" % total,
                      "downtime: %d ms" % self.downtime_ms,
                      "setup: %d ms" % self.setup_ms,
                      "transferred ram: %d kbytes" % (self.transferred // 1024),
                      "normal: %d pages" % self.pages]
        if self.error:
            lines.append("error: %s" % self.error)
        return "\n".join(lines)
