"""A COLO pair of test hosts in network namespaces and a redis-py client on one TCP
connection: what the networked COLO tests and `colocore bench failover --net` share.

    client c (10.0.0.1) --- brs [host s, 10.0.0.12] ==LAN== brp [host p, 10.0.0.11]
                              taps (secondary)                tapp (primary)

p and s are also joined by a replication link (10.77.0.1 - 10.77.0.2: the COLO channel)
and by a mirror link with no addresses, as two real hosts would be (colocore's
`--nic ...,mirror=LINK`). Needs root; redis-py for the writer.
"""
import contextlib
import time

from colocore.errors import ColocoreError
from colocore.tools.netlab import Lab

GUEST_IP = "10.0.0.2"
CLIENT_IP = "10.0.0.1"
GUEST_MAC = "52:54:00:0c:0c:02"
PORT = 6379


def redis_py():
    try:
        import redis
    except ImportError:
        raise ColocoreError("redis-py is not installed: pip install redis (make test "
                            "installs it)") from None
    return redis


class ColoHosts:
    """Hosts p and s, each able to run either role (they swap at every failover).
    relay=True: the mirror link goes through a host r in between (p - r - s), where a
    test can relay it with faults (MirrorRelay)."""

    def __init__(self, lab, relay=False):
        self.lab = lab
        self.p = lab.host("p", "10.77.0.1")
        self.s = lab.host("s", "10.77.0.2")
        self.c = lab.host("c", CLIENT_IP)
        lab.bridge(self.p, "brp", "10.0.0.11")
        lab.bridge(self.s, "brs", "10.0.0.12")
        lab.wire(self.p, self.s, a_bridge="brp", b_bridge="brs")      # the LAN
        lab.wire(self.c, self.s, b_bridge="brs")
        lab.link(self.p, self.s)                                      # replication
        if relay:
            self.r = lab.host("r", "10.99.0.1")
            mp, self.r_in = lab.plain_link(self.p, self.r)
            self.r_out, ms = lab.plain_link(self.r, self.s)
        else:
            mp, ms = lab.plain_link(self.p, self.s)                   # the mirror
        self.info = {"p": dict(host=self.p, tap="tapp", bridge="brp", mirror=mp),
                     "s": dict(host=self.s, tap="taps", bridge="brs", mirror=ms)}

    @staticmethod
    def other(where):
        return "s" if where == "p" else "p"

    def nic(self, where, mirror=True):
        i = self.info[where]
        return "tap,ifname=%s,mac=%s,br=%s%s" % (i["tap"], GUEST_MAC, i["bridge"],
                                                 ",mirror=%s" % i["mirror"] if mirror else "")

    def start_primary(self, nodes, where="p", name="primary", extra=(), env=None, mirror=True):
        return nodes.start(name, ["--kernel", "kvnet", "-m", "128M", "--nic", self.nic(where, mirror),
                                  "--append", "ip=%s/24 port=%d" % (GUEST_IP, PORT), *extra],
                           prefix=self.lab.exec_prefix(self.info[where]["host"]), env=env)

    def start_secondary(self, nodes, where="s", name="secondary", extra=(), env=None,
                        mirror=True, port=5555):
        host = self.info[where]["host"]
        uri = "tcp:%s:%d" % (host.address, port)
        node = nodes.start(name, ["-m", "128M", "--incoming", uri, "--nic", self.nic(where, mirror),
                                  *extra], prefix=self.lab.exec_prefix(host), env=env)
        return node, uri


@contextlib.contextmanager
def colo_hosts(prefix="ccc", relay=False):
    with Lab(prefix) as lab:
        yield ColoHosts(lab, relay)


class PipelineWriter:
    """redis-py on ONE TCP connection opened in the client host, pipelining SETs in
    batches (send a batch, read its replies), in a thread. It remembers every SET whose
    reply it read (keys k0, k1, ... in order) and when each batch's replies came. A reset,
    an EOF, a timeout, an error reply or a new socket stops it with `error` set: nothing
    here reconnects, so a reconnect can never hide."""

    def __init__(self, lab, host, batch=16, prefix="k", timeout=30.0, interval=0.01):
        import threading
        redis = redis_py()
        self.redis = redis
        self.conn = redis.Connection(host=GUEST_IP, port=PORT, socket_timeout=timeout,
                                     socket_connect_timeout=10, health_check_interval=0,
                                     retry_on_error=[])
        with lab.enter(host):
            self.conn.connect()
        self.sock = self.conn._sock
        self.local = self.sock.getsockname()
        self.batch = batch
        self.prefix = prefix
        self.interval = interval        # at least this long between batches: the guest's table
                                        # must not fill up during a long test
        self.acked = 0                  # keys prefix0 .. prefix{acked-1} are acknowledged
        self.reply_times = []           # (time.monotonic(), acked after the batch)
        self.error = None
        self.lock = threading.Lock()
        self._run = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="writer")

    def key(self, i):
        return "%s%d" % (self.prefix, i)

    @staticmethod
    def value(i):
        return "v%d" % i

    def start(self):
        self._run.set()
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop:
            if not self._run.is_set():
                self._idle.set()
                self._run.wait(0.1)
                continue
            self._idle.clear()
            t0 = time.monotonic()
            try:
                self._one_batch()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                self.error = "%s: %s" % (type(exc).__name__, exc)
                self._idle.set()
                return
            left = self.interval - (time.monotonic() - t0)
            if left > 0:
                time.sleep(left)

    def _one_batch(self):
        first = self.acked
        cmds = [("SET", self.key(i), self.value(i)) for i in range(first, first + self.batch)]
        if self.conn._sock is not self.sock:
            # checked before sending too: redis-py would connect again from this thread's
            # namespace (the root one), not the client host's
            raise AssertionError("redis-py lost its connection")
        self.conn.send_packed_command(self.conn.pack_commands(cmds), check_health=False)
        for i in range(self.batch):
            r = self.conn.read_response()
            if r not in (b"OK", "OK", True):
                raise AssertionError("SET %s answered %r" % (self.key(first + i), r))
        if self.conn._sock is not self.sock:
            raise AssertionError("redis-py opened a new connection")
        with self.lock:
            self.acked = first + self.batch
            self.reply_times.append((time.monotonic(), self.acked))

    def pause(self, timeout=30.0):
        """Stop between batches (the connection stays open); returns acked."""
        self._run.clear()
        if not self._idle.wait(timeout) and self.error is None:
            raise AssertionError("the writer did not stop within %.0f s (acked %d)"
                                 % (timeout, self.acked))
        return self.acked

    def resume(self):
        self._idle.clear()
        self._run.set()

    def first_reply_after(self, t0, timeout=20.0):
        """Seconds from t0 to the first batch answered after it (waits for one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, _ in self.reply_times:
                    if t >= t0:
                        return t - t0
            if self.error:
                raise AssertionError("the client's connection failed: %s" % self.error)
            time.sleep(0.002)
        raise AssertionError("no reply on the connection within %.0f s of the failover "
                             "(acked %d)" % (timeout, self.acked))

    def command(self, *args):
        """One command on the same connection (the writer paused)."""
        self.conn.send_command(*args, check_health=False)
        return self.conn.read_response()

    def missing(self, upto=None, chunk=60):
        """Acknowledged keys that do not hold their value (writer paused)."""
        upto = self.acked if upto is None else upto
        bad = []
        for lo in range(0, upto, chunk):
            keys = [self.key(i) for i in range(lo, min(upto, lo + chunk))]
            got = self.command("MGET", *keys)
            for i, v in zip(range(lo, lo + len(keys)), got):
                if v is None or v.decode() != self.value(i):
                    bad.append(self.key(i))
        return bad

    def same_connection(self):
        return self.conn._sock is self.sock and self.sock.getsockname() == self.local

    def close(self):
        self._stop = True
        self._run.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.conn.disconnect()
