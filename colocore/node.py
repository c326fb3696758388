"""A colocore node: one process, one guest, its chardevs, monitor and migration.

The control thread runs an asyncio loop (monitor, chardevs, signals); the machine runs
its vCPU thread; migrations run on the migration thread. See docs/DESIGN.md.
"""
import asyncio
import json
import logging
import os
import signal
import time

from colocore_ext.capture import uffd_wp_support

from . import snapshot
from .chardev import Chardev, parse_chardev
from .colo import Colo, colo_supported
from .errors import ColocoreError
from .incoming import Incoming
from .machine import Machine
from .migration import Migration
from .monitor import HmpCommands, attach_monitor
from .params import MigrationSettings

log = logging.getLogger("colocore.node")


def parse_mem(text):
    t = str(text).strip().upper()
    mult = 1 << 20
    if t.endswith("G"):
        mult, t = 1 << 30, t[:-1]
    elif t.endswith("M"):
        t = t[:-1]
    elif t.endswith("K"):
        mult, t = 1 << 10, t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise ColocoreError("-m %r: expected a size like 256M or 1G" % text) from None
    if value <= 0 or value % (2 << 20):
        raise ColocoreError("-m %r: memory must be a positive multiple of 2 MiB" % text)
    return value


def _stats_writer(path):
    """--stats-file: one JSON line per COLO checkpoint (benchmarks), written by the
    control loop, so the checkpoint loop and its pause never wait for the disk."""
    f = open(path, "a", buffering=1)

    def write(name, data, stamp):
        if name == "COLO_CHECKPOINT":
            f.write(json.dumps(dict(data, time=round(stamp, 6))) + "\n")
    return write


class Node:
    def __init__(self, args):
        self.args = args
        self.name = args.name or "colocore"
        self.loop = None
        self.machine = None
        self.chardevs = {}
        self._paused_clients = []
        self.quit_event = None
        self.event_listeners = []
        self.migration = Migration(self)
        self.colo = Colo(self)
        self.settings = None
        self.incoming = None
        self.quitting = False
        self.args_verify = bool(getattr(args, "colo_verify", False))
        self.hmp = HmpCommands(self)
        if getattr(args, "stats_file", None):
            self.event_listeners.append(_stats_writer(args.stats_file))
        # validate every chardev spec before anything is created
        self.specs = {}
        for what in ("console", "serial", "monitor", "qmp"):
            value = getattr(args, what, None)
            if value:
                self.specs[what] = parse_chardev(value, "--" + what)
        if "serial" not in self.specs:
            self.specs["serial"] = parse_chardev("log")

    # ---- events ------------------------------------------------------------------

    def emit_event(self, name, data):
        """Thread safe: deliver an event (QMP-style) to listeners on the control loop."""
        stamp = time.time()
        if self.loop is None:
            return
        def deliver():
            for fn in list(self.event_listeners):
                try:
                    fn(name, data, stamp)
                except Exception:  # noqa: BLE001
                    log.exception("event listener failed")
        self.loop.call_soon_threadsafe(deliver)

    # ---- start-up --------------------------------------------------------------------

    async def start(self):
        self.loop = asyncio.get_running_loop()
        self.quit_event = asyncio.Event()
        a = self.args
        snap = None
        mem = parse_mem(a.m) if a.m else None
        tcp_incoming = False
        if a.incoming:
            kind, sep, rest = a.incoming.partition(":")
            if kind == "file" and rest:
                # read and verify the whole snapshot before creating anything
                snap = snapshot.read_file(rest)
                mem = mem or int(snap.info["mem_size"])
            elif kind == "tcp":
                tcp_incoming = True
            else:
                raise ColocoreError("--incoming %r: use file:PATH or tcp:HOST:PORT" % a.incoming)
        elif not a.kernel:
            raise ColocoreError("nothing to run: give --kernel NAME|PATH or --incoming file:PATH|tcp:HOST:PORT")
        mem = mem or (256 << 20)
        if tcp_incoming:
            self.incoming = Incoming(self, a.incoming)     # binds now: a busy port fails here
        self.machine = Machine(mem, self.name, on_event=self.emit_event)
        ok, _features, reason = uffd_wp_support()
        self.settings = MigrationSettings(colo_supported=colo_supported(self.machine),
                                          cow_support=(ok, reason))
        self.settings.on_parameter_change = self._parameter_changed
        m = self.machine
        if snap is not None:
            m.set_runstate("inmigrate")
            snap.apply(m)
            log.info("%s: restored from %s", self.name, a.incoming)
        elif tcp_incoming:
            m.set_runstate("inmigrate")
        else:
            m.boot(a.kernel, a.append or "")
        m.console_out.attach(self.loop.call_soon_threadsafe)
        m.serial_out.attach(self.loop.call_soon_threadsafe)
        # A destination opens its guest chardevs only when it starts serving: before
        # that, a client must not talk to a guest that is not the live one.
        await self._open_chardevs(("monitor", "qmp") if tcp_incoming
                                  else ("console", "serial", "monitor", "qmp"))
        m.start_thread()
        if tcp_incoming:
            self.incoming.start()
        elif a.S:
            if snap is not None:
                m.set_runstate("paused")
        else:
            m.resume()
        self._install_signals()

    def _parameter_changed(self, name, value):
        if name == "x-checkpoint-delay" and self.colo.mode == "primary":
            self.colo.trigger.set()         # QEMU: a new delay takes effect with a checkpoint now

    def migration_in_status(self, status):
        """Destination side of `info migrate` (thread safe)."""
        self.migration.status = status
        self.emit_event("MIGRATION", {"status": status})

    async def _start_serving(self):
        await self._open_chardevs(("console", "serial"))

    def incoming_finished(self):
        async def go():
            await self._start_serving()
            self.machine.resume()
        asyncio.ensure_future(go())

    def schedule_takeover(self):
        """Secondary failover: wait out the incoming thread, open chardevs, run the guest."""
        async def go():
            try:
                await self.loop.run_in_executor(None, self.colo.takeover_prepare)
                await self._start_serving()
                self.machine.resume()
                self.colo.takeover_finish()
            except Exception:  # noqa: BLE001 - a failed takeover must be loud
                log.exception("%s: takeover failed", self.name)
        asyncio.ensure_future(go())

    async def _open_chardevs(self, which):
        m = self.machine
        for what in which:
            if what not in self.specs or what in self.chardevs:
                continue
            cd = Chardev(self.specs[what], what, shared=(what in ("monitor", "qmp")))
            await cd.open(self.loop)
            self.chardevs[what] = cd
            if what == "console":
                def console_input(data, client):
                    if not m.console.feed(data) and client is not None:
                        client.transport.pause_reading()
                        self._paused_clients.append(client)
                    m.platform.wake()
                cd.on_input = console_input
                m.console_out._deliver = cd.write
                m.console.on_rx_space = lambda: self.loop.call_soon_threadsafe(self._resume_clients)
            elif what == "serial":
                cd.on_input = lambda data, client: m.uart.feed(data)
                m.serial_out._deliver = cd.write
            elif what == "monitor":
                attach_monitor(self.hmp, cd)
            elif what == "qmp":
                from .qmp import attach_qmp
                attach_qmp(self, cd)

    def _resume_clients(self):
        while self._paused_clients:
            c = self._paused_clients.pop()
            if c.transport is not None and not c.transport.is_closing():
                c.transport.resume_reading()

    def _install_signals(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self.loop.add_signal_handler(sig, self.request_quit)
            except (ValueError, RuntimeError):
                pass

    # ---- operations used by HMP and QMP --------------------------------------------

    def status_line(self):
        st = self.machine.runstate
        if st == "running":
            return "VM status: running"
        if st == "paused":
            return "VM status: paused"
        return "VM status: paused (%s)" % st

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

    def request_quit(self):
        if self.quit_event is not None:
            self.loop.call_soon_threadsafe(self.quit_event.set)

    async def run(self):
        await self.start()
        log.info("%s: %s (pid %d)", self.name, self.status_line(), os.getpid())
        await self.quit_event.wait()
        self.shutdown()

    def shutdown(self):
        self.quitting = True
        if self.incoming is not None:
            self.incoming.close()
        ch = self.colo.channel
        if ch is not None:
            ch.close()
        if self.machine is not None:
            self.machine.close()
        for cd in self.chardevs.values():
            cd.close()
