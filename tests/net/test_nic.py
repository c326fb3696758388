"""--nic set-up and its failures: one clear line each; a tap the node created goes with
it (even after SIGKILL), a tap it found stays; a tap deleted under a running node takes
the link down and nothing else; announce_self sends RARP rounds and the guest's
gratuitous ARP."""
import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest

from netkit import (GUEST_IP, GUEST_MAC, PacketSocket, guest_lab, mac_bytes, start_kvnet,
                    wait_resp)


@pytest.fixture
def lab():
    with guest_lab() as env:
        yield env


def _run_fail(lab, host, nic, env=None, preexec=None):
    """A node that must refuse to start: returns its stderr's last line."""
    p = subprocess.run(lab.exec_prefix(host) + [
        sys.executable, "-m", "colocore", "run", "--kernel", "kvnet", "-m", "64M",
        "--append", "ip=10.0.0.2/24", "--nic", nic],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, **(env or {})),
        preexec_fn=preexec)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    return lines[-1]


def _drop_net_admin():
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_NET_ADMIN = 24, 12
    if libc.prctl(PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_nic_setup_errors_are_one_clear_line(lab):
    lab_, h, c = lab
    line = _run_fail(lab_, h, "tap,ifname=tapk,br=nosuchbr")
    assert "br=nosuchbr: no such bridge; create it first" in line
    line = _run_fail(lab_, h, "tap,ifname=averyveryverylongname")
    assert "at most 15 characters" in line
    line = _run_fail(lab_, h, "tap,ifname=tapk", env={"COLOCORE_TUN_DEVICE": "/nonexistent/tun"})
    assert "/nonexistent/tun does not exist: load the tun module" in line
    line = _run_fail(lab_, h, "tap,ifname=tapk,br=br0", preexec=_drop_net_admin)
    assert "permission denied (needs CAP_NET_ADMIN)" in line
    line = _run_fail(lab_, h, "tap,ifname=br0")
    assert "br0 exists and is not a tap device" in line
    line = _run_fail(lab_, h, "user,id=n0")
    assert "only the tap backend exists" in line
    line = _run_fail(lab_, h, "tap,ifname=tapk,mac=01:00:5e:00:00:01")
    assert "multicast" in line
    # nothing was left behind by the failed starts
    assert "tapk" not in lab_.links(h)


def test_created_tap_goes_even_after_sigkill_found_tap_stays(nodes, lab):
    from pyroute2 import NetNS
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    node.kill(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while "tapk" in lab_.links(h) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tapk" not in lab_.links(h)
    # an operator's tap: the node uses it and leaves it where it was
    with NetNS(h.ns) as n:
        n.link("add", ifname="optap", kind="tuntap", mode="tap", ifr={"no_pi": True})
    node = start_kvnet(nodes, lab_, h, name="kvnet2", tap="optap")
    wait_resp(lab_, c, node=node).close()
    node.stop()
    assert "optap" in lab_.links(h)


def test_tap_deleted_under_a_running_node(nodes, lab):
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    lab_.delete_link(h, "tapk")
    # the guest notices at its next exit; traffic toward it makes one
    from colocore.clients.kv import KvClient
    kv = KvClient(node.console)
    deadline = time.monotonic() + 10
    while "link down" not in node.hmp("info network") and time.monotonic() < deadline:
        kv.request("PING")
        time.sleep(0.1)
    assert "link down" in node.hmp("info network")
    assert kv.request("PING") == "PONG"          # the guest keeps running
    assert node.hmp("info status") == "VM status: running"
    kv.close()
    log = node.log_tail(50)
    errors = [l for l in log.splitlines() if "tap tapk was deleted under the running node" in l]
    assert len(errors) == 1, log


def test_announce_self_sends_rarp_and_the_guest_announces(nodes, lab):
    lab_, h, c = lab
    node = start_kvnet(nodes, lab_, h)
    wait_resp(lab_, c, node=node).close()
    ps = PacketSocket(lab_, c, c.ifname)
    mac = mac_bytes(GUEST_MAC)
    assert node.hmp("announce_self") == ""
    got = ps.capture(1.5, lambda f: f[6:12] == mac and f[12:14] in (b"\x80\x35", b"\x08\x06"))
    ps.close()
    rarp = [f for f in got if f[12:14] == b"\x80\x35"]
    garp = [f for f in got if f[12:14] == b"\x08\x06" and f[28:32] == f[38:42] == bytes(map(int, GUEST_IP.split(".")))]
    assert len(rarp) == 5, got                    # QEMU's five rounds
    assert garp, "the guest sent no gratuitous ARP on ANNOUNCE"
    assert "link up" in node.hmp("info network")
