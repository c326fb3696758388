"""Clients of a node: HMP (clients/hmp.py), QMP (clients/qmp.py), the kvstore line
protocol (clients/kv.py). Tools, tests and the TUI use them; the engine does not."""
import socket
import time

from colocore.control.chardev import parse_chardev
from colocore.errors import ChardevError, ColocoreError


def connect(address, timeout=5.0):
    """A blocking client socket to unix:PATH or tcp:HOST:PORT (used by tools and tests)."""
    spec = parse_chardev(address, "address")
    if spec.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = spec.path
    elif spec.kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (spec.host if spec.host != "0.0.0.0" else "127.0.0.1", spec.port)
    else:
        raise ChardevError("address %r: expected unix:PATH or tcp:HOST:PORT" % address)
    s.settimeout(timeout)
    try:
        s.connect(target)
    except OSError as exc:
        s.close()
        raise ChardevError("cannot connect to %s: %s; is the node running?" % (address, exc.strerror or exc)) from None
    return s


def connect_when_open(address, timeout, what):
    """A socket to `address` as soon as something serves it (a destination opens its
    console only when it starts serving); ColocoreError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(address, 1.0)
        except ChardevError:
            if time.monotonic() > deadline:
                raise ChardevError("%s did not open %s within %.0f s" % (what, address, timeout)) from None
            time.sleep(0.0005)


class BufferedClient:
    """A blocking client socket and its read buffer (the HMP and kvstore clients)."""

    def __init__(self, address, timeout, sock=None):
        self.address = address
        self.timeout = timeout
        self.sock = sock if sock is not None else connect(address, timeout)
        self.buf = bytearray()

    def _fill(self, deadline, what, timeout=None):
        """Read what is there into `buf`: ColocoreError when nothing came by `deadline`,
        ConnectionError when the peer closed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ColocoreError("%s did not answer within %.0f s" % (what, timeout or self.timeout))
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("%s closed the connection" % what)
        self.buf += data

    def close(self):
        self.sock.close()
