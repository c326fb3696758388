"""The one client load of the tools: a thread that writes keys to a kvstore guest's console
and remembers which writes were acknowledged (the demo, the failover benchmark and the
console's --demo all use it)."""
import socket
import threading
import time

from colocore.clients.kv import KvClient
from colocore.errors import ColocoreError


class KeyWriter(threading.Thread):
    """Pipelined `SET <prefix><n> v<n>` in batches of `batch`.

    consoles: addresses tried in order; with `reconnect`, a broken connection is replaced
        by the first console that answers (after a failover, the secondary's), otherwise
        the writer stops at the first error (the primary was killed).
    remember: keep every acknowledged key and value in `acked` (to read them back);
        `count` and `last` (the last acknowledged (key, value)) are always kept.
    period: seconds between batches (a light, steady load), 0 for as fast as it goes.
    """

    def __init__(self, consoles, batch=16, prefix="key", period=0.0, reconnect=False,
                 remember=True, timeout=10.0):
        super().__init__(name="key-writer", daemon=True)
        self.consoles = list(consoles)
        self.batch = batch
        self.prefix = prefix
        self.period = period
        self.reconnect = reconnect
        self.timeout = timeout
        self.acked = {} if remember else None
        self.count = 0
        self.last = None
        self.error = None
        self.stop_flag = threading.Event()
        self._trying = None
        self._kv = None if reconnect else KvClient(self.consoles[0], timeout=timeout)

    def run(self):
        n = 0
        while not self.stop_flag.is_set():
            try:
                if self._kv is None:
                    self._kv = self._connect()
                    if self._kv is None:
                        self.stop_flag.wait(0.5)
                        continue
                batch = [("%s%07d" % (self.prefix, n + k), "v%d" % (n + k))
                         for k in range(self.batch)]
                replies = self._kv.pipeline(["SET %s %s" % kv for kv in batch], window=self.batch)
                for kv, reply in zip(batch, replies):
                    if reply != "OK":
                        raise ColocoreError("SET %s answered %r" % (kv[0], reply))
                    self.count += 1
                    self.last = kv
                    if self.acked is not None:
                        self.acked[kv[0]] = kv[1]
                n += self.batch
            except (OSError, ColocoreError) as exc:
                self.error = exc
                if self._kv is not None:
                    self._kv.close()
                    self._kv = None
                if not self.reconnect:
                    return
            if self.period:
                self.stop_flag.wait(self.period)

    def _connect(self):
        for address in self.consoles:
            if self.stop_flag.is_set():
                return None
            try:
                kv = KvClient(address, timeout=5.0)
            except (OSError, ColocoreError):
                continue
            self._trying = kv          # stop() can interrupt its wait
            try:
                kv.wait_ready(timeout=2.0)
                return kv
            except (OSError, ColocoreError):
                kv.close()
            finally:
                self._trying = None
        return None

    def wait_acked(self, n, timeout=30.0):
        """Block until `n` writes were acknowledged (ColocoreError if the writer died)."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            if not self.is_alive():
                raise ColocoreError("the writer stopped after %d writes: %s" % (self.count, self.error))
            if time.monotonic() > deadline:
                raise ColocoreError("only %d of %d writes acknowledged in %.0f s"
                                    % (self.count, n, timeout))
            time.sleep(0.01)

    def stop(self):
        """Stop at once: a request blocked on a console that no longer answers (a primary
        whose guest was stopped by a takeover answers nothing until the 10 s timeout; `q`
        in the console took seconds because of it) is woken by shutting its socket."""
        self.stop_flag.set()
        for kv in (self._kv, self._trying):
            if kv is not None:
                try:
                    kv.sock.shutdown(socket.SHUT_RDWR)     # wakes a blocked recv; close does not
                except OSError:
                    pass
        if self.is_alive():
            self.join(10)
        if self._kv is not None and not self.reconnect:
            self._kv.close()
