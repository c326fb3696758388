"""The tap backend of `--nic tap,ifname=NAME[,mac=MAC][,br=BRIDGE][,mirror=LINK]`
(QEMU's -nic spelling).

Set-up, all in the engine through pyroute2 (no shell commands):
1. open /dev/net/tun;
2. if no interface NAME exists, create the tap with pyroute2 (remembered as ours);
3. attach our fd to it (TUNSETIFF, IFF_TAP | IFF_NO_PI, non-blocking);
4. a tap we created is made non-persistent at once, so the kernel deletes it when our fd
   closes, also when the node is killed (SIGKILL leaves no tap behind);
5. attach it to BRIDGE when br= is given, and bring it up.
At exit a tap we created goes away with our fd; a tap we found stays, detached from
nothing and left as it was (we only bring it up and enslave it when asked).

A node that waits for an incoming migration (`--incoming tcp:`) does not join BRIDGE at
start: its guest is not the live one yet, and as a COLO secondary its copy must never
answer a client. It joins when it starts serving (`join_bridge()`: the migration ended,
or a COLO takeover). `mirror=LINK` names the COLO mirror link (net/colo_net.py).

Every failure is one line that says what to do (`NicError`).
"""
import errno
import fcntl
import logging
import os
import struct
import threading

from colocore.errors import ColocoreError

log = logging.getLogger("colocore.net")

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


class NicError(ColocoreError):
    pass


class NicSpec:
    """A parsed --nic value."""

    def __init__(self, ifname, mac=None, bridge=None, mirror=None):
        self.ifname = ifname
        self.mac = mac
        self.bridge = bridge
        self.mirror = mirror

    def __repr__(self):
        return "NicSpec(%r, mac=%r, br=%r, mirror=%r)" % (self.ifname, self.mac, self.bridge,
                                                           self.mirror)


def parse_nic(text):
    """`tap,ifname=NAME[,mac=52:54:00:XX:XX:XX][,br=BRIDGE][,mirror=LINK]` -> NicSpec
    (NicError if bad)."""
    from colocore.vm.devices.virtio_net import parse_mac
    parts = [p for p in str(text).split(",") if p]
    if not parts or parts[0] != "tap":
        raise NicError("--nic %r: only the tap backend exists: use --nic tap,ifname=NAME"
                       "[,mac=52:54:00:XX:XX:XX][,br=BRIDGE][,mirror=LINK]" % text)
    opts = {}
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep or key not in ("ifname", "mac", "br", "mirror"):
            raise NicError("--nic %r: unknown option %r; the options are ifname=, mac=, br=, "
                           "mirror=" % (text, p))
        opts[key] = value
    name = opts.get("ifname")
    if not name:
        raise NicError("--nic %r: give the tap's name: --nic tap,ifname=NAME" % text)
    if opts.get("mirror") is not None and opts.get("mirror") in (name, opts.get("br")):
        raise NicError("--nic mirror=%s: the mirror link must be a link of its own toward "
                       "the other COLO host, not the tap or the service bridge" % opts["mirror"])
    for what, value in (("ifname", name), ("br", opts.get("br")), ("mirror", opts.get("mirror"))):
        if value is None:
            continue
        if len(value.encode()) >= IFNAMSIZ:
            raise NicError("--nic %s=%s: interface names are at most %d characters (Linux "
                           "IFNAMSIZ); pick a shorter name" % (what, value, IFNAMSIZ - 1))
        if not value or "/" in value or value in (".", "..") or any(c.isspace() for c in value):
            raise NicError("--nic %s=%r is not a valid interface name" % (what, value))
    mac = opts.get("mac")
    if mac is not None:
        try:
            parse_mac(mac)
        except ValueError as exc:
            raise NicError("--nic mac=: %s" % exc) from None
    return NicSpec(name, mac, opts.get("br"), opts.get("mirror"))


def off_loop(fn):
    """Run fn in a thread of its own: pyroute2's synchronous IPRoute drives an asyncio loop
    internally and refuses to run inside the node's running control loop."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc
    t = threading.Thread(target=run, name="pyroute2")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


class TapBackend:
    def __init__(self, spec):
        self.spec = spec
        self.ifname = spec.ifname
        self.fd = -1
        self.created = False
        self.joined = False
        self.txqlen = None

    def open(self, join_bridge=True, txqlen=None):
        """Set the tap up (see the module doc); returns self, or raises NicError.
        join_bridge=False: leave the tap off br= until join_bridge() (a destination).
        txqlen: a queue toward the guest this long, on a tap this node creates."""
        self.joined = False
        self.txqlen = txqlen
        off_loop(lambda: self._open(join_bridge))
        return self

    def _open(self, join_bridge):
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        spec = self.spec
        path = os.environ.get("COLOCORE_TUN_DEVICE", TUN_DEVICE)   # tests of the message
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NicError("--nic: %s does not exist: load the tun module (modprobe tun) or "
                           "create the device node (mknod %s c 10 200)" % (path, path)) from None
        except PermissionError:
            raise NicError("--nic: cannot open %s: permission denied; run the node as root "
                           "or give your user access to it" % path) from None
        except OSError as exc:
            raise NicError("--nic: cannot open %s: %s" % (path, exc.strerror)) from None
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=spec.ifname)
                if not found:
                    try:
                        ipr.link("add", ifname=spec.ifname, kind="tuntap", mode="tap",
                                 ifr={"no_pi": True})
                    except (NetlinkError, OSError) as exc:
                        raise self._denied(exc, "create tap %s" % spec.ifname) from None
                    self.created = True
                self._attach()
                index = ipr.link_lookup(ifname=spec.ifname)[0]
                if self.created and self.txqlen:
                    ipr.link("set", index=index, txqlen=self.txqlen)
                if spec.bridge and join_bridge:
                    self._enslave(ipr, index, spec.bridge)
                    self.joined = True
                elif spec.bridge:
                    self._leave(ipr, index)
                link = ipr.get_links(index)[0]
                self.txqlen = link.get_attr("IFLA_TXQLEN") or self.txqlen
                if not link["flags"] & 1:          # IFF_UP
                    try:
                        ipr.link("set", index=index, state="up")
                    except NetlinkError as exc:
                        raise self._denied(exc, "bring tap %s up" % spec.ifname) from None
        except BaseException:
            self.close()
            raise
        log.info("--nic: tap %s %s%s, up", spec.ifname,
                 "created" if self.created else "found",
                 (", on bridge %s" % spec.bridge) if self.joined else
                 (", off bridge %s until it serves" % spec.bridge) if spec.bridge else "")

    def join_bridge(self, ipr=None):
        """Attach the tap to br= now (a destination starts serving). Raises NicError
        (the bridge or the tap is gone, ...); a second call does nothing. `ipr`: an open
        IPRoute to use, on a thread without a running event loop (a takeover: opening
        one costs ~7 ms here)."""
        if self.joined or not self.spec.bridge:
            return

        def work(ipr):
            found = ipr.link_lookup(ifname=self.ifname)
            if not found:
                raise NicError("tap %s no longer exists (deleted under the node): the guest "
                               "has no network; save it (migrate file:PATH) and restart it "
                               "with --nic" % self.ifname)
            self._enslave(ipr, found[0], self.spec.bridge)
            ipr.link("set", index=found[0], state="up")

        def fresh():
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                work(ipr)
        if ipr is not None:
            work(ipr)
        else:
            off_loop(fresh)
        self.joined = True
        log.info("--nic: tap %s joined bridge %s", self.ifname, self.spec.bridge)

    def _leave(self, ipr, index):
        """A found tap already on a bridge: off it until this node serves."""
        from pyroute2.netlink.exceptions import NetlinkError
        if ipr.get_links(index)[0].get_attr("IFLA_MASTER"):
            try:
                ipr.link("set", index=index, master=0)
            except NetlinkError as exc:
                raise self._denied(exc, "take tap %s off its bridge" % self.ifname) from None

    def _attach(self):
        ifr = struct.pack("16sH22x", self.ifname.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise NicError("--nic: %s exists and is not a tap device; pick another "
                               "ifname" % self.ifname) from None
            if exc.errno == errno.EBUSY:
                raise NicError("--nic: tap %s is in use by another process (one user at a "
                               "time); pick another ifname" % self.ifname) from None
            raise self._denied(exc, "attach to tap %s" % self.ifname) from None
        if self.created:
            # ours: the kernel deletes it when this fd closes, even if the node is killed
            fcntl.ioctl(self.fd, TUNSETPERSIST, 0)

    def _enslave(self, ipr, index, bridge):
        from pyroute2.netlink.exceptions import NetlinkError
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            raise NicError("--nic br=%s: no such bridge; create it first (ip link add %s type "
                           "bridge) or leave br= out" % (bridge, bridge))
        br = ipr.get_links(found[0])[0]
        info = br.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "bridge":
            raise NicError("--nic br=%s: %s is a %s, not a bridge" % (bridge, bridge, kind or "plain interface"))
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_MASTER") == found[0]:
            return
        try:
            ipr.link("set", index=index, master=found[0])
        except NetlinkError as exc:
            raise self._denied(exc, "attach tap %s to bridge %s" % (self.ifname, bridge)) from None

    @staticmethod
    def _denied(exc, what):
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        if code in (errno.EPERM, errno.EACCES):
            return NicError("--nic: cannot %s: permission denied (needs CAP_NET_ADMIN): run the "
                            "node as root, or have root create the tap for your user "
                            "(ip tuntap add NAME mode tap user $USER) and leave br= out" % what)
        return NicError("--nic: cannot %s: %s" % (what, os.strerror(code) if isinstance(code, int) else exc))

    def close(self):
        """Close our fd: a tap we created goes with it (non-persistent); a found one stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.created:
            self.created = False
            # a tap whose persistence could not be cleared would outlive us: remove it
            def remove():
                from pyroute2 import IPRoute
                with IPRoute() as ipr:
                    found = ipr.link_lookup(ifname=self.ifname)
                    if found:
                        ipr.link("del", index=found[0])
            try:
                off_loop(remove)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
