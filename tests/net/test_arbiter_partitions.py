"""The arbiter alone across real partitions: three test hosts (p, s and the etcd host e)
in network namespaces joined by a pyroute2 mesh, a real etcd on e, one arbiter process
on p (serving) and one on s (contending). Links are cut and healed with pyroute2.

The invariant checked everywhere: the last moment at which p's fence was open is before
the moment s won the key (one CLOCK_MONOTONIC for all namespaces)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from colocore.tools.etcd import EtcdServer
from colocore.tools.netlab import Lab
from colocore.tools.procs import spawn

pytestmark = pytest.mark.etcd

PROBE = os.path.join(os.path.dirname(__file__), "arbiter_probe.py")
TTL = 1.0


class Probe:
    def __init__(self, lab, host, spec, name, mode, pair=None):
        argv = [*lab.exec_prefix(host), sys.executable, PROBE, spec, name, mode]
        if pair:
            argv.append(pair)
        self.proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(PROBE))))
        self.events = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait(self, pred, timeout=10.0, what="event"):
        deadline = time.monotonic() + timeout
        while True:
            for ev in list(self.events):
                if pred(ev):
                    return ev
            assert self.proc.poll() is None or time.monotonic() < deadline, "probe exited"
            assert time.monotonic() < deadline, "no %s; events: %s" % (what, self.events[-5:])
            time.sleep(0.02)

    def last_until(self):
        return max((e["until"] for e in self.events if e["event"] == "renewed"), default=0)

    def won(self):
        return next((e for e in self.events if e["event"] == "won"), None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with Lab("ccarb") as lab:
        p, s, e = lab.host("p", "10.79.0.1"), lab.host("s", "10.79.0.2"), lab.host("e", "10.79.0.3")
        lab.mesh(p, s, e)
        srv = EtcdServer(str(tmp_path_factory.mktemp("etcd") / "data"), host=e.address,
                         prefix=lab.exec_prefix(e))
        srv.start()
        try:
            yield lab, p, s, e, srv
        finally:
            srv.stop()


@pytest.fixture
def probes(mesh, request):
    lab, p, s, e, srv = mesh
    made = []
    key = "/t/%s" % request.node.name.replace("[", "-").replace("]", "")
    spec = "etcd:%s,key=%s,ttl=%d" % (srv.url, key, TTL * 1000)

    def start(host, name, mode, pair=None):
        pr = Probe(lab, host, spec, name, mode, pair)
        made.append(pr)
        return pr
    try:
        yield start
    finally:
        for pr in made:
            pr.stop()
        for a, b in ((p, s), (p, e), (s, e)):
            lab.heal(a, b)
        srv.start()


def test_pair_link_cut_nobody_takes_over(mesh, probes):
    lab, p, s, e, srv = mesh
    a = probes(p, "a", "serve", "pair1")
    a.wait(lambda ev: ev["event"] == "renewed", what="a serving")
    b = probes(s, "b", "contend", "pair1")
    lab.cut(p, s)
    time.sleep(3 * TTL)
    assert b.won() is None
    n = len([ev for ev in a.events if ev["event"] == "renewed"])
    assert n >= 6, "a kept renewing through etcd: %d renewals" % n


def test_primary_isolated_contender_wins_after_the_fence_closed(mesh, probes):
    lab, p, s, e, srv = mesh
    a = probes(p, "a", "serve", "pair1")
    a.wait(lambda ev: ev["event"] == "renewed", what="a serving")
    time.sleep(0.4)                      # the pair record is written
    b = probes(s, "b", "contend", "pair1")
    lab.isolate(p)
    t_cut = time.monotonic()
    won = b.wait(lambda ev: ev["event"] == "won", timeout=5 * TTL, what="b winning")
    assert a.last_until() < won["at"], (a.last_until(), won["at"])
    assert won["at"] - t_cut < TTL + 0.5 + 0.5
    a.wait(lambda ev: ev.get("state") == "etcd unreachable", what="a noticing")
    lab.rejoin(p)
    a.wait(lambda ev: ev.get("state") == "lost the key", timeout=5, what="a learning it lost")
    assert a.last_until() < won["at"]


def test_primary_cut_from_etcd_only_is_fenced_then_replaced(mesh, probes):
    """Renewal failure: p still reaches s but not etcd. Its fence closes; a contender that
    sees etcd wins after the lease expired there (in COLO the secondary would contend only
    if it also stopped hearing p)."""
    lab, p, s, e, srv = mesh
    a = probes(p, "a", "serve")
    a.wait(lambda ev: ev["event"] == "renewed", what="a serving")
    b = probes(s, "b", "contend")
    lab.cut(p, e)
    won = b.wait(lambda ev: ev["event"] == "won", timeout=5 * TTL, what="b winning")
    assert a.last_until() < won["at"]
    lab.heal(p, e)
    a.wait(lambda ev: ev.get("state") == "lost the key", timeout=5, what="a learning it lost")


def test_etcd_down_no_takeover(mesh, probes):
    lab, p, s, e, srv = mesh
    a = probes(p, "a", "serve", "pair1")
    a.wait(lambda ev: ev["event"] == "renewed", what="a serving")
    time.sleep(0.4)
    b = probes(s, "b", "contend", "pair1")
    srv.kill()
    a.wait(lambda ev: ev.get("state") == "etcd unreachable", what="a noticing")
    lab.cut(p, s)                        # and the primary falls silent too: still no takeover
    time.sleep(3 * TTL)
    assert b.won() is None
    t_back = time.monotonic()
    srv.start()
    a.wait(lambda ev: ev["event"] == "renewed" and ev["t"] > t_back, what="a renewing again")
    time.sleep(0.5)
    assert b.won() is None
