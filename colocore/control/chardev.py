"""Character devices in QEMU's spelling: where a device's bytes come from and go to.

    tcp:HOST:PORT,server=on,wait=off[,tls-creds=ID[,tls-authz=ID]]
    unix:PATH,server=on,wait=off[,mode=0600]
    stdio   file:PATH   none   log

`tcp::PORT` listens on loopback (colocore/paths.py has the one address rule); a unix
socket is created with mode 0600 (or `mode=`) whatever the umask, and only a stale socket
at its path is ever removed; `file:` never follows a symlink. With `tls-creds` (a
tls-creds-x509 object with endpoint=server) every client must complete a TLS handshake,
by default with a certificate our CA signed, and pass `tls-authz` if given, before it
gets a single byte (a greeting, a prompt, guest output); a refused client is logged.

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

from colocore import paths, tls
from colocore.errors import ChardevError, ColocoreError

log = logging.getLogger("colocore.chardev")

# Bytes queued towards a client that does not read; past this the client is dropped
# rather than letting the node's memory grow without bound.
MAX_CLIENT_BACKLOG = 8 << 20
# Past this many queued bytes a client's monitor session stops running its commands until
# the client reads (asyncio's pause_writing); its unread commands then fill the session's
# inbox, which stops reading the socket. A client that never reads ends up ignored, not
# dropped; MAX_CLIENT_BACKLOG is only reached by a single answer or by events.
CLIENT_HIGH_WATER = 1 << 20
# Clients of one chardev at once (served or waiting); more are closed at once, logged.
MAX_CLIENTS = 64


@dataclass
class ChardevSpec:
    kind: str                 # tcp, unix, stdio, file, none, log
    host: str = ""
    port: int = 0
    path: str = ""
    server: bool = True
    wait: bool = False
    options: dict = field(default_factory=dict)
    tls_creds: str = ""       # id of a tls-creds-x509 object (tcp only, as QEMU)
    tls_authz: str = ""       # id of an authz-simple object
    mode: int = paths.SOCKET_MODE     # unix sockets

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
    tls_creds = options.pop("tls-creds", "")
    tls_authz = options.pop("tls-authz", "")
    mode = options.pop("mode", None)
    if options:
        raise ChardevError("%s %r: unknown option(s) %s; colocore knows server=, wait=, "
                           "tls-creds=, tls-authz= and mode=" % (what, spec, ", ".join(sorted(options))))
    kind = head.partition(":")[0]
    if (tls_creds or tls_authz) and kind != "tcp":
        raise ChardevError("%s %r: TLS is only supported on tcp: sockets (as in QEMU)" % (what, spec))
    if tls_authz and not tls_creds:
        raise ChardevError("%s %r: tls-authz needs tls-creds" % (what, spec))
    if mode is not None:
        if kind != "unix":
            raise ChardevError("%s %r: mode= is for unix: sockets" % (what, spec))
        try:
            mode = int(mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ChardevError("%s %r: mode must be octal permissions like 0600 or 0660"
                               % (what, spec))
    if head in ("stdio", "none", "log"):
        return ChardevSpec(head)
    kind, sep, rest = head.partition(":")
    if not sep or not rest:
        raise ChardevError("%s %r: expected tcp:HOST:PORT, unix:PATH, file:PATH, stdio or none"
                           % (what, spec))
    if kind == "tcp":
        try:
            host, port_no = paths.parse_host_port(rest, "%s %r" % (what, spec))
        except ColocoreError as exc:
            raise ChardevError("%s; use tcp:HOST:PORT" % exc) from None
        return ChardevSpec("tcp", host=host, port=port_no, server=server, wait=wait,
                           tls_creds=tls_creds, tls_authz=tls_authz)
    if kind == "unix":
        return ChardevSpec("unix", path=rest, server=server, wait=wait,
                           mode=paths.SOCKET_MODE if mode is None else mode)
    if kind == "file":
        return ChardevSpec("file", path=rest)
    raise ChardevError("%s %r: unknown backend %r; use tcp:, unix:, file:, stdio or none"
                       % (what, spec, kind))


class _Client(asyncio.Protocol):
    def __init__(self, chardev):
        self.chardev = chardev
        self.transport = None
        self.security = tls.PLAIN
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=CLIENT_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chardev._client_arrived(self)

    def data_received(self, data):
        self.chardev._client_data(self, data)

    def connection_lost(self, exc):
        self.writable.set()           # a session waiting to write wakes up and ends
        self.chardev._client_left(self)

    # asyncio's flow control: the transport's buffer passed its high-water mark / drained
    def pause_writing(self):
        self.writable.clear()

    def resume_writing(self):
        self.writable.set()

    async def drained(self):
        """Wait until this client has read enough of what it was sent."""
        await self.writable.wait()

    def write(self, data):
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
            log.warning("%s: client does not read its output; disconnecting it", self.chardev.name)
            t.abort()
            return
        t.write(data)


class _TlsGate(asyncio.Protocol):
    """A tcp client of a TLS chardev before its handshake: nothing reaches the chardev
    (no greeting, no prompt, no output) until the handshake and the authz check passed."""

    def __init__(self, chardev, creds, authz):
        self.chardev = chardev
        self.creds = creds
        self.authz = authz

    def connection_made(self, transport):
        transport.pause_reading()
        peer = transport.get_extra_info("peername")
        peer = "%s:%d" % tuple(peer[:2]) if peer else "?"
        self.chardev._handshakes.add(asyncio.ensure_future(self._handshake(transport, peer)))

    async def _handshake(self, transport, peer):
        cd = self.chardev
        what = "%s chardev" % cd.name
        client = _Client(cd)
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(transport, client, self.creds.context,
                                                 server_side=True,
                                                 ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT)
        except (OSError, ValueError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("%s: refused %s: %s", what, peer, tls.refusal_reason(exc))
            transport.abort()
            return
        finally:
            cd._handshakes.discard(asyncio.current_task())
        sec = tls.security_of(tls_transport.get_extra_info("ssl_object"))
        if self.authz is not None and not self.authz.allows(sec):
            log.warning("%s: refused %s: certificate %s (sha256 %s) is not allowed by authz %s",
                        what, peer, sec.peer or "?", sec.fingerprint, self.authz.id)
            tls_transport.abort()
            return
        log.info("%s: %s connected with TLS as %s", what, peer, sec.peer or "an unverified client")
        client.security = sec
        client.connection_made(tls_transport)

    def data_received(self, data):
        pass            # start_tls has taken the transport over

    def connection_lost(self, exc):
        pass


class Chardev:
    """A chardev on the control loop. Subclass or set `on_input`, `on_connect`."""

    def __init__(self, spec, name, shared=False, objects=None):
        self.spec = spec if isinstance(spec, ChardevSpec) else parse_chardev(spec, name)
        self.name = name
        self.shared = shared
        self.objects = objects if objects is not None else tls.Objects()
        self._handshakes = set()
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
        what = "--%s" % self.name
        try:
            if s.kind == "tcp":
                if not s.server:
                    raise ChardevError("%s: only server=on sockets are supported" % self.name)
                factory = lambda: _Client(self)  # noqa: E731
                if s.tls_creds:
                    creds = self.objects.creds(s.tls_creds, "server", "%s %s" % (what, s))
                    authz = self.objects.authz(s.tls_authz, "%s %s" % (what, s)) \
                        if s.tls_authz else None
                    if authz is not None and not creds.verify_peer:
                        raise ChardevError("%s %s: tls-authz needs client certificates: create "
                                           "%s with verify-peer=on" % (what, s, s.tls_creds))
                    factory = lambda: _TlsGate(self, creds, authz)  # noqa: E731
                self.server = await loop.create_server(factory, s.host, s.port,
                                                       reuse_address=True)
                paths.warn_if_exposed(log, what, s.host, s.port, bool(s.tls_creds))
            elif s.kind == "unix":
                sock = paths.bind_unix(s.path, what, s.mode)
                self.server = await loop.create_unix_server(lambda: _Client(self), sock=sock)
            elif s.kind == "file":
                self._file = paths.open_append_nofollow(s.path, what)
            elif s.kind == "stdio":
                await self._open_stdio(loop)
        except ColocoreError as exc:
            raise ChardevError(str(exc)) from None
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
        if len(self.clients) >= MAX_CLIENTS:
            # each client costs a descriptor and buffers: a flood of them is refused
            log.warning("%s: %d clients already; refusing one more", self.name, MAX_CLIENTS)
            client.transport.abort()
            return
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
        for task in list(self._handshakes):
            task.cancel()
        if self.spec.kind == "unix":
            paths.remove_own_socket(self.spec.path)
        if self._file is not None and self.spec.kind == "file":
            self._file.close()
        self._file = None
