"""The migration channel: one TCP connection, the main stream one way and the return
path the other (as QEMU's return path). TCP_NODELAY is set on both ends: small protocol
messages must not wait for the peer's delayed ACK (QEMU 7.2 does not set it; measured on
this project's host, its checkpoint pauses cluster at ~45 and ~87 ms because of that).

COLO messages are big-endian u32 indexes (QEMU's COLOMessage); colocore adds a few
return-path messages above 0x100 that QEMU does not have.
"""
import enum
import socket
import struct
import threading
import time

from colocore.errors import ColocoreError, StreamError
from colocore.paths import parse_host_port
from colocore.tls import PLAIN, TlsRefused
from colocore.vmstate import format as stream

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class Msg(enum.IntEnum):
    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6
    # colocore's own
    HEARTBEAT = 0x100        # either way: "I am alive" while nothing else is said
    SHUT = 0x101             # return path: the secondary refuses, u32 length + reason
    LOADED = 0x102           # return path: initial state loaded (plain migration)
    QUIT = 0x103             # main stream: the primary leaves COLO on purpose
    TAKEOVER = 0x104         # return path: the secondary takes over (failover there)


class PeerLost(ColocoreError):
    """The peer closed the channel, or said nothing for longer than allowed.

    `closed` tells the two apart: True when the peer's end closed or reset the connection
    (its process is gone, or it hung up on purpose), False for silence (a dead host or a
    partition look alike: nobody can tell them apart from here)."""

    def __init__(self, message, closed=True):
        super().__init__(message)
        self.closed = closed


class PeerTookOver(PeerLost):
    """The secondary announced that it took over (x_colo_lost_heartbeat on it)."""


def parse_tcp_uri(uri, what="migrate"):
    """tcp:HOST:PORT -> (host, port); the address rule is paths.parse_host_port's (an
    empty host is loopback, for listeners and connections alike)."""
    kind, sep, rest = uri.partition(":")
    if kind != "tcp" or not sep:
        raise ColocoreError("%s: unsupported URI %r; use tcp:HOST:PORT or file:PATH" % (what, uri))
    try:
        host, port_no = parse_host_port(rest, what)
    except ColocoreError:
        port_no = -1
    if not 0 < port_no < 65536:
        raise ColocoreError("%s: bad address %r; use tcp:HOST:PORT" % (what, uri))
    return host, port_no


def _tune(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt, val in ((socket.SO_SNDBUF, 8 << 20), (socket.SO_RCVBUF, 8 << 20)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, val)
        except OSError:
            pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Channel:
    def __init__(self, sock, peer, security=PLAIN, secure_first=None):
        self.sock = sock
        self.peer = peer
        self.security = security            # tls.Security: who is at the other end
        # an accepted connection's TLS handshake, run by the first read or send: on the
        # connection's own thread, so a silent client never holds the accept loop
        self._secure_first = secure_first
        self.send_lock = threading.Lock()   # the return path may be written by two threads
        self.bytes_sent = 0
        self.closed = False
        self.deadline = None
        self._timeout = sock.gettimeout()
        self.last_heard = time.monotonic()
        self.reader = stream.Reader(self._read_exact, "migration stream from %s" % peer)

    @classmethod
    def connect(cls, uri, timeout=5.0, secure=None):
        """secure(sock, host) -> (sock, Security): the TLS hook (tls.client_wrap)."""
        host, port = parse_tcp_uri(uri)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ColocoreError("cannot reach %s: %s; is the secondary running with "
                                "--incoming %s?" % (uri, exc.strerror or exc, uri)) from None
        _tune(sock)
        security = PLAIN
        if secure is not None:
            sock, security = secure(sock, host)
        sock.settimeout(None)
        return cls(sock, uri, security)

    # ---- sending -----------------------------------------------------------------

    def _handshake(self):
        """TLS on an accepted connection, before its first byte is read or written. A
        refused peer (logged by tls.server_wrap) ends here as a PeerLost."""
        secure, self._secure_first = self._secure_first, None
        try:
            self.sock, self.security = secure(self.sock, self.peer)
        except TlsRefused as exc:
            self.closed = True
            raise PeerLost("refused %s" % exc) from None
        self._timeout = self.sock.gettimeout()

    def send(self, *buffers):
        if self._secure_first is not None:
            self._handshake()
        if self.closed:
            raise PeerLost("the channel to %s is closed" % self.peer, closed=False)
        with self.send_lock:
            try:
                for b in buffers:
                    if self.deadline is not None:
                        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.001))
                    self.sock.sendall(b)
                    self.bytes_sent += len(b)
            except TimeoutError:
                raise PeerLost("%s did not take what was sent in time" % self.peer,
                               closed=False) from None
            except OSError as exc:
                last = self._last_words()
                if last == Msg.TAKEOVER:
                    raise PeerTookOver("the secondary at %s took over" % self.peer) from None
                if last:
                    raise ColocoreError("the secondary refused: %s" % last) from None
                raise PeerLost("lost the connection to %s while sending: %s"
                               % (self.peer, exc.strerror or exc)) from None

    def _last_words(self):
        """After a failed send: did the peer leave a SHUT (its reason is returned) or a
        TAKEOVER (Msg.TAKEOVER) on the return path before it went?"""
        data = b""
        try:
            self.sock.settimeout(0.5)
            while len(data) < 8 + 4096:
                chunk = self.sock.recv(8 + 4096 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        while len(data) >= 4:
            (value,) = U32.unpack_from(data)
            if value == Msg.TAKEOVER:
                return Msg.TAKEOVER
            if value == Msg.SHUT and len(data) >= 8:
                (n,) = U32.unpack_from(data, 4)
                return data[8:8 + n].decode("utf-8", "replace")
            if value != Msg.HEARTBEAT:
                return None
            data = data[4:]
        return None

    def send_msg(self, msg, extra=b""):
        self.send(U32.pack(int(msg)) + extra)

    # ---- receiving -----------------------------------------------------------------

    def set_deadline(self, when):
        """Every read and send must be done by time.monotonic() `when`; None goes back to
        the per-call timeout of set_timeout(). A peer that trickles bytes, or stops
        reading, cannot hold this side past a deadline."""
        self.deadline = when
        if when is None:
            self.sock.settimeout(self._timeout)

    def _read_exact(self, n, timeout=None):
        if self._secure_first is not None:
            self._handshake()
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise PeerLost("%s did not send what it owed in time" % self.peer,
                                   closed=False)
                self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                if self.deadline is not None:
                    continue
                raise PeerLost("%s said nothing for %.1f s" % (self.peer, self.sock.gettimeout()),
                               closed=False) from None
            except OSError as exc:
                raise PeerLost("lost the connection to %s: %s" % (self.peer, exc.strerror or exc)) from None
            if k == 0:
                raise EOFError
            got += k
            # an arbiter's secondary waits a silence out from the very last byte it got
            self.last_heard = time.monotonic()
        return bytes(buf)

    def read_exact(self, n):
        try:
            return self._read_exact(n)
        except EOFError:
            raise PeerLost("%s closed the connection" % self.peer) from None

    def set_timeout(self, seconds):
        self._timeout = seconds if seconds and seconds > 0 else None
        if self.deadline is None:
            self.sock.settimeout(self._timeout)

    def recv_msg(self, skip_heartbeats=True):
        """The next message (Msg, and the SHUT reason when there is one)."""
        while True:
            (value,) = U32.unpack(self.read_exact(4))
            try:
                msg = Msg(value)
            except ValueError:
                raise StreamError("unknown COLO message %d from %s" % (value, self.peer)) from None
            if msg == Msg.HEARTBEAT and skip_heartbeats:
                continue
            if msg == Msg.TAKEOVER:
                raise PeerTookOver("the secondary at %s took over (x_colo_lost_heartbeat "
                                   "was run there)" % self.peer)
            if msg == Msg.SHUT:
                (n,) = U32.unpack(self.read_exact(4))
                if n > 4096:
                    raise StreamError("oversized SHUT reason from %s" % self.peer)
                reason = self.read_exact(n).decode("utf-8", "replace")
                raise ColocoreError("the secondary refused: %s" % reason)
            return msg

    def expect(self, want):
        msg = self.recv_msg()
        if msg != want:
            raise StreamError("COLO protocol: expected %s from %s, got %s"
                              % (want.name.lower().replace("_", "-"), self.peer,
                                 msg.name.lower().replace("_", "-")))
        return msg

    def read_u64(self):
        return U64.unpack(self.read_exact(8))[0]

    def shut(self, reason):
        """Tell the peer why we refuse, and make sure it can read it: half-close, then
        drain what it still sends (closing with unread data would reset the connection
        and could discard the reason before the peer reads it)."""
        try:
            data = reason.encode()[:4096]
            self.send(U32.pack(Msg.SHUT) + U32.pack(len(data)) + data)
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(2.0)
            while self.sock.recv(1 << 16):
                pass
        except (ColocoreError, OSError):
            pass

    def announce_takeover(self):
        """Secondary failover: tell the primary (if it can still hear) that this side
        takes over, then stop both directions. The socket is closed only seconds later:
        closing now, with checkpoint bytes unread, would reset the connection and could
        discard TAKEOVER before the primary reads it."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(0.2)
            self.sock.sendall(U32.pack(Msg.TAKEOVER))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # FIN; wakes our own reader with EOF
        except OSError:
            pass
        timer = threading.Timer(5.0, self.sock.close)
        timer.daemon = True
        timer.start()

    def close(self):
        """Close both directions; a thread blocked in recv on it wakes with an error."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Listener:
    """--incoming tcp:HOST:PORT: listens at start-up; migration/incoming.py decides which
    of the connections it accepts becomes the one migration."""

    def __init__(self, uri, secure=None):
        host, port = parse_tcp_uri(uri, "--incoming")
        self.uri = uri
        # secure(sock, peer) -> (sock, Security), or TlsRefused: the TLS hook
        # (tls.server_wrap); a refused peer has been logged and closed, and gets nothing
        self.secure = secure
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise ColocoreError("--incoming %s: cannot listen: %s%s" % (
                uri, exc.strerror or exc,
                "; pick another port or stop what is listening there" if exc.errno == 98 else "")) from None
        self.sock.listen(16)

    def accept(self):
        sock, addr = self.sock.accept()
        _tune(sock)
        return Channel(sock, "%s:%d" % addr[:2], secure_first=self.secure)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
