"""The HMP-style text monitor: QEMU's words and formats, colocore's prompt.

Commands live in one table (`HmpCommands.table`); each handler returns the text to
print, or raises ColocoreError whose message is printed as `Error: ...`. The same table
serves the monitor chardev and QMP's human-monitor-command.
"""
import asyncio
import inspect
import logging
import shlex

from . import __version__
from .errors import ColocoreError

log = logging.getLogger("colocore.monitor")

PROMPT = "(colocore) "
BANNER = "colocore %s monitor - type 'help' for more information\r\n" % __version__
MAX_LINE = 64 * 1024


class HmpError(ColocoreError):
    pass


class HmpCommands:
    """The HMP command table, bound to a node."""

    def __init__(self, node):
        self.node = node
        # name -> (args help, help text, handler(args list) -> str)
        self.table = {}
        self.info_table = {}
        self._register()

    def command(self, name, args, helptext):
        def deco(fn):
            self.table[name] = (args, helptext, fn)
            return fn
        return deco

    def info(self, name, helptext):
        def deco(fn):
            self.info_table[name] = (helptext, fn)
            return fn
        return deco

    def _register(self):
        node = self.node

        @self.command("help", "[cmd]", "show the help")
        def _help(args):
            lines = []
            for name, (a, h, _) in sorted(self.table.items()):
                if args and args[0] != name:
                    continue
                lines.append("%s %s -- %s" % (name, a, h) if a else "%s -- %s" % (name, h))
            if args and not lines:
                raise HmpError("unknown command: '%s'" % args[0])
            return "\n".join(lines)

        @self.command("info", "[subcommand]", "show various information about the system state")
        def _info(args):
            if not args:
                return "\n".join("info %s -- %s" % (n, h) for n, (h, _) in sorted(self.info_table.items()))
            sub = args[0]
            if sub not in self.info_table:
                raise HmpError("unknown info subcommand: '%s'; 'info' lists them" % sub)
            return self.info_table[sub][1](args[1:])

        @self.info("status", "show the current VM status (running|paused)")
        def _status(args):
            return node.status_line()

        @self.info("version", "show the version of colocore")
        def _version(args):
            return __version__

        @self.info("migrate", "show migration status")
        def _migrate(args):
            return node.migration.info_text()

        @self.info("network", "show the network card: MAC, link, tap, frame counters")
        def _network(args):
            m = node.machine
            if m.nic is None:
                return "no network card (start with --nic)"
            return "%s\n  vcpu: %d exits, %d waits" % (m.nic.info(), m.vcpu.exits, m.platform.waits)

        @self.command("announce_self", "", "announce the guest's MAC on the network "
                      "(RARP rounds and the virtio-net ANNOUNCE bit)")
        def _announce(args):
            if node.machine.nic is None:
                raise HmpError("no network card (start the node with --nic)")
            node.announce_nic()
            return ""

        @self.command("stop", "", "stop emulation")
        def _stop(args):
            node.stop()
            return ""

        @self.command("cont", "", "resume emulation")
        def _cont(args):
            node.cont()
            return ""

        @self.command("c", "", "resume emulation")
        def _c(args):
            node.cont()
            return ""

        @self.command("quit", "", "quit the emulator")
        def _quit(args):
            node.request_quit()
            return ""

        @self.command("q", "", "quit the emulator")
        def _q(args):
            node.request_quit()
            return ""

        @self.command("migrate", "[-d] uri", "migrate to URI (file:PATH or tcp:HOST:PORT); -d: do not wait")
        async def _migrate_cmd(args):
            # With x-colo the migration never "finishes" (it turns into COLO): don't wait.
            detach = "-d" in args or node.settings.capabilities.get("x-colo")
            rest = [a for a in args if not a.startswith("-")]
            if len(rest) != 1:
                raise HmpError("migrate needs one URI, e.g. migrate file:/tmp/vm.snap")
            fut = node.migration.start(rest[0])
            if not detach:
                await fut
            return ""

        @self.info("migrate_capabilities", "show current migration capabilities")
        def _caps(args):
            return node.settings.capabilities_text()

        @self.info("migrate_parameters", "show current migration parameters")
        def _params(args):
            return node.settings.parameters_text()

        @self.info("colo", "show COLO mode, last mode, exit reason and failover state")
        def _colo(args):
            return node.colo.info_text()

        @self.command("migrate_set_capability", "capability state",
                      "enable/disable a migration capability (on|off)")
        def _set_cap(args):
            if len(args) != 2 or args[1] not in ("on", "off", "true", "false"):
                raise HmpError("usage: migrate_set_capability CAPABILITY on|off")
            node.settings.set_capability(args[0], args[1] in ("on", "true"),
                                         busy=node.migration.status in ("setup", "active", "colo"))
            return ""

        @self.command("migrate_set_parameter", "parameter value", "set a migration parameter")
        def _set_param(args):
            if len(args) != 2:
                raise HmpError("usage: migrate_set_parameter PARAMETER VALUE")
            node.settings.set_parameter(args[0], args[1])
            return ""

        @self.command("x_colo_lost_heartbeat", "",
                      "tell COLO that heartbeat is lost, a failover or takeover is needed")
        def _lost(args):
            node.colo.request_failover()
            return ""

        @self.command("xp", "addr [len]", "hex dump of guest physical memory (debug)")
        def _xp(args):
            if not args or len(args) > 2:
                raise HmpError("usage: xp ADDR [LEN]")
            try:
                addr = int(args[0], 0)
                length = int(args[1], 0) if len(args) > 1 else 64
            except ValueError:
                raise HmpError("xp: ADDR and LEN are numbers (0x... for hex)") from None
            ram = node.machine.memory.ram
            if addr < 0 or length <= 0 or length > 65536 or addr + length > len(ram):
                raise HmpError("xp: 0x%x+%d is outside guest RAM (%d bytes)" % (addr, length, len(ram)))
            data = bytes(ram[addr:addr + length])
            return "\n".join("%016x: %s" % (addr + i, data[i:i + 16].hex(" "))
                             for i in range(0, len(data), 16))

        @self.command("migrate_cancel", "", "cancel the current VM migration")
        def _cancel(args):
            node.migration.cancel()
            return ""

    async def execute(self, line):
        """Run one command line; return (text, ok)."""
        line = line.strip()
        if not line:
            return "", True
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return "Error: cannot parse the command line: %s" % exc, False
        name, args = words[0], words[1:]
        entry = self.table.get(name)
        if entry is None:
            return "unknown command: '%s'" % name, False
        try:
            out = entry[2](args)
            if inspect.isawaitable(out):
                out = await out
            return out or "", True
        except ColocoreError as exc:
            return "Error: %s" % exc, False
        except Exception as exc:  # noqa: BLE001 - a monitor command must never kill the node
            log.exception("monitor command %r failed", line)
            return "Error: internal error in %s: %s" % (name, exc), False


class MonitorSession:
    """One monitor client on a chardev: line in, output + prompt out."""

    def __init__(self, commands, chardev, client):
        self.commands = commands
        self.chardev = chardev
        self.client = client
        self.buf = bytearray()
        self.queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    def greet(self):
        self.chardev.write((BANNER + PROMPT).encode(), self.client)

    def feed(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > MAX_LINE:
                    self.buf.clear()
                    self.queue.put_nowait(None)
                return
            line = bytes(self.buf[:i]).decode("utf-8", "replace").rstrip("\r")
            del self.buf[:i + 1]
            self.queue.put_nowait(line)

    async def _run(self):
        while True:
            line = await self.queue.get()
            if line is None:
                out, _ = "Error: command line too long (limit %d bytes)" % MAX_LINE, False
            else:
                out, _ = await self.commands.execute(line)
            text = (out + "\r\n" if out else "") + PROMPT
            self.chardev.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode(), self.client)

    def close(self):
        self.task.cancel()


def attach_monitor(commands, chardev):
    sessions = {}

    def on_connect(client):
        s = MonitorSession(commands, chardev, client)
        sessions[id(client)] = s
        s.greet()

    def on_input(data, client):
        s = sessions.get(id(client))
        if s is None and client is None:          # stdio
            s = sessions.setdefault(0, MonitorSession(commands, chardev, None))
        if s is not None:
            s.feed(data)

    def on_disconnect(client):
        s = sessions.pop(id(client), None)
        if s is not None:
            s.close()

    chardev.on_connect = on_connect
    chardev.on_input = on_input
    chardev.on_disconnect = on_disconnect
    if chardev.spec.kind == "stdio":
        on_connect(None)
        sessions[0] = sessions.pop(id(None))
