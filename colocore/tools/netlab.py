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

Every namespace and link the lab creates is deleted on close, also after a failure.
Needs root (CAP_NET_ADMIN).
"""
import contextlib
import itertools
import os

from pyroute2 import IPRoute, NetNS, netns

from colocore.errors import ColocoreError


class Host:
    def __init__(self, ns, address):
        self.ns = ns
        self.address = address
        self.ifname = None


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
        the block live there (and keep working after it)."""
        netns.pushns(host.ns)
        try:
            yield
        finally:
            netns.popns()

    def set_link(self, host, up):
        """Bring a host's end of its link up or down (down = a network partition)."""
        with NetNS(host.ns) as n:
            n.link("set", index=n.link_lookup(ifname=host.ifname)[0], state="up" if up else "down")

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
