"""COLO across a real network path: primary and secondary on two test hosts (network
namespaces joined by a veth pair, made with pyroute2), replication over TCP between them.
The namespaces are created and deleted by each test."""
import signal

import pytest

from colocore.clients.kv import KvClient
from colocore.tools.netlab import Lab
from colocore.tools.procs import wait_for

PORT = 5555


@pytest.fixture
def lab():
    with Lab("cctest") as lab_:
        a = lab_.host("a", "10.77.0.1")
        b = lab_.host("b", "10.77.0.2")
        lab_.link(a, b)
        yield lab_, a, b


def _pair(nodes, lab_, a, b, verify=True):
    uri = "tcp:%s:%d" % (b.address, PORT)
    flags = ["--colo-verify"] if verify else []
    sec = nodes.start("secondary", ["-m", "256M", "--incoming", uri, *flags], prefix=lab_.exec_prefix(b))
    pri = nodes.start("primary", ["--kernel", "kvstore", "-m", "256M", *flags], prefix=lab_.exec_prefix(a))
    sec.wait_monitor()
    pri.wait_monitor()
    assert pri.hmp("migrate_set_capability x-colo on") == ""
    assert pri.hmp("migrate_set_parameter x-checkpoint-delay 40") == ""
    assert pri.hmp("migrate %s" % uri) == ""
    wait_for(pri, "info migrate", "Migration status: colo")
    return pri, sec


def test_colo_between_two_hosts(nodes, lab):
    lab_, a, b = lab
    pri, sec = _pair(nodes, lab_, a, b)
    kv = KvClient(pri.console)
    assert kv.pipeline(["SET n%d %d" % (i, i) for i in range(300)], window=100) == ["OK"] * 300
    pri.kill(signal.SIGKILL)
    wait_for(sec, "info colo", "peer: lost")
    assert "mismatches: 0" in sec.hmp("info colo")
    assert sec.hmp("x_colo_lost_heartbeat") == ""
    wait_for(sec, "info colo", "failover state: completed")
    kv2 = KvClient(sec.console)
    kv2.wait_ready()
    assert kv2.pipeline(["GET n%d" % i for i in range(300)]) == [str(i) for i in range(300)]


def test_partition_with_heartbeat_makes_both_sides_serve(nodes, lab):
    """The split-brain hazard the README warns about, shown: with x-colo-heartbeat on both
    sides a partition looks like a dead peer to each, and each takes over."""
    lab_, a, b = lab
    pri, sec = _pair(nodes, lab_, a, b, verify=False)
    for n in (pri, sec):
        assert n.hmp("migrate_set_parameter x-colo-heartbeat 400") == ""
    kv = KvClient(pri.console)
    assert kv.request("SET before partition") == "OK"
    lab_.set_link(a, up=False)
    wait_for(pri, "info colo", "failover state: completed", timeout=15)
    wait_for(sec, "info colo", "failover state: completed", timeout=15)
    # both serve now, and from here on they diverge
    assert kv.request("SET side primary") == "OK"
    kv2 = KvClient(sec.console)
    kv2.wait_ready()
    assert kv2.request("GET before") == "partition"
    assert kv2.request("GET side") == "NIL"
