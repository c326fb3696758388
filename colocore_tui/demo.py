"""--demo: a local protected pair (kvstore primary + secondary, x-colo on) and a light load.

Everything started here is stopped again by `close()` (processes by pid, via NodeSet),
also when starting fails half-way. No Textual here: the app runs `start()` in a thread
worker and calls `close()` when it quits.
"""
import threading
import time

from colocore.errors import ColocoreError
from colocore.tools.load import KeyWriter
from colocore.tools.procs import NodeSet, qmp_path, start_protected_pair

LOAD_BATCH = 16            # SETs per round trip
LOAD_PERIOD_S = 0.05       # between rounds: a light, steady load


class DemoPair:
    def __init__(self, delay_ms=200):
        self.delay_ms = delay_ms
        self.nodes = NodeSet()
        self.workdir = self.nodes.workdir
        self.addresses = {role: "unix:" + qmp_path(self.workdir, role)
                          for role in ("primary", "secondary")}
        self.load = None
        self.closed = False
        self._lock = threading.Lock()

    def pids(self):
        return {name: node.pid for name, node in self.nodes.nodes.items()}

    def start(self):
        """Blocking: start both nodes, protect the guest, start the load. Returns seconds."""
        with self._lock:
            if self.closed:
                raise ColocoreError("the demo was stopped before it started")
            t0 = time.monotonic()
            pri, sec = start_protected_pair(self.nodes, delay_ms=self.delay_ms)
            # writes go to whichever console answers: after a failover, the secondary's
            self.load = KeyWriter([pri.console, sec.console], batch=LOAD_BATCH, prefix="demo",
                                  period=LOAD_PERIOD_S, reconnect=True, remember=False)
            self.load.start()
            return time.monotonic() - t0

    def close(self):
        """Stop the load and every node started here (by pid). Safe to call twice."""
        self.closed = True
        if self.load is not None:
            self.load.stop()
        with self._lock:
            self.nodes.close()
