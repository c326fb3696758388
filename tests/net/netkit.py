"""Helpers for the networked-guest tests: a client host and a guest host joined by a
bridge (colocore.tools.netlab.Lab), a small RESP client on a plain socket (so a reset can never
be hidden by a client library's reconnect), frame builders for bad input, ICMP echo."""
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from colocore.tools.netlab import Lab

GUEST_IP = "10.0.0.2"
CLIENT_IP = "10.0.0.1"
HOST_IP = "10.0.0.9"
GUEST_MAC = "52:54:00:0c:0c:02"
PORT = 6379
REQUIRE = os.environ.get("COLOCORE_REQUIRE_KVM") == "1"


def need_tools(*names):
    """The Redis tools come from Debian (make test installs them): fail in CI, skip locally."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = "%s not installed (apt-get install redis-tools redis-server; make test does it)" \
            % ", ".join(missing)
        if REQUIRE:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def need_redis_py():
    try:
        import redis
    except ImportError:
        msg = "redis-py is not installed (make test installs it: pip install redis)"
        if REQUIRE:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return redis


@contextlib.contextmanager
def guest_lab(prefix="ccn", mtu=None):
    """Client host c (10.0.0.1) wired to bridge br0 in guest host h (10.0.0.9 on br0)."""
    with Lab(prefix) as lab:
        h = lab.host("h", HOST_IP)
        c = lab.host("c", CLIENT_IP)
        lab.bridge(h, "br0", HOST_IP, mtu=mtu)
        lab.wire(c, h, b_bridge="br0", mtu=mtu)
        yield lab, h, c


def start_kvnet(nodes, lab, host, name="kvnet", tap="tapk", ip=GUEST_IP, mac=GUEST_MAC,
                extra=(), bridge="br0"):
    nic = "tap,ifname=%s,mac=%s" % (tap, mac) + (",br=%s" % bridge if bridge else "")
    return nodes.start(name, ["--kernel", "kvnet", "-m", "128M", "--nic", nic,
                              "--append", "ip=%s/24 port=%d" % (ip, PORT), *extra],
                       prefix=lab.exec_prefix(host))


class Resp:
    """A RESP2 client on one TCP connection opened inside a test host."""

    def __init__(self, lab, host, ip=GUEST_IP, port=PORT, timeout=10.0):
        with lab.enter(host):
            self.sock = socket.create_connection((ip, port), timeout=timeout)
        self.buf = bytearray()
        self.local_port = self.sock.getsockname()[1]

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            self._fill()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the guest closed the connection")
        self.buf += data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[:n + 2]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise AssertionError("not RESP: %r" % line)

    def cmd(self, *args):
        self.sock.sendall(self.encode(*args))
        return self.reply()

    def send_raw(self, data):
        self.sock.sendall(data)

    def closed_by_peer(self, timeout=5.0):
        """True when the guest ends the connection (FIN) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


class RespError(str):
    pass


def wait_resp(lab, host, ip=GUEST_IP, timeout=30.0, node=None):
    """Wait until the guest answers PING on a fresh connection; returns that client."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if node is not None and node.proc.poll() is not None:
            raise AssertionError("node died:\n" + node.log_tail())
        try:
            r = Resp(lab, host, ip, timeout=2.0)
            if r.cmd("PING") == "PONG":
                r.sock.settimeout(10.0)
                return r
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError("the guest at %s never answered PING: %s%s" % (
        ip, last, ("\n" + node.log_tail()) if node is not None else ""))


def run_in(lab, host, argv, timeout=120, check=True):
    """Run a client tool (redis-cli, redis-benchmark) inside a test host."""
    p = subprocess.run(lab.exec_prefix(host) + list(argv), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("%s failed (%d): %s %s" % (argv[0], p.returncode, p.stdout, p.stderr))
    return p.stdout


# ---- frames -------------------------------------------------------------------------

def mac_bytes(mac):
    return bytes(int(x, 16) for x in mac.split(":"))


def ip_bytes(ip):
    return socket.inet_aton(ip)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, proto, payload, ident=1, bad_csum=False, total=None, ihl=5):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total if total is not None else 20 + len(payload),
                      ident, 0x4000, 64, proto, 0, ip_bytes(src), ip_bytes(dst))
    c = checksum(hdr)
    if bad_csum:
        c ^= 0x5A5A
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def tcp(src, dst, sport, dport, seq, ack, flags, payload=b"", window=65535, bad_csum=False,
        options=b""):
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0) + options
    pseudo = ip_bytes(src) + ip_bytes(dst) + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
    c = checksum(pseudo + hdr + payload)
    if bad_csum:
        c ^= 0x1234
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def ether(dst_mac, src_mac, ethertype, payload):
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


class PacketSocket:
    """An AF_PACKET socket on an interface of a test host: send raw frames, capture."""

    def __init__(self, lab, host, ifname):
        with lab.enter(host):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind((ifname, 0))
        self.mac = ":".join("%02x" % b for b in self.sock.getsockname()[4][:6])

    def send(self, frame):
        self.sock.send(frame)

    def capture(self, seconds, match, timed=False):
        """Frames for which match(frame) is true, received within `seconds`
        (timed: (time.monotonic() at receipt, frame) pairs)."""
        got = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            self.sock.settimeout(left)
            try:
                f = self.sock.recv(65536)
            except socket.timeout:
                return got
            if match(f):
                got.append((time.monotonic(), f) if timed else f)

    def close(self):
        self.sock.close()


def icmp_ping(lab, host, dst, count=3, size=56, timeout=2.0):
    """ICMP echo from a raw socket in `host`; returns the round-trip times (s) answered."""
    times = []
    with lab.enter(host):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(timeout)
    ident = os.getpid() & 0xFFFF
    try:
        for seq in range(count):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(i & 0xFF for i in range(size))
            pkt = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
            t0 = time.perf_counter()
            s.sendto(pkt, (dst, 0))
            while True:
                try:
                    data, addr = s.recvfrom(65536)
                except socket.timeout:
                    break
                icmp = data[(data[0] & 0xF) * 4:]
                if addr[0] == dst and icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    assert icmp[8:] == body[8:], "echo reply data differs"
                    assert checksum(icmp) == 0, "echo reply checksum is wrong"
                    times.append(time.perf_counter() - t0)
                    break
    finally:
        s.close()
    return times


# ---- a COLO pair of hosts (issue 13) ----------------------------------------------------
#
#   client c (10.0.0.1) --- brs [host s, 10.0.0.12] ==LAN== brp [host p, 10.0.0.11]
#                             taps (secondary)                tapp (primary)
#   p and s are also joined by a replication link (10.77.0.1 - 10.77.0.2: the COLO
#   channel) and by a mirror link with no addresses (mp - ms), as two real hosts would be.

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


class MirrorRelay:
    """A faulty mirror link: in host r, frames from p's end are passed on to s's end by an
    AF_PACKET relay in a thread. fault: "drop" loses every second frame; "reorder" sends
    every frame only after the next one (each pair swapped)."""

    def __init__(self, ch, fault):
        import threading
        from pyroute2 import NetNS
        self.fault = fault
        with NetNS(ch.r.ns) as n:
            for ifname in (ch.r_in, ch.r_out):
                n.link("set", index=n.link_lookup(ifname=ifname)[0], state="down")
        with ch.lab.enter(ch.r):
            for ifname in (ch.r_in, ch.r_out):    # r says nothing of its own on the link
                with open("/proc/sys/net/ipv6/conf/%s/disable_ipv6" % ifname, "w") as f:
                    f.write("1")
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.rx.bind((ch.r_in, 0))
            index = socket.if_nametoindex(ch.r_in)
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.tx.bind((ch.r_out, 0))
        self.rx.setsockopt(263, 1, struct.pack("iHH8s", index, 1, 0, b""))
        with NetNS(ch.r.ns) as n:
            for ifname in (ch.r_in, ch.r_out):
                n.link("set", index=n.link_lookup(ifname=ifname)[0], state="up")
        self.rx.settimeout(0.1)
        self.passed = self.dropped = 0
        self.errors = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="relay")
        self._thread.start()

    def _run(self):
        held = None
        n = 0
        while not self._stop:
            try:
                data, addr = self.rx.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stop:
                    return
                self.errors.append(exc)
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            n += 1
            if self.fault == "drop" and n % 2 == 0:
                self.dropped += 1
                continue
            if self.fault == "reorder":
                if held is None:
                    held = data
                    continue
                self._send(data)                  # the later frame first
                data, held = held, None
            self._send(data)

    def _send(self, frame):
        try:
            self.tx.send(frame)
            self.passed += 1
        except OSError as exc:
            self.errors.append(exc)

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.rx.close()
        self.tx.close()


class PipelineWriter:
    """redis-py on ONE TCP connection opened in the client host, pipelining SETs in
    batches (send a batch, read its replies), in a thread. It remembers every SET whose
    reply it read (keys k0, k1, ... in order) and when each batch's replies came. A reset,
    an EOF, a timeout, an error reply or a new socket stops it with `error` set: nothing
    here reconnects, so a reconnect can never hide."""

    def __init__(self, lab, host, batch=16, prefix="k", timeout=30.0, interval=0.01):
        import threading
        redis = need_redis_py()
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


class Capture:
    """An AF_PACKET capture on an interface of a test host (promiscuous: a bridge passes
    every frame it forwards up to it), in a thread, with the kernel's receive timestamp
    (CLOCK_REALTIME) of each frame: keeps (time, frame) for which match(frame) holds."""

    SO_TIMESTAMPNS = 35

    def __init__(self, lab, host, ifname, match):
        import threading
        with lab.enter(host):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)        # SO_RCVBUFFORCE
            self.sock.bind((ifname, 0))
            index = socket.if_nametoindex(ifname)
        self.sock.setsockopt(263, 1, struct.pack("iHH8s", index, 1, 0, b""))  # promisc
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.1)
        self.match = match
        self.frames = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="capture")
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, anc, _, addr = self.sock.recvmsg(65536, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or not self.match(data):
                continue
            stamp = time.time()
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == self.SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    stamp = sec + nsec / 1e9
            self.frames.append((stamp, data))

    def stop(self):
        if not self._stop:
            self._stop = True
            self._thread.join(5)
            self.sock.close()
        return self.frames


def link_stats(lab, host, ifname):
    """The kernel's counters of an interface in a test host (IFLA_STATS64)."""
    from pyroute2 import NetNS
    with NetNS(host.ns) as n:
        link = n.get_links(n.link_lookup(ifname=ifname)[0])[0]
        return dict(link.get_attr("IFLA_STATS64"))


def link_master(lab, host, ifname):
    from pyroute2 import NetNS
    with NetNS(host.ns) as n:
        found = n.link_lookup(ifname=ifname)
        if not found:
            return "gone"
        master = n.get_links(found[0])[0].get_attr("IFLA_MASTER")
        if not master:
            return None
        return n.get_links(master)[0].get_attr("IFLA_IFNAME")


def tc_kinds(lab, host, ifname):
    """The qdisc kinds on an interface of a test host ([] when it is gone)."""
    from pyroute2 import NetNS
    with NetNS(host.ns) as n:
        found = n.link_lookup(ifname=ifname)
        if not found:
            return []
        return sorted(q.get_attr("TCA_KIND") for q in n.get_qdiscs(index=found[0]))
