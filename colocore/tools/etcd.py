"""Start and stop an etcd server for tests, benchmarks and the demo (Debian's
etcd-server 3.4).

The server runs as a child process stopped again by its pid (`stop()`, also on failure),
dies with its parent (procs.spawn) and keeps its data in a directory the caller owns. With a network-namespace prefix (`Lab.exec_prefix(host)`) it serves that test host's
address only; without one, a free loopback port. Nothing outside is touched.

Raft timing is shortened (10 ms heartbeat, 100 ms election): etcd's smallest lease is
1.5 election timeouts rounded up to a second, so these settings allow ttl=1000 in tests;
a production etcd with its defaults grants at least 2 s.
"""
import os
import shutil
import signal
import subprocess
import time

import requests

from colocore.errors import ColocoreError
from colocore.tools.procs import free_port, spawn

INSTALL_HINT = "etcd is not installed: apt-get install etcd-server (as root; make test does it)"


def etcd_binary():
    path = shutil.which("etcd")
    if path is None:
        raise ColocoreError(INSTALL_HINT)
    return path


class EtcdServer:
    def __init__(self, data_dir, host="127.0.0.1", port=None, prefix=(), name="etcd"):
        self.data_dir = data_dir
        self.host = host
        self.port = port or (free_port() if not prefix else 2379)
        self.peer_port = free_port() if not prefix else 2380
        self.prefix = list(prefix)
        self.name = name
        self.proc = None
        self.log_path = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "%s.log" % name)

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self, timeout=20.0):
        """Start (or restart, keeping its data) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        os.makedirs(self.data_dir, exist_ok=True)
        client = "http://%s:%d" % (self.host, self.port)
        urls = client if self.host == "127.0.0.1" else "%s,http://127.0.0.1:%d" % (client, self.port)
        peer = "http://127.0.0.1:%d" % self.peer_port
        argv = [*self.prefix, etcd_binary(), "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", urls, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "%s=%s" % (self.name, peer),
                "--heartbeat-interval", "10", "--election-timeout", "100",
                "--log-level", "warn", "--logger", "zap"]
        log = open(self.log_path, "ab")
        self.proc = spawn(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ColocoreError("etcd exited with %s at start-up; log %s:\n%s"
                                    % (self.proc.returncode, self.log_path, self.log_tail()))
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise ColocoreError("etcd at %s not healthy after %.0f s; log %s"
                                    % (self.url, timeout, self.log_path))
            time.sleep(0.05)

    def _healthy(self):
        # /health answers from inside the server's namespace only when the prefix lets us
        # reach it; the caller is in the test's namespace, so ask the way clients will
        if self.prefix:
            r = subprocess.run([*self.prefix, "etcdctl", "--endpoints", self.url,
                                "--dial-timeout", "1s", "endpoint", "health"],
                               capture_output=True, timeout=10)
            return r.returncode == 0
        try:
            return requests.get(self.url + "/health", timeout=1).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def log_tail(self, n=20):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self):
        """etcd dies at once (a crash, for the "etcd down" tests); its data stays."""
        self._signal_and_wait(signal.SIGKILL)

    def stop(self, timeout=5.0):
        self._signal_and_wait(signal.SIGTERM, timeout)

    def _signal_and_wait(self, sig, timeout=5.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
