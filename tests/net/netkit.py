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

from colocore.tools import colo_lab
from colocore.tools.colo_lab import ColoHosts, PipelineWriter  # noqa: F401 - tests use them

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


def redis_in(lab, host, ip, port, **kw):
    """A redis-py client that opens every connection inside `host`'s namespace, and never
    retries. redis-py connects lazily, and a pipeline, a pool's second connection or a
    retry connects from whatever namespace the calling thread is in at that moment (the
    root one, where the guest's address may belong to some other machine): each
    connection enters the namespace itself."""
    redis = need_redis_py()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    class Connection(redis.Connection):
        def _connect(self):
            with lab.enter(host):
                return super()._connect()

    pool = redis.ConnectionPool(connection_class=Connection, host=ip, port=port,
                                retry=Retry(NoBackoff(), 0), retry_on_error=[], **kw)
    r = redis.Redis(connection_pool=pool)
    r.ping()
    return r


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


# ---- COLO pairs (issue 13): colocore.tools.colo_lab has the hosts and the writer ----

@contextlib.contextmanager
def colo_hosts(prefix="ccc", relay=False):
    need_redis_py()              # the COLO tests drive the guest with redis-py
    with colo_lab.colo_hosts(prefix, relay) as ch:
        yield ch


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
