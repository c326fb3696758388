"""A colocore node: one process, one guest. This module only wires the parts together.

Threads: the control thread runs an asyncio loop (monitor, QMP, chardevs, signals); the
machine runs its vCPU thread (vm/machine.py); the migration thread runs a live migration
and then the COLO primary's checkpoint loop; the incoming thread accepts a migration and
then runs the COLO secondary's loop. See docs/DESIGN.md.
"""
import asyncio
import json
import logging
import os
import signal
import time

from colocore_ext.capture import uffd_wp_support

from colocore.arbiter import parse_arbiter
from colocore.colo.checkpoint import Checkpointer
from colocore.colo.state import Colo, colo_supported
from colocore.control.arbiter import ColoArbiter
from colocore.control.chardev import Chardev, parse_chardev
from colocore.control.commands import Commands
from colocore.control.hmp import Hmp, attach_monitor, format_status
from colocore.control.qmp import QmpCommands, attach_qmp
from colocore import paths, tls
from colocore.errors import ColocoreError
from colocore.migration.incoming import Incoming
from colocore.migration.outgoing import Migration
from colocore.migration.params import MigrationSettings
from colocore.migration.transport import Listener, parse_tcp_uri
from colocore.net.announce import announce
from colocore.net.colo_net import ColoNet
from colocore.net.inputlog import DEFAULT_FRAMES
from colocore.net.tap import TapBackend, parse_nic
from colocore.vm.devices.virtio_net import DEFAULT_MAC
from colocore.vm.machine import Machine
from colocore.vmstate import snapshot

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
    except (ValueError, OverflowError):
        raise ColocoreError("-m %r: expected a size like 256M or 1G" % text) from None
    if value <= 0 or value % (2 << 20):
        raise ColocoreError("-m %r: memory must be a positive multiple of 2 MiB" % text)
    return value


def _stats_writer(path):
    """--stats-file: one JSON line per COLO checkpoint (benchmarks; on a secondary, per
    checkpoint loaded, with "event"), written by the control loop, so the checkpoint loop
    and its pause never wait for the disk."""
    f = open(path, "a", buffering=1)

    def write(name, data, stamp):
        if name == "COLO_CHECKPOINT":
            f.write(json.dumps(dict(data, time=round(stamp, 6))) + "\n")
        elif name == "COLO_CHECKPOINT_LOADED":
            f.write(json.dumps(dict(data, event=name, time=round(stamp, 6))) + "\n")
    return write


class Node:
    def __init__(self, args):
        self.args = args
        self.name = args.name or "colocore"
        self.loop = None
        self.machine = None
        self.settings = None
        self.migration = None
        self.colo = None
        self.incoming = None
        self.commands = None
        self.hmp = None
        self.chardevs = {}
        self._paused_clients = []
        self.quit_event = None
        self.event_listeners = []
        # --object: TLS credentials and authz, created (files read) before anything else
        self.objects = tls.Objects(getattr(args, "object", None) or ())
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
        self.nic_spec = parse_nic(args.nic) if getattr(args, "nic", None) else None
        self.nic_backend = None
        self.colo_net = None
        self.exit_status = 0
        self.arbiter = None
        if getattr(args, "arbiter", None):
            spec = parse_arbiter(args.arbiter)
            if spec.role == "standby" and not str(args.incoming or "").startswith("tcp:"):
                raise ColocoreError("--arbiter role=standby waits for a primary: give "
                                    "--incoming tcp:HOST:PORT (and no --kernel)")
            self.arbiter = ColoArbiter(spec, self.name)

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
        tcp_incoming = None
        if a.incoming:
            kind, sep, rest = a.incoming.partition(":")
            if kind == "file" and rest:
                # read and verify the whole snapshot before creating anything
                snap = snapshot.read_file(rest)
                mem = mem or snap.info["mem_size"]
            elif kind == "tcp":
                tcp_incoming = a.incoming
            elif a.incoming == "defer":
                tcp_incoming = "defer"        # migrate_incoming tcp:HOST:PORT comes later
            else:
                raise ColocoreError("--incoming %r: use file:PATH, tcp:HOST:PORT or defer"
                                    % a.incoming)
        elif not a.kernel:
            raise ColocoreError("nothing to run: give --kernel NAME|PATH or --incoming file:PATH|tcp:HOST:PORT")
        mem = mem or (256 << 20)
        self._build(mem, tcp_incoming)
        m = self.machine
        if snap is not None:
            m.set_runstate("inmigrate")
            snapshot.load(snap, m, a.incoming[5:])
            log.info("%s: restored from %s", self.name, a.incoming)
        elif tcp_incoming:
            m.set_runstate("inmigrate")
        else:
            m.boot(a.kernel, a.append or "")
        m.console_out.attach(self.loop.call_soon_threadsafe)
        m.serial_out.attach(self.loop.call_soon_threadsafe)
        if self.arbiter is not None:
            # before the guest runs: no byte leaves unless the arbiter says this node serves
            self.arbiter.attach(m, self.colo, self.migration, self.settings, self.loop,
                                self.emit_event, self._leave)
            if tcp_incoming:
                self.arbiter.start_incoming(tcp_incoming, mem)
            else:
                self.arbiter.start_serving()
            self.arbiter.auto_protect_tick()
        # A destination opens its guest chardevs only when it starts serving: before
        # that, a client must not talk to a guest that is not the live one.
        await self._open_chardevs(("monitor", "qmp") if tcp_incoming
                                  else ("console", "serial", "monitor", "qmp"))
        m.start_thread()
        if tcp_incoming:
            if tcp_incoming != "defer":
                self.incoming.start()
        elif a.S:
            if snap is not None:
                m.set_runstate("paused")
        else:
            m.resume()
        if snap is not None:
            self.announce_nic()
        self._install_signals()

    def _build(self, mem, tcp_incoming):
        """Create the parts and hand each only what it uses."""
        # an incoming listener binds first: a busy port fails before a VM is created
        listener = None
        if tcp_incoming and tcp_incoming != "defer":
            listener = self._listen(tcp_incoming, None)
        self.machine = m = Machine(mem, self.name, on_event=self.emit_event)
        if self.nic_spec is not None:
            # Before the guest exists anywhere: a NIC that cannot be set up stops the start.
            # A destination's tap stays off the service bridge until it serves; its queue
            # toward the guest can hold a whole replayed input log.
            self.nic_backend = TapBackend(self.nic_spec).open(
                join_bridge=not tcp_incoming,
                txqlen=DEFAULT_FRAMES if tcp_incoming and self.nic_spec.mirror else None)
            m.attach_nic(self.nic_spec.mac or DEFAULT_MAC, self.nic_backend)
            self.colo_net = ColoNet(m, self.nic_backend, self.nic_spec, self.emit_event)
            if tcp_incoming:
                self.colo_net.start_log()
        ok, _features, reason = uffd_wp_support()
        self.settings = MigrationSettings(colo_supported=colo_supported(m), objects=self.objects,
                                          cow_support=(ok, reason))
        verify = bool(getattr(self.args, "colo_verify", False))
        self.colo = Colo(m, self.settings, self.emit_event, serve=self._serve_from_thread,
                         migration_over=lambda: self.migration.colo_finished(), verify=verify,
                         network=self.colo_net)
        self.migration = Migration(
            m, self.settings, self.emit_event,
            on_colo=lambda ch: self.colo.run_primary(ch, Checkpointer(m, self.settings, verify)),
            prepare_colo=self.colo_net.prepare_primary if self.colo_net is not None else None)
        self.settings.on_parameter_change = self._parameter_changed
        if listener is not None:
            self._make_incoming(listener)
        self.deferred_incoming = tcp_incoming == "defer"
        self.commands = Commands(m, self.settings, self.migration, self.colo,
                                 self.emit_event, self.request_quit, announce=self.announce_nic,
                                 migrate_incoming=self.migrate_incoming, arbiter=self.arbiter)
        self.hmp = Hmp(self.commands)

    def _make_incoming(self, listener):
        self.incoming = Incoming(self.machine, self.settings, listener,
                                 set_status=self.migration.set_incoming_status,
                                 on_done=self._serve_from_thread,
                                 on_colo=self.colo.run_secondary)
        if self.arbiter is not None:
            self.arbiter.attach_incoming(self.incoming)

    def _listen(self, uri, secure):
        """The incoming listener, with the TLS hook (settings' tls-creds at the time it
        is created: --incoming tcp: has none, migrate_incoming uses what was set)."""
        host, port = parse_tcp_uri(uri, "--incoming")

        def recorded(sock, peer):
            sock, security = secure(sock, peer)
            self.migration.channel_security = security     # for query-migrate
            return sock, security
        listener = Listener(uri, secure=recorded if secure is not None else None)
        paths.warn_if_exposed(log, "--incoming", host, port, secure is not None)
        return listener

    def migrate_incoming(self, uri):
        """migrate_incoming tcp:HOST:PORT on a node started with --incoming defer (QEMU):
        the listener is created now, with the TLS parameters set meanwhile."""
        if not self.deferred_incoming:
            raise ColocoreError("'-incoming' was not specified on the command line"
                                if self.incoming is None else
                                "The incoming migration has already been started")
        if not uri.startswith("tcp:"):
            raise ColocoreError("migrate_incoming %r: use tcp:HOST:PORT" % uri)
        secure = self.settings.server_secure("migrate_incoming %s" % uri)
        self._make_incoming(self._listen(uri, secure))
        self.deferred_incoming = False
        self.incoming.start()
        log.info("%s: listening for the incoming migration on %s%s", self.name, uri,
                 " (TLS, %s)" % self.settings.parameters["tls-creds"] if secure else "")

    def announce_nic(self):
        """The guest's MAC may live on another port now: tell the network (QEMU does it
        after every incoming migration). Runs on the control loop."""
        if self.machine.nic is not None and self.machine.nic.backend is not None:
            announce(self.loop, self.machine.nic)

    def _parameter_changed(self, name, value):
        if name == "x-checkpoint-delay" and self.colo.mode == "primary":
            self.colo.trigger.set()         # QEMU: a new delay takes effect with a checkpoint now

    def _serve_from_thread(self):
        """A destination starts serving (end of a plain migration, or a takeover): open its
        guest chardevs, put its tap on the service bridge (a takeover did already), run
        its guest, let out the output held since the state arrived, announce the guest.
        Called from the incoming or takeover thread."""
        asyncio.run_coroutine_threadsafe(self._open_chardevs(("console", "serial")),
                                         self.loop).result()
        if self.colo_net is not None:
            self.colo_net.attach_service()
        self.machine.resume()
        self.machine.release_held_output()
        # The guest's MAC now lives behind this node's tap (a migration, a takeover); the
        # announcements come after the tap is on the bridge, or they would teach nobody.
        self.loop.call_soon_threadsafe(self.announce_nic)
        if self.colo_net is not None:
            self.colo_net.stop_log()        # a node that serves logs no mirror

    async def _open_chardevs(self, which):
        m = self.machine
        for what in which:
            if what not in self.specs or what in self.chardevs:
                continue
            cd = Chardev(self.specs[what], what, shared=(what in ("monitor", "qmp")),
                         objects=self.objects)
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
                attach_qmp(QmpCommands(self.commands, self.hmp), cd, self.event_listeners)

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

    # ---- the life of the process -----------------------------------------------------

    def _leave(self, status):
        """Any thread: quit with this exit status (the arbiter: this node stops serving)."""
        self.exit_status = status
        self.request_quit()

    def request_quit(self):
        if self.quit_event is not None:
            self.loop.call_soon_threadsafe(self.quit_event.set)

    async def run(self):
        await self.start()
        log.info("%s: %s (pid %d)", self.name, format_status(self.commands.query_status()),
                 os.getpid())
        await self.quit_event.wait()
        self.shutdown()

    def shutdown(self):
        if self.incoming is not None:
            self.incoming.close()
        if self.colo is not None:
            self.colo.close()
        if self.arbiter is not None:
            self.arbiter.close()        # the fence closes before the lease goes back
        if self.machine is not None:
            self.machine.close()
        if self.colo_net is not None:
            self.colo_net.close()           # the mirror, the log: nothing COLO set up stays
        if self.nic_backend is not None:
            self.nic_backend.close()        # a tap this node created goes with it
        for cd in self.chardevs.values():
            cd.close()
