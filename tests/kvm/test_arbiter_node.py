"""`colocore run --arbiter` on loopback with a real etcd: start-up rules, bad input, the
operator's override, and the protect command's answers. (Partitions: tests/net.)"""
import signal
import subprocess
import sys
import time

from colocore.clients.kv import KvClient
from colocore.tools.procs import free_port, wait_for


def _arb(srv, key="/t/node", **opts):
    return "etcd:%s,key=%s,ttl=1000%s" % (srv.url, key, "".join(",%s=%s" % kv for kv in opts.items()))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "colocore", "run", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_bad_arbiter_spec_is_one_clear_line():
    p = _run("--kernel", "kvstore", "--arbiter", "etcd:http://127.0.0.1:1,key=/k,ttl=1500")
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("colocore: --arbiter: ttl=1500: etcd counts leases in whole seconds")
    p = _run("--kernel", "kvstore", "--arbiter", "etcd:http://127.0.0.1:1,key=/k,role=standby")
    assert p.returncode == 1 and "role=standby waits for a primary" in p.stderr


def test_unreachable_etcd_refuses_to_serve():
    p = _run("--kernel", "kvstore", "--arbiter", "etcd:http://127.0.0.1:%d,key=/k" % free_port())
    assert p.returncode == 1
    assert "etcd unreachable" in p.stderr and "start etcd or check the address" in p.stderr


def test_a_second_serving_node_is_refused_with_status_3(nodes, etcd_server):
    a = nodes.start("a", ["--kernel", "kvstore", "--arbiter", _arb(etcd_server)])
    a.wait_monitor()
    b = nodes.start("b", ["--kernel", "kvstore", "--arbiter", _arb(etcd_server)])
    assert b.proc.wait(30) == 3
    assert "is held by a: the service already runs there" in b.log_tail()
    # after a's clean quit with no secondary the service's history ends: a fresh one may start
    a.hmp("quit")
    assert a.proc.wait(10) == 0
    c = nodes.start("c", ["--kernel", "kvstore", "--arbiter", _arb(etcd_server)])
    c.wait_monitor()
    assert "arbiter: healthy, serving" in c.hmp("info colo")


def test_protect_without_standby_says_how_to_start_one(nodes, etcd_server):
    a = nodes.start("a", ["--kernel", "kvstore", "--arbiter", _arb(etcd_server)])
    a.wait_monitor()
    out = a.hmp("colo_protect")
    assert out.startswith("Error: no standby is registered under /t/node/standby/")
    assert "role=standby" in out
    p = subprocess.run([sys.executable, "-m", "colocore", "protect", "unix:" + a.qmp_path],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "no standby is registered" in p.stderr
    assert a.hmp("info colo_standbys") == "no standby registered"


def test_protect_command_then_operator_override_while_etcd_is_down(nodes, etcd_server):
    """One-command re-protection (colocore protect), then etcd dies: no automatic
    failover; the operator's x_colo_lost_heartbeat on the secondary still takes over."""
    a = nodes.start("a", ["--kernel", "kvstore", "--arbiter", _arb(etcd_server)])
    a.wait_monitor()
    sb = nodes.start("sb", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % free_port(),
                            "--arbiter", _arb(etcd_server, role="standby")])
    sb.wait_monitor()
    wait_for(a, "info colo_standbys", "sb")
    assert "(next)" in a.hmp("info colo_standbys")
    p = subprocess.run([sys.executable, "-m", "colocore", "protect", "unix:" + a.qmp_path],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "protecting onto standby sb" in p.stdout, p.stderr
    wait_for(a, "info migrate", "Migration status: colo")
    wait_for(a, "info colo", "arbiter: healthy, serving")
    kv = KvClient(a.console)
    assert kv.request("SET before etcd-dies") == "OK"
    etcd_server.kill()
    wait_for(sb, "info colo", "etcd unreachable", timeout=10)
    a.kill(signal.SIGKILL)
    wait_for(sb, "info colo", "peer: lost", timeout=10)
    time.sleep(2.0)                                  # well past the lease: no takeover
    assert "COLO mode: secondary" in sb.hmp("info colo")
    assert sb.hmp("x_colo_lost_heartbeat") == ""
    out = wait_for(sb, "info colo", "failover state: completed", timeout=10)
    assert "arbiter override: x_colo_lost_heartbeat on the secondary" in out
    kv2 = KvClient(sb.console)
    kv2.wait_ready()
    assert kv2.request("GET before") == "etcd-dies"
