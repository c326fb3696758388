"""Test hosts in network namespaces (pyroute2): a small lab of hosts joined by veth
links, so that replication crosses a real network path that tests can cut.

    with Lab("cc") as lab:
        a = lab.host("a", "10.77.0.1")
        b = lab.host("b", "10.77.0.2")
        lab.link(a, b)
        ... run nodes with argv prefix lab.exec_prefix(a) ...
        lab.set_link(a, up=False)      # a partition

Guest networks (kvnet behind a tap): bridges in a host, hosts wired to a bridge, and
`enter(host)` to open sockets (redis-py, raw ICMP, AF_PACKET) inside a test host:

    with Lab("cc") as lab:
        h = lab.host("h", "10.0.0.9")
        c = lab.host("c", "10.0.0.1")
        lab.bridge(h, "br0")
        lab.wire(c, h, b_bridge="br0")  # c's end addressed 10.0.0.1/24, h's end on br0
        ... colocore run --nic tap,ifname=t0,br=br0 under lab.exec_prefix(h) ...
        with lab.enter(c):
            sock = socket.create_connection(("10.0.0.2", 6379))

Three or more hosts that must be cut apart pair by pair (primary, secondary, etcd) are
joined by `mesh()`: one veth pair per pair of hosts, each host's address on its loopback
and a host route to every peer over their own link, so `cut(a, b)` parts exactly those
two and `isolate(a)` cuts a host from everyone:

    p, s, e = lab.host("p", "10.77.0.1"), lab.host("s", "10.77.0.2"), lab.host("e", "10.77.0.3")
    lab.mesh(p, s, e)
    lab.cut(p, s)                  # p and s no longer reach each other; both reach e
    lab.heal(p, s)

Every namespace and link the lab creates is deleted on close, also after a failure.
Needs root (CAP_NET_ADMIN).
"""
import contextlib
import ctypes
import itertools
import os
import secrets
import time

from pyroute2 import IPRoute, NetNS, netns

from colocore.errors import ColocoreError


CLONE_NEWNET = 0x40000000


def _lookup(ipr, ifname, timeout=2.0):
    """The index of `ifname`; a link just created or moved can take a moment to show."""
    deadline = time.monotonic() + timeout
    while True:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise ColocoreError("network link %s did not appear" % ifname)
        time.sleep(0.01)


def _setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


class Host:
    def __init__(self, ns, address):
        self.ns = ns
        self.address = address
        self.ifname = None
        self.mesh_links = {}        # peer Host -> our end of the veth pair to it


class Lab:
    def __init__(self, prefix="colocore"):
        self.prefix = "%s-%d" % (prefix, os.getpid())
        self.hosts = []
        self._links = itertools.count()

    def host(self, name, address):
        ns = "%s-%s" % (self.prefix, name)
        try:
            netns.create(ns)
        except OSError as exc:
            raise ColocoreError("cannot create network namespace %s: %s (needs root)" % (ns, exc)) from None
        h = Host(ns, address)
        self.hosts.append(h)
        with NetNS(ns) as n:
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        return h

    def link(self, a, b, prefixlen=24):
        """A veth pair between two hosts, addressed and up."""
        a.ifname = "v%d%s" % (os.getpid() % 100000, "a")
        b.ifname = "v%d%s" % (os.getpid() % 100000, "b")
        with IPRoute() as ipr:
            ipr.link("add", ifname=a.ifname, kind="veth",
                     peer={"ifname": b.ifname, "net_ns_fd": b.ns})
            ipr.link("set", index=ipr.link_lookup(ifname=a.ifname)[0], net_ns_fd=a.ns)
        for h in (a, b):
            with NetNS(h.ns) as n:
                i = n.link_lookup(ifname=h.ifname)[0]
                n.addr("add", index=i, address=h.address, prefixlen=prefixlen)
                n.link("set", index=i, state="up")

    def plain_link(self, a, b):
        """A veth pair between two hosts with no address at either end (a COLO mirror link:
        colocore brings it up and tunes it). Returns (a's ifname, b's ifname)."""
        k = next(self._links)
        names = ("m%d%sa" % (os.getpid() % 100000, k), "m%d%sb" % (os.getpid() % 100000, k))
        with IPRoute() as ipr:
            ipr.link("add", ifname=names[0], kind="veth",
                     peer={"ifname": names[1], "net_ns_fd": b.ns})
            ipr.link("set", index=_lookup(ipr, names[0]), net_ns_fd=a.ns)
        return names

    def bridge(self, host, name, address=None, prefixlen=24, mtu=None):
        """A bridge in `host`, up (no STP, no forwarding delay), optionally addressed."""
        with NetNS(host.ns) as n:
            n.link("add", ifname=name, kind="bridge", br_forward_delay=0, br_stp_state=0)
            i = n.link_lookup(ifname=name)[0]
            if mtu:
                n.link("set", index=i, mtu=mtu)
            if address:
                n.addr("add", index=i, address=address, prefixlen=prefixlen)
            n.link("set", index=i, state="up")
        return name

    def wire(self, a, b, a_bridge=None, b_bridge=None, prefixlen=24, mtu=None):
        """A veth pair between hosts a and b. Each end joins the named bridge of its host,
        or else carries the host's address. Returns (a's ifname, b's ifname)."""
        k = next(self._links)
        names = ("w%d%sa" % (os.getpid() % 100000, k), "w%d%sb" % (os.getpid() % 100000, k))
        with IPRoute() as ipr:
            ipr.link("add", ifname=names[0], kind="veth",
                     peer={"ifname": names[1], "net_ns_fd": b.ns})
            ipr.link("set", index=ipr.link_lookup(ifname=names[0])[0], net_ns_fd=a.ns)
        for h, name, br in ((a, names[0], a_bridge), (b, names[1], b_bridge)):
            with NetNS(h.ns) as n:
                i = n.link_lookup(ifname=name)[0]
                if mtu:
                    n.link("set", index=i, mtu=mtu)
                if br:
                    n.link("set", index=i, master=n.link_lookup(ifname=br)[0])
                else:
                    n.addr("add", index=i, address=h.address, prefixlen=prefixlen)
                    h.ifname = name
                n.link("set", index=i, state="up")
        return names

    @staticmethod
    def set_mtu(host, ifname, mtu):
        with NetNS(host.ns) as n:
            n.link("set", index=n.link_lookup(ifname=ifname)[0], mtu=mtu)

    @staticmethod
    def links(host):
        """Interface names in a host."""
        with NetNS(host.ns) as n:
            return [link.get_attr("IFLA_IFNAME") for link in n.get_links()]

    @staticmethod
    def delete_link(host, ifname):
        with NetNS(host.ns) as n:
            n.link("del", index=n.link_lookup(ifname=ifname)[0])

    @staticmethod
    @contextlib.contextmanager
    def enter(host):
        """Run the calling thread inside the host's network namespace: sockets opened in
        the block live there (and keep working after it). setns acts on the calling
        thread only, and each thread keeps its own way back, so client threads on
        different hosts can enter at the same time."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open("/run/netns/%s" % host.ns, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield host
            finally:
                _setns(own)
        finally:
            os.close(own)

    def set_link(self, host, up, ifname=None):
        """Bring a host's end of its link (or of `ifname`) up or down (down = a network
        partition)."""
        with NetNS(host.ns) as n:
            n.link("set", index=n.link_lookup(ifname=ifname or host.ifname)[0],
                   state="up" if up else "down")

    def mesh(self, *hosts):
        """A veth pair between every two of `hosts`. Each host's address lives on its
        loopback (/32) and reaches each peer by a host route over their own link, so a
        link down parts exactly two hosts and nothing reroutes around it."""
        tag = secrets.token_hex(2)       # another lab (another process) may be building too
        for a in hosts:
            with NetNS(a.ns) as n:
                n.addr("add", index=n.link_lookup(ifname="lo")[0], address=a.address, prefixlen=32)
        for i, a in enumerate(hosts):
            for j in range(i + 1, len(hosts)):
                b = hosts[j]
                # both ends are created here, then each moves to its host by index
                ends = {a: "m%s%d%d" % (tag, i, j), b: "m%s%d%d" % (tag, j, i)}
                with IPRoute() as ipr:
                    ipr.link("add", ifname=ends[a], kind="veth", peer=ends[b])
                    for me in (a, b):
                        ipr.link("set", index=_lookup(ipr, ends[me]), net_ns_fd=me.ns)
                for me, peer in ((a, b), (b, a)):
                    me.mesh_links[peer] = ends[me]
                    with NetNS(me.ns) as n:
                        idx = _lookup(n, ends[me])
                        n.link("set", index=idx, state="up")
                        # on-link host route: the peer answers ARP for its loopback address
                        n.route("add", dst="%s/32" % peer.address, oif=idx, prefsrc=me.address,
                                scope=253)

    def _mesh_state(self, a, b, up):
        if b not in a.mesh_links:
            raise ColocoreError("hosts %s and %s are not joined by mesh()" % (a.ns, b.ns))
        for me, peer in ((a, b), (b, a)):
            with NetNS(me.ns) as n:
                idx = _lookup(n, me.mesh_links[peer])
                n.link("set", index=idx, state="up" if up else "down")
                if up:
                    # a link brought down loses its routes: put the host route back
                    try:
                        n.route("add", dst="%s/32" % peer.address, oif=idx,
                                prefsrc=me.address, scope=253)
                    except Exception as exc:  # noqa: BLE001 - only "exists" is expected
                        if "exists" not in str(exc).lower():
                            raise

    def cut(self, a, b):
        """A partition between two mesh hosts: both ends of their link go down."""
        self._mesh_state(a, b, up=False)

    def heal(self, a, b):
        self._mesh_state(a, b, up=True)

    def isolate(self, host):
        """Cut `host` from every mesh peer (its machine is unplugged)."""
        for peer in list(host.mesh_links):
            self.cut(host, peer)

    def rejoin(self, host):
        for peer in list(host.mesh_links):
            self.heal(host, peer)

    @staticmethod
    def exec_prefix(host):
        return ["ip", "netns", "exec", host.ns]

    def close(self):
        for h in self.hosts:
            try:
                netns.remove(h.ns)      # the veth pair goes with its namespaces
            except OSError:
                pass
        self.hosts = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
