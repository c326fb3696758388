"""--demo: a local protected pair (kvstore primary + secondary, x-colo on) and a light load.

Everything started here is stopped again by `close()` (processes by pid, via NodeSet),
also when starting fails half-way. No Textual here: the app runs `start()` in a thread
worker and calls `close()` when it quits.
"""
import os
import threading
import time

from colocore.errors import ColocoreError
from colocore.kvclient import KvClient
from colocore.procs import NodeSet, start_protected_pair

LOAD_BATCH = 16            # SETs per round trip
LOAD_PERIOD_S = 0.05       # between rounds: a light, steady load


class ClientLoad(threading.Thread):
    """Writes keys to whichever console answers (the primary, after failover the secondary)."""

    def __init__(self, consoles):
        super().__init__(name="demo-load", daemon=True)
        self.consoles = list(consoles)
        self.stop_flag = threading.Event()
        self.acked = 0
        self.error = None

    def run(self):
        i = 0
        kv = None
        while not self.stop_flag.is_set():
            try:
                if kv is None:
                    kv = self._connect()
                    if kv is None:
                        self.stop_flag.wait(0.5)
                        continue
                replies = kv.pipeline(["SET demo%07d %d" % (i + k, i + k) for k in range(LOAD_BATCH)])
                self.acked += sum(1 for r in replies if r == "OK")
                i += LOAD_BATCH
            except (OSError, ColocoreError) as exc:
                self.error = str(exc)
                if kv is not None:
                    kv.close()
                kv = None
            self.stop_flag.wait(LOAD_PERIOD_S)
        if kv is not None:
            kv.close()

    def _connect(self):
        for address in self.consoles:
            try:
                kv = KvClient(address, timeout=5.0)
            except (OSError, ColocoreError):
                continue
            try:
                kv.wait_ready(timeout=2.0)
                return kv
            except (OSError, ColocoreError):
                kv.close()
        return None

    def stop(self):
        self.stop_flag.set()
        if self.is_alive():
            self.join(10)


class DemoPair:
    def __init__(self, delay_ms=200):
        self.delay_ms = delay_ms
        self.nodes = NodeSet()
        self.workdir = self.nodes.workdir
        self.qmp_paths = {role: os.path.join(self.workdir, "%s-qmp.sock" % role)
                          for role in ("primary", "secondary")}
        self.load = None
        self.closed = False
        self._lock = threading.Lock()

    @property
    def addresses(self):
        return {role: "unix:" + path for role, path in self.qmp_paths.items()}

    def pids(self):
        return {name: node.pid for name, node in self.nodes.nodes.items()}

    def start(self):
        """Blocking: start both nodes, protect the guest, start the load. Returns pids."""
        def qmp(role):
            return ("--qmp", "unix:%s,server=on,wait=off" % self.qmp_paths[role])
        with self._lock:
            if self.closed:
                raise ColocoreError("the demo was stopped before it started")
            t0 = time.monotonic()
            pri, sec = start_protected_pair(self.nodes, delay_ms=self.delay_ms,
                                            primary_extra=qmp("primary"),
                                            secondary_extra=qmp("secondary"))
            self.load = ClientLoad([pri.console, sec.console])
            self.load.start()
            return time.monotonic() - t0

    def close(self):
        """Stop the load and every node started here (by pid). Safe to call twice."""
        self.closed = True
        if self.load is not None:
            self.load.stop()
        with self._lock:
            self.nodes.close()
