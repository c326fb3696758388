"""The kernel side of COLO's input mirror, set up with pyroute2 (no shell commands).

On the primary, every frame that reaches the guest's tap toward the guest is copied by
the kernel to the mirror link toward the secondary: a clsact qdisc on the tap, and on its
egress hook a u32 filter that matches every frame with a mirred action (mirror, egress)
to the link. No Python runs in that path. This kernel has u32 and mirred, but neither
matchall nor the plug qdisc; `u32 match u32 0 0` is the match-all.

    tc qdisc add dev TAP clsact
    tc filter add dev TAP egress prio 49152 protocol all u32 match u32 0 0 \
        action mirred egress mirror dev MIRROR

The copy must be byte for byte what the guest reads, or the secondary cannot match its
log against the guest's `rx_last_hash`. The clsact hook runs before the kernel segments
and checksums a frame for the tap (a tap without vnet headers offers no offloads): a TCP
burst forwarded by the bridge is still one 64 KiB GSO frame there, with a partial
checksum. So the mirror device is given no transmit offloads (TSO, GSO, checksum,
scatter-gather): the kernel then segments and checksums the mirrored copy exactly as it
does the tap's (measured here: identical frames; with offloads on, 8 KiB merged frames
and unfinished checksums). The link must carry nothing else (no addresses; IPv6 is
turned off on it, which also stops the host's own neighbour discovery from joining the
mirrored frames). On the secondary the receiving device gets no receive offloads (GRO
would merge the frames again, e.g. on a vxlan).

Everything changed is remembered and put back by `teardown()`.
"""
import errno
import logging
import os

from colocore.net.tap import NicError, off_loop

log = logging.getLogger("colocore.net")

TC_H_CLSACT = 0xFFFFFFF1
TC_H_EGRESS = 0xFFFFFFF3       # clsact's egress hook (frames the kernel sends to the device)
FILTER_PRIO = 0xC000           # colocore's filter on the tap, so ours can be told apart
ETH_P_ALL = 0x0003
TX_OFFLOADS = ("tx-scatter-gather", "tx-checksum-ip-generic", "tx-checksum-ipv4",
               "tx-checksum-ipv6", "tx-tcp-segmentation", "tx-tcp-ecn-segmentation",
               "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation",
               "tx-generic-segmentation", "tx-udp-segmentation", "tx-gso-list",
               "tx-tcp-accecn-segmentation")
RX_OFFLOADS = ("rx-gro", "generic-receive-offload", "large-receive-offload", "rx-gro-list",
               "rx-gro-hw", "rx-udp-gro-forwarding")


def _index(ipr, ifname, what):
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NicError("%s: no interface %s on this host; %s" % (what, ifname, {
            "mirror": "create the link toward the other COLO host (a veth or a vxlan, see "
                      "README 'A networked guest under COLO') or leave mirror= out",
            "tap": "the guest's tap is gone; restart the node with --nic"}.get(what.split()[0], "")))
    return found[0]


class LinkTuning:
    """Features and IPv6 of one interface, changed for the mirror and put back later."""

    def __init__(self, ifname):
        self.ifname = ifname
        self.features = {}           # name -> the value before we changed it
        self.ipv6 = None             # the disable_ipv6 value before, when we changed it

    def apply(self, names):
        from pyroute2.ethtool import Ethtool
        with Ethtool() as eth:
            feats = eth.get_features(self.ifname)
            for name in names:
                f = feats.features.get(name)
                if f is not None and f.enable and f.available:
                    self.features[name] = True
                    f.enable = False
            if self.features:
                eth.set_features(self.ifname, feats)
        path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % self.ifname
        try:
            with open(path) as f:
                before = f.read().strip()
            if before != "1":
                with open(path, "w") as f:
                    f.write("1")
                self.ipv6 = before
        except OSError:
            pass                     # no IPv6 on this host: nothing to stop

    def restore(self):
        if self.features:
            from pyroute2.ethtool import Ethtool
            try:
                with Ethtool() as eth:
                    feats = eth.get_features(self.ifname)
                    for name in self.features:
                        if name in feats.features:
                            feats.features[name].enable = True
                    eth.set_features(self.ifname, feats)
            except Exception as exc:  # noqa: BLE001 - the link may be gone; say so
                log.warning("mirror: could not restore the offloads of %s: %s", self.ifname, exc)
            self.features = {}
        if self.ipv6 is not None:
            try:
                with open("/proc/sys/net/ipv6/conf/%s/disable_ipv6" % self.ifname, "w") as f:
                    f.write(self.ipv6)
            except OSError:
                pass
            self.ipv6 = None


class TapMirror:
    """The primary's mirror: tap egress -> mirror link, in the kernel."""

    def __init__(self, tap, mirror):
        self.tap = tap
        self.mirror = mirror
        self.created_clsact = False
        self.installed = False
        self.tuning = LinkTuning(mirror)
        self._counter = None
        self._base = 0

    def install(self):
        off_loop(self._install)
        return self

    def _install(self):
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        with IPRoute() as ipr:
            tap = _index(ipr, self.tap, "tap %s" % self.tap)
            mirror = _index(ipr, self.mirror, "mirror")
            if ipr.get_links(mirror)[0].get_attr("IFLA_MASTER"):
                raise NicError("mirror=%s: the mirror link is a port of a bridge; it must be a "
                               "link of its own toward the secondary (no bridge, no address)"
                               % self.mirror)
            try:
                # tuned before it is up: an interface that comes up with IPv6 on sends
                # neighbour discovery of its own, which would join the mirrored frames
                self.tuning.apply(TX_OFFLOADS)
                ipr.link("set", index=mirror, state="up")
                kinds = {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=tap)
                         if q["parent"] == TC_H_CLSACT or q.get_attr("TCA_KIND") == "clsact"}
                if "clsact" not in kinds:
                    ipr.tc("add", "clsact", tap)
                    self.created_clsact = True
                self._drop_filter(ipr, tap)         # one left by a node that was killed
                ipr.tc("add-filter", "u32", tap, parent=TC_H_EGRESS, prio=FILTER_PRIO,
                       protocol=ETH_P_ALL, keys=["0x0/0x0+0"], target=1,
                       action=[{"kind": "mirred", "direction": "egress", "action": "mirror",
                                "ifindex": mirror}])
                self.installed = True
                self._open_counter()
            except NetlinkError as exc:
                self._teardown(ipr)
                raise NicError("mirror: cannot mirror tap %s to %s: %s%s" % (
                    self.tap, self.mirror, os.strerror(exc.code),
                    " (needs CAP_NET_ADMIN: run the node as root)"
                    if exc.code in (errno.EPERM, errno.EACCES) else "")) from None
        log.info("COLO: frames toward the guest on tap %s are mirrored to %s (tc clsact, "
                 "u32, mirred)", self.tap, self.mirror)

    @staticmethod
    def _drop_filter(ipr, tap):
        from pyroute2.netlink.exceptions import NetlinkError
        try:
            ipr.tc("del-filter", "u32", tap, parent=TC_H_EGRESS, prio=FILTER_PRIO,
                   protocol=ETH_P_ALL, keys=["0x0/0x0+0"], target=1)
        except NetlinkError:
            pass

    def _open_counter(self):
        """The mirror link's transmit counter, opened once: reading it is a pread of a few
        bytes, cheap enough for every checkpoint (a netlink dump of the tc action's own
        counter costs ~2 ms here). The link carries nothing but mirrored frames (no address,
        no IPv6), so what it sent is what was mirrored."""
        try:
            self._counter = os.open("/sys/class/net/%s/statistics/tx_packets" % self.mirror,
                                    os.O_RDONLY | os.O_CLOEXEC)
            self._base = self._read()
        except OSError:
            self._counter = None

    def _read(self):
        return int(os.pread(self._counter, 32, 0))

    def sent(self):
        """Frames mirrored since install() (None if the counter cannot be read)."""
        if self._counter is None:
            return None
        try:
            return self._read() - self._base
        except (OSError, ValueError):
            return None

    def teardown(self):
        """Remove what install() set up (also when it was half done)."""
        try:
            off_loop(self._teardown_fresh)
        except Exception as exc:  # noqa: BLE001 - the tap may be gone with its qdisc
            log.warning("mirror: teardown on tap %s: %s", self.tap, exc)

    def _teardown_fresh(self):
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            self._teardown(ipr)

    def _teardown(self, ipr):
        from pyroute2.netlink.exceptions import NetlinkError
        found = ipr.link_lookup(ifname=self.tap)
        if found:
            if self.created_clsact:
                try:
                    ipr.tc("del", "clsact", found[0])
                except NetlinkError:
                    pass
            else:
                self._drop_filter(ipr, found[0])
        if self.installed:
            log.info("COLO: mirror of tap %s to %s removed", self.tap, self.mirror)
        if self._counter is not None:
            os.close(self._counter)
            self._counter = None
        self.installed = self.created_clsact = False
        self.tuning.restore()


def tune_mirror_in(ifname):
    """The secondary's end of the mirror link: up, no receive offloads, no IPv6 of its
    own. Returns the LinkTuning to restore later."""
    tuning = LinkTuning(ifname)

    def work():
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            index = _index(ipr, ifname, "mirror")
            tuning.apply(RX_OFFLOADS)
            ipr.link("set", index=index, state="up")
    off_loop(work)
    return tuning
