"""Character devices in QEMU's spelling: where a device's bytes come from and go to.

    tcp:HOST:PORT,server=on,wait=off   unix:PATH,server=on,wait=off
    stdio   file:PATH   none   log

Socket chardevs are servers. A console has one client at a time, like QEMU's: a second
client waits (its connection is accepted, but it is neither read nor written) until the
first one leaves. Monitors (`shared=True`) serve every client at once.

All chardevs run on the node's asyncio loop (the control thread). `write()` must be called
on that loop; `Chardev.on_input(data)` is called on it.
"""
import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

from colocore.errors import ChardevError

log = logging.getLogger("colocore.chardev")

# Bytes queued towards a client that does not read; past this the client is dropped
# rather than letting the node's memory grow without bound.
MAX_CLIENT_BACKLOG = 8 << 20


@dataclass
class ChardevSpec:
    kind: str                 # tcp, unix, stdio, file, none, log
    host: str = ""
    port: int = 0
    path: str = ""
    server: bool = True
    wait: bool = False
    options: dict = field(default_factory=dict)

    def __str__(self):
        if self.kind == "tcp":
            return "tcp:%s:%d" % (self.host, self.port)
        if self.kind in ("unix", "file"):
            return "%s:%s" % (self.kind, self.path)
        return self.kind


def _onoff(name, value, spec):
    if value in ("on", "yes", "true", ""):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ChardevError("chardev %r: option %s=%s must be on or off" % (spec, name, value))


def parse_chardev(spec, what="chardev"):
    """Parse a QEMU-style chardev spec; raise ChardevError with a usable message."""
    if not isinstance(spec, str) or not spec:
        raise ChardevError("%s: empty chardev spec; use e.g. unix:/tmp/c.sock,server=on,wait=off" % what)
    head, *opts = spec.split(",")
    options = {}
    for o in opts:
        k, _, v = o.partition("=")
        if not k:
            raise ChardevError("%s %r: empty option" % (what, spec))
        options[k] = v
    server = _onoff("server", options.pop("server", "on"), spec)
    wait = _onoff("wait", options.pop("wait", "off"), spec)
    options.pop("nowait", None)
    if options:
        raise ChardevError("%s %r: unknown option(s) %s; colocore knows server= and wait="
                           % (what, spec, ", ".join(sorted(options))))
    if head in ("stdio", "none", "log"):
        return ChardevSpec(head)
    kind, sep, rest = head.partition(":")
    if not sep or not rest:
        raise ChardevError("%s %r: expected tcp:HOST:PORT, unix:PATH, file:PATH, stdio or none"
                           % (what, spec))
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ChardevError("%s %r: tcp needs HOST:PORT" % (what, spec))
        try:
            port_no = int(port)
        except ValueError:
            raise ChardevError("%s %r: port %r is not a number" % (what, spec, port)) from None
        if not 0 <= port_no <= 65535:
            raise ChardevError("%s %r: port %d out of range 0-65535" % (what, spec, port_no))
        return ChardevSpec("tcp", host=host or "0.0.0.0", port=port_no, server=server, wait=wait)
    if kind == "unix":
        return ChardevSpec("unix", path=rest, server=server, wait=wait)
    if kind == "file":
        return ChardevSpec("file", path=rest)
    raise ChardevError("%s %r: unknown backend %r; use tcp:, unix:, file:, stdio or none"
                       % (what, spec, kind))


class _Client(asyncio.Protocol):
    def __init__(self, chardev):
        self.chardev = chardev
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chardev._client_arrived(self)

    def data_received(self, data):
        self.chardev._client_data(self, data)

    def connection_lost(self, exc):
        self.chardev._client_left(self)

    def write(self, data):
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
            log.warning("%s: client does not read its output; disconnecting it", self.chardev.name)
            t.abort()
            return
        t.write(data)


class Chardev:
    """A chardev on the control loop. Subclass or set `on_input`, `on_connect`."""

    def __init__(self, spec, name, shared=False):
        self.spec = spec if isinstance(spec, ChardevSpec) else parse_chardev(spec, name)
        self.name = name
        self.shared = shared
        self.clients = []          # for non-shared chardevs, clients[0] is the active one
        self.server = None
        self._file = None
        self.on_input = lambda data, client: None
        self.on_connect = lambda client: None
        self.on_disconnect = lambda client: None

    @property
    def connected(self):
        return bool(self.clients) or self.spec.kind in ("stdio", "file", "log")

    async def open(self, loop):
        s = self.spec
        try:
            if s.kind == "tcp":
                if not s.server:
                    raise ChardevError("%s: only server=on sockets are supported" % self.name)
                self.server = await loop.create_server(lambda: _Client(self), s.host, s.port,
                                                       reuse_address=True)
            elif s.kind == "unix":
                if os.path.exists(s.path):
                    _remove_stale_socket(s.path, self.name)
                self.server = await loop.create_unix_server(lambda: _Client(self), s.path)
            elif s.kind == "file":
                self._file = open(s.path, "ab", buffering=0)
            elif s.kind == "stdio":
                await self._open_stdio(loop)
        except OSError as exc:
            raise ChardevError("%s %s: cannot open: %s%s" % (
                self.name, s, exc.strerror or exc,
                "; pick another port or stop what is listening there"
                if exc.errno == 98 else "")) from None

    async def _open_stdio(self, loop):
        if sys.stdin is None or sys.stdin.closed:
            return
        try:
            loop.add_reader(0, self._stdin_ready)
        except (OSError, ValueError, PermissionError):
            pass        # stdin is a regular file or /dev/null: output only

    def _stdin_ready(self):
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if not data:
            asyncio.get_event_loop().remove_reader(0)
            return
        self.on_input(data, None)

    def _client_arrived(self, client):
        self.clients.append(client)
        if not self.shared and len(self.clients) > 1:
            client.transport.pause_reading()      # waits for its turn
            return
        self.on_connect(client)

    def _client_data(self, client, data):
        if self.shared or (self.clients and self.clients[0] is client):
            self.on_input(data, client)

    def _client_left(self, client):
        was_active = bool(self.clients) and self.clients[0] is client
        if client in self.clients:
            self.clients.remove(client)
        self.on_disconnect(client)
        if not self.shared and was_active and self.clients:
            nxt = self.clients[0]
            nxt.transport.resume_reading()
            self.on_connect(nxt)

    def write(self, data, client=None):
        """Send bytes to one client, or to the active client(s); dropped if none (as QEMU)."""
        if not data:
            return
        k = self.spec.kind
        if k == "file":
            self._file.write(data)
        elif k == "stdio":
            try:
                os.write(1, data)
            except OSError:
                pass
        elif k == "log":
            # whole lines only: the guest writes COM1 a byte per exit
            self._file = (self._file or b"") + bytes(data)
            *lines, rest = self._file.split(b"\n")
            self._file = rest[-4096:]
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip("\r")
                if text.strip():
                    log.info("%s: %s", self.name, text)
        elif client is not None:
            client.write(data)
        elif self.shared:
            for c in self.clients:
                c.write(data)
        elif self.clients:
            self.clients[0].write(data)

    def disconnect_all(self):
        for c in list(self.clients):
            if c.transport is not None:
                c.transport.close()

    def close(self):
        if self.server is not None:
            self.server.close()
            self.server = None
        self.disconnect_all()
        if self.spec.kind == "unix":
            try:
                os.unlink(self.spec.path)
            except OSError:
                pass
        if self._file is not None and self.spec.kind == "file":
            self._file.close()
        self._file = None


def _remove_stale_socket(path, name):
    """A unix socket file left by a dead node is removed; a live one is an error."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    finally:
        probe.close()
    raise ChardevError("%s unix:%s: another process is serving this socket; stop it or "
                       "pick another path" % (name, path))
