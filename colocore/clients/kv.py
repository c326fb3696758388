"""A client for the kvstore guest's line protocol over a node's console chardev.

Used by the demo, the tests and the benchmarks. Requests can be pipelined: `pipeline()`
sends many and reads the replies in order.
"""
import time

from colocore.clients import BufferedClient
from colocore.errors import ColocoreError


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
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.request("PING") == "PONG":
                    return
            except ColocoreError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise ColocoreError("kvstore at %s not ready" % self.address)
