"""A networked guest that moves keeps its TCP connections: the client sees a pause,
never a reset. Once through a snapshot file (migrate file: then --incoming file:), once
by live migration between two host namespaces on one LAN."""
import time

from colocore.tools.netlab import Lab
from colocore.tools.procs import wait_for

from netkit import Resp, guest_lab, start_kvnet, wait_resp


def _busy_connection(lab, c, keys=200):
    r = wait_resp(lab, c)
    for i in range(keys):
        assert r.cmd("SET", "before%d" % i, str(i)) == "OK"
    return r


def _carries_on(r, keys=200):
    """The same connection (same local port, no reconnect) answers for old and new keys."""
    port = r.local_port
    r.sock.settimeout(20)          # the guest is back after the move: retransmission brings it
    assert r.cmd("GET", "before%d" % (keys - 1)) == str(keys - 1)
    for i in range(keys):
        assert r.cmd("GET", "before%d" % i) == str(i)
        assert r.cmd("SET", "after%d" % i, str(i)) == "OK"
    assert r.sock.getsockname()[1] == port


def test_restore_from_file_keeps_tcp_connections(nodes, tmp_path):
    with guest_lab() as (lab, h, c):
        a = start_kvnet(nodes, lab, h, name="a")
        r = _busy_connection(lab, c)
        others = [Resp(lab, c) for _ in range(16)]
        snap = str(tmp_path / "vm.snap")
        assert a.hmp("migrate file:%s" % snap) == ""
        a.stop()
        # meanwhile the client asks; nobody answers, nobody resets
        r.send_raw(Resp.encode("GET", "before0"))
        time.sleep(0.3)
        b = nodes.start("b", ["-m", "128M", "--incoming", "file:%s" % snap,
                              "--nic", "tap,ifname=tapk,br=br0"], prefix=lab.exec_prefix(h))
        b.wait_monitor()
        assert r.reply() == "0"
        _carries_on(r)
        for i, o in enumerate(others):
            assert o.cmd("GET", "before%d" % i) == str(i)
        assert "link up" in b.hmp("info network")


def test_live_migration_between_two_hosts_keeps_tcp_connections(nodes):
    with Lab("ccm") as lab:
        s = lab.host("s", "10.0.0.250")        # the LAN's switch
        a = lab.host("a", "10.0.0.11")
        b = lab.host("b", "10.0.0.12")
        c = lab.host("c", "10.0.0.1")
        lab.bridge(s, "sw")
        lab.bridge(a, "bra", a.address)
        lab.bridge(b, "brb", b.address)
        lab.wire(a, s, a_bridge="bra", b_bridge="sw")
        lab.wire(b, s, a_bridge="brb", b_bridge="sw")
        lab.wire(c, s, b_bridge="sw")
        dst = nodes.start("dst", ["-m", "128M", "--incoming", "tcp:10.0.0.12:5555",
                                  "--nic", "tap,ifname=tapb,br=brb"], prefix=lab.exec_prefix(b))
        src = start_kvnet(nodes, lab, a, name="src", tap="tapa", bridge="bra")
        dst.wait_monitor()
        r = _busy_connection(lab, c)
        # a client keeps asking while the guest moves
        assert src.hmp("migrate -d tcp:10.0.0.12:5555") == ""
        t0 = time.monotonic()
        pauses = 0
        while "Migration status: completed" not in src.hmp("info migrate"):
            assert r.cmd("INCR", "moving") > 0
            pauses += 1
            assert time.monotonic() - t0 < 60
        wait_for(dst, "info status", "VM status: running")
        _carries_on(r)
        assert int(r.cmd("GET", "moving")) >= pauses
        assert "link up" in dst.hmp("info network")
