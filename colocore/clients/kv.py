"""A client for the kvstore guest's line protocol over a node's console chardev.

Used by the demo, the tests and the benchmarks. Requests can be pipelined: `pipeline()`
sends many and reads the replies in order.
"""
import time

from colocore.clients import BufferedClient


class KvClient(BufferedClient):
    def __init__(self, address, timeout=10.0, sock=None):
        super().__init__(address, timeout, sock)

    def _readline(self, deadline):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i]).rstrip(b"\r").decode("utf-8", "replace")
                del self.buf[:i + 1]
                return line
            self._fill(deadline, "kvstore at %s" % self.address)

    def request(self, line):
        self.sock.sendall(line.encode() + b"\n")
        return self._readline(time.monotonic() + self.timeout)

    def pipeline(self, lines, window=64):
        """Send `lines` keeping up to `window` in flight; return the replies in order."""
        replies = []
        sent = 0
        while len(replies) < len(lines):
            if sent < len(lines) and sent - len(replies) < window:
                chunk = lines[sent:min(len(lines), len(replies) + window)]
                self.sock.sendall(("\n".join(chunk) + "\n").encode())
                sent += len(chunk)
            replies.append(self._readline(time.monotonic() + self.timeout))
        return replies

    def wait_ready(self, timeout=10.0):
        """Block until the guest answers a PING, and skip whatever came before its PONG.

        One PING only, answered whenever the guest gets to it (a booting guest reads it
        late): sending more would leave PONGs in flight to be taken for later replies.
        Lines before the PONG are output that was held for an earlier client: a secondary
        that takes over releases its primary's held output to whoever is connected."""
        deadline = time.monotonic() + timeout
        self.sock.sendall(b"PING\n")
        while self._readline(deadline) != "PONG":
            pass
