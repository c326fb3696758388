"""The HMP-style text monitor: QEMU's words and formats, colocore's prompt.

HMP is a printer: each command parses its words, calls the operation in
control/commands.py, and formats the data it returns in QEMU's words (`info migrate`,
`info status`, ... byte for byte where QEMU has the same output). The same table serves
the monitor chardev and QMP's human-monitor-command.
"""
import asyncio
import inspect
import logging
import shlex

from colocore import __version__
from colocore.control.arbiter import format_arbiter, register_arbiter_hmp
from colocore.control.hmp_net import format_colo_net, format_network
from colocore.errors import ColocoreError
from colocore.control.pause import STRING_PARAMETERS, format_pause, format_string_parameter
from colocore.migration.params import PARAMETERS, PARAMETER_ORDER

log = logging.getLogger("colocore.monitor")

PROMPT = "(colocore) "
BANNER = "colocore %s monitor - type 'help' for more information\r\n" % __version__
MAX_LINE = 64 * 1024
# Raw input held per monitor client before its socket stops being read.
INBOX_MAX = 2 * MAX_LINE
TOO_LONG = object()


class HmpError(ColocoreError):
    pass


# ---- formatting of the commands' data ---------------------------------------------------

def format_status(st):
    if st["status"] == "running":
        return "VM status: running"
    if st["status"] == "paused":
        return "VM status: paused"
    return "VM status: paused (%s)" % st["status"]


def format_migrate(info):
    lines = ["Migration status: %s" % info["status"]]
    ram = info.get("ram")
    if ram is not None:
        # QEMU's words and order where QEMU has the figure
        lines += ["total time: %d ms" % info["total-time"],
                  "downtime: %d ms" % info["downtime"],
                  "setup: %d ms" % info["setup-time"],
                  "transferred ram: %d kbytes" % (ram["transferred"] // 1024),
                  "total ram: %d kbytes" % (ram["total"] // 1024),
                  "normal: %d pages" % ram["normal"],
                  "dirty sync count: %d" % ram["dirty-sync-count"]]
    colo = info.get("x-colo")
    if colo is not None:
        lines += ["colo checkpoints: %d" % colo["checkpoints"],
                  "colo last pause: %.3f ms" % colo["last-pause-ms"],
                  "colo mean pause: %.3f ms" % colo["mean-pause-ms"],
                  "colo max pause: %.3f ms" % colo["max-pause-ms"],
                  "colo last dirty pages: %d" % colo["last-dirty-pages"],
                  "colo last bytes: %d" % colo["last-bytes"],
                  "colo last latency: %.3f ms" % colo["last-latency-ms"],
                  "colo compression ratio: %.2f" % colo["compression-ratio"]] + format_pause(colo)
    channel = info.get("x-channel")
    if channel is not None:
        lines.append("channel: %s" % format_channel(channel))
    if info.get("error-desc"):
        lines.append("error: %s" % info["error-desc"])
    return "\n".join(lines)


def format_channel(channel):
    """query-migrate's x-channel in words (the console shows the same)."""
    if not channel.get("tls"):
        return "plain tcp, not authenticated"
    if not channel.get("authenticated"):
        return "tls (%s), peer not authenticated" % channel.get("tls-version", "?")
    return "tls (%s), peer authenticated as %s" % (channel.get("tls-version", "?"),
                                                   channel.get("peer-identity") or "?")


def format_capabilities(caps):
    return "\n".join("%s: %s" % (c["capability"], "on" if c["state"] else "off") for c in caps)


def format_parameters(params):
    return "\n".join(format_string_parameter(name, params) if name in STRING_PARAMETERS else
                     "%s: %d %s" % (name, params[name], PARAMETERS[name][1])
                     for name in PARAMETER_ORDER)


def format_colo(st):
    peer = st["peer"] + (" (%s)" % st["peer-error"] if st.get("peer-error") else "")
    lines = ["COLO mode: %s" % st["mode"],
             "last mode: %s" % st["last-mode"],
             "reason: %s" % st["reason"],
             "failover state: %s" % st["failover-state"],
             "checkpoint mode: %s" % st["checkpoint-mode"],
             "peer: %s" % peer,
             "checkpoints: %d" % st["checkpoints"]]
    causes = st.get("checkpoint-causes")
    if causes and st["mode"] == "primary" or causes and any(causes.values()):
        lines.append("checkpoints by cause: " + ", ".join("%s %d" % kv for kv in causes.items()))
    if st["verified"] or st["verify-mismatches"]:
        lines.append("verified checkpoints: %d, mismatches: %d"
                     % (st["verified"], st["verify-mismatches"]))
    lines += format_colo_net(st.get("net"))
    if "arbiter" in st:
        lines += format_arbiter(st["arbiter"])
    return "\n".join(lines)


def format_xp(addr, data):
    return "\n".join("%016x: %s" % (addr + i, data[i:i + 16].hex(" "))
                     for i in range(0, len(data), 16))


class Hmp:
    """The HMP command table over an operations object (control/commands.py)."""

    def __init__(self, commands):
        self.commands = commands
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
        ops = self.commands

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

        self.info("status", "show the current VM status (running|paused)")(
            lambda args: format_status(ops.query_status()))
        self.info("version", "show the version of colocore")(lambda args: __version__)
        self.info("migrate", "show migration status")(
            lambda args: format_migrate(ops.query_migrate()))
        self.info("migrate_capabilities", "show current migration capabilities")(
            lambda args: format_capabilities(ops.query_migrate_capabilities()))
        self.info("migrate_parameters", "show current migration parameters")(
            lambda args: format_parameters(ops.query_migrate_parameters()))
        self.info("colo", "show COLO mode, last mode, exit reason and failover state")(
            lambda args: format_colo(ops.query_colo_status()))
        self.info("network", "show the network card: MAC, link, tap, frame counters")(
            lambda args: format_network(ops.query_net()))

        def no_args(fn):
            def handler(args):
                fn()
                return ""
            return handler

        for name, helptext, fn in (
                ("stop", "stop emulation", ops.stop),
                ("cont", "resume emulation", ops.cont),
                ("c", "resume emulation", ops.cont),
                ("quit", "quit the emulator", ops.quit),
                ("q", "quit the emulator", ops.quit),
                ("migrate_cancel", "cancel the current VM migration", ops.migrate_cancel),
                ("x_colo_lost_heartbeat",
                 "tell COLO that heartbeat is lost, a failover or takeover is needed",
                 ops.x_colo_lost_heartbeat),
                ("announce_self", "announce the guest's MAC on the network (RARP rounds "
                 "and the virtio-net ANNOUNCE bit)", ops.announce_self)):
            self.command(name, "", helptext)(no_args(fn))

        register_arbiter_hmp(self, ops)       # info colo_standbys, colo_protect

        @self.command("migrate", "[-d] uri", "migrate to URI (file:PATH or tcp:HOST:PORT); -d: do not wait")
        async def _migrate(args):
            rest = [a for a in args if not a.startswith("-")]
            if len(rest) != 1:
                raise HmpError("migrate needs one URI, e.g. migrate file:/tmp/vm.snap")
            fut = ops.migrate(rest[0])
            # With x-colo the migration never "finishes" (it turns into COLO): don't wait.
            if "-d" not in args and not ops.settings.capabilities.get("x-colo"):
                await fut
            return ""

        @self.command("migrate_incoming", "uri",
                      "start listening for an incoming migration (after --incoming defer)")
        def _migrate_incoming(args):
            if len(args) != 1:
                raise HmpError("usage: migrate_incoming tcp:HOST:PORT")
            ops.migrate_incoming(args[0])
            return ""

        @self.command("migrate_set_capability", "capability state",
                      "enable/disable a migration capability (on|off)")
        def _set_cap(args):
            if len(args) != 2 or args[1] not in ("on", "off", "true", "false"):
                raise HmpError("usage: migrate_set_capability CAPABILITY on|off")
            ops.migrate_set_capabilities([(args[0], args[1] in ("on", "true"))])
            return ""

        @self.command("migrate_set_parameter", "parameter value", "set a migration parameter")
        def _set_param(args):
            if len(args) != 2:
                raise HmpError("usage: migrate_set_parameter PARAMETER VALUE")
            ops.migrate_set_parameters({args[0]: args[1]})
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
            return format_xp(addr, ops.xp(addr, length))

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


class LineReader:
    """Monitor input cut into lines as they are asked for: `feed(data)` keeps the bytes,
    `next_line()` returns the next complete line, TOO_LONG once for a line over MAX_LINE
    (the rest of it, up to its newline, is dropped), or None when no line is complete."""

    def __init__(self, max_line=MAX_LINE):
        self.max_line = max_line
        self.inbox = bytearray()
        self.skipping = False

    def __len__(self):
        return len(self.inbox)

    def feed(self, data):
        self.inbox += data

    def next_line(self):
        while True:
            if self.skipping:
                i = self.inbox.find(b"\n")
                if i < 0:
                    self.inbox.clear()
                    return None
                del self.inbox[:i + 1]
                self.skipping = False
                continue
            i = self.inbox.find(b"\n", 0, self.max_line + 1)
            if i < 0:
                if len(self.inbox) > self.max_line:
                    self.skipping = True
                    return TOO_LONG
                return None
            line = bytes(self.inbox[:i]).decode("utf-8", "replace").rstrip("\r")
            del self.inbox[:i + 1]
            return line


class MonitorSession:
    """One monitor client on a chardev: line in, output + prompt out.

    Input is held as raw bytes and cut into lines only as commands are run, so a client
    that sends faster than commands finish holds at most INBOX_MAX bytes (its socket is
    not read meanwhile), never an unbounded queue of lines."""

    def __init__(self, hmp, chardev, client):
        self.hmp = hmp
        self.chardev = chardev
        self.client = client
        self.lines = LineReader()
        self.paused = False
        self.wake = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    def greet(self):
        self.chardev.write((BANNER + PROMPT).encode(), self.client)

    def feed(self, data):
        self.lines.feed(data)
        t = getattr(self.client, "transport", None)
        if t is not None and len(self.lines) > INBOX_MAX and not self.paused:
            self.paused = True
            t.pause_reading()
        self.wake.set()

    def _maybe_resume(self):
        if self.paused and len(self.lines) < INBOX_MAX // 2:
            self.paused = False
            t = getattr(self.client, "transport", None)
            if t is not None and not t.is_closing():
                t.resume_reading()

    async def _run(self):
        burst = 0
        while True:
            line = self.lines.next_line()
            self._maybe_resume()
            if line is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.client is not None:
                await self.client.drained()   # a client that does not read gets no more answers
            if line is TOO_LONG:
                out, _ = "Error: command line too long (limit %d bytes)" % MAX_LINE, False
            else:
                out, _ = await self.hmp.execute(line)
            text = (out + "\r\n" if out else "") + PROMPT
            self.chardev.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode(), self.client)
            burst += 1
            if burst % 64 == 0:
                await asyncio.sleep(0)    # many queued lines: let the loop breathe

    def close(self):
        self.task.cancel()


def attach_monitor(hmp, chardev):
    sessions = {}

    def on_connect(client):
        s = MonitorSession(hmp, chardev, client)
        sessions[id(client)] = s
        s.greet()

    def on_input(data, client):
        s = sessions.get(id(client))
        if s is None and client is None:          # stdio
            s = sessions.setdefault(0, MonitorSession(hmp, chardev, None))
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
