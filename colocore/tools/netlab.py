"""Test hosts in network namespaces (pyroute2): a small lab of hosts joined by veth
links, so that replication crosses a real network path that tests can cut.

    with Lab("cc") as lab:
        a = lab.host("a", "10.77.0.1")
        b = lab.host("b", "10.77.0.2")
        lab.link(a, b)
        ... run nodes with argv prefix lab.exec_prefix(a) ...
        lab.set_link(a, up=False)      # a partition

Every namespace and link the lab creates is deleted on close, also after a failure.
Needs root (CAP_NET_ADMIN).
"""
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
