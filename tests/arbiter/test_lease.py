"""The arbiter alone against a real etcd on loopback: the lease, its expiry, renewal
failure, contenders, etcd down, the pair record, standbys. ttl=1000 (the shortest lease
etcd grants with the test server's raft timing)."""
import os
import signal
import threading
import time

import pytest

from colocore.arbiter import Arbiter, Health, Held, Stale, parse_arbiter
from colocore.arbiter.fence import margin


def _spec(srv, key="/t/svc", **opts):
    extra = "".join(",%s=%s" % kv for kv in opts.items())
    return parse_arbiter("etcd:%s,key=%s,ttl=1000%s" % (srv.url, key, extra))


@pytest.fixture
def arbiters():
    made = []

    def make(spec, name, **kw):
        a = Arbiter(spec, name, **kw)
        made.append(a)
        return a
    yield make
    for a in made:
        a.close()


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.02)


def test_fresh_service_is_exclusive_and_remembers_its_history(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    st = a.status()
    assert (st["state"], st["role"], st["holder"], st["may-release"]) == ("healthy", "serving", "a", True)
    assert 0 < st["lease-ms"] <= 1000 - margin(1.0) * 1000 + 1
    with pytest.raises(Held, match="held by a.*role=standby"):
        arbiters(spec, "b").serve_fresh()
    # a clean quit with no secondary ends the history: a fresh service may start again
    a.close()
    assert not a.fence.may_release()
    arbiters(spec, "c").serve_fresh()


def test_lease_expiry_fences_before_the_successor_wins(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    a.set_pair("pair-1")
    _wait(lambda: a.pair == "pair-1", what="the pair record")
    b = arbiters(spec, "b")
    # a's renewals stop (its process hangs); its lease runs out at etcd
    a._stop.set()
    a._wake.set()
    last_valid = a.fence._lease_until
    t0 = time.monotonic()
    assert b.take_over(pair="pair-1", cancel=_deadline(10))
    won = b.takeover_at
    assert last_valid < won, "the old holder could release after the new one won"
    assert not a.fence.may_release()
    # the lease (1 s) plus etcd's expiry sweep (every 0.5 s) plus our polling
    assert won - t0 < 1.0 + 0.5 + 0.3
    assert b.status()["role"] == "serving" and b.fence.may_release()


def test_two_contenders_one_winner(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    contenders = [arbiters(spec, "c%d" % i) for i in range(3)]
    results = {}

    def run(c):
        results[c.name] = c.take_over(pair=None, cancel=lambda: len(results) > 0 and
                                      any(results.values()))
    threads = [threading.Thread(target=run, args=(c,)) for c in contenders]
    a._stop.set()
    a._wake.set()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    winners = [n for n, won in results.items() if won]
    assert len(winners) == 1, results
    holders = [c for c in contenders if c.role == "serving"]
    assert [c.name for c in holders] == winners


def test_renewal_failure_holds_output_then_wins_the_key_back(etcd_server, arbiters):
    """etcd hangs (SIGSTOP) longer than the lease: the holder's fence closes; when etcd
    comes back the lease has expired there, nobody took over, and the holder wins it back."""
    a = arbiters(_spec(etcd_server), "a")
    a.serve_fresh()
    os.kill(etcd_server.proc.pid, signal.SIGSTOP)
    try:
        _wait(lambda: a.health == Health.UNREACHABLE, what="etcd unreachable")
        _wait(lambda: not a.fence.may_release(), timeout=2, what="the fence to close")
        time.sleep(1.2)                # the lease is long past its expiry on etcd's clock
    finally:
        os.kill(etcd_server.proc.pid, signal.SIGCONT)
    _wait(lambda: a.health == Health.HEALTHY and a.fence.may_release(), what="the key won back")
    assert a.status()["role"] == "serving"


def test_etcd_down_blocks_takeover_and_reports_it(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    a.set_pair("p")
    _wait(lambda: a.pair == "p", what="the pair record")
    b = arbiters(spec, "b")
    etcd_server.kill()
    _wait(lambda: a.status()["state"] == "etcd unreachable", what="a to notice")
    done = threading.Event()
    result = []

    def contend():
        result.append(b.take_over(pair="p", cancel=done.is_set))
    t = threading.Thread(target=contend)
    t.start()
    time.sleep(1.5)                     # well past the lease: still nobody may win
    assert b.status()["state"] == "etcd unreachable"
    assert not a.fence.may_release()
    assert b.role != "serving"
    etcd_server.start()                 # same data: a's lease is restored and extended
    _wait(lambda: a.health == Health.HEALTHY and a.fence.may_release(), what="a healthy again")
    time.sleep(0.3)
    assert b.role != "serving"
    done.set()
    t.join(5)
    assert result == [False]


def test_serving_alone_makes_the_secondary_stale(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    a.set_pair("p1")
    _wait(lambda: a.pair == "p1", what="the pair record")
    assert a.go_alone()
    b = arbiters(spec, "b")
    a.close()                          # even with the key free, b's copy is too old
    with pytest.raises(Stale, match="no longer names this secondary"):
        b.take_over(pair="p1", cancel=_deadline(10))


def _cut_off(arbiter):
    """Make one arbiter's requests fail as if its host were cut from etcd (the others
    still reach it; tests/net does the same with real partitions)."""
    from colocore.arbiter.etcd import EtcdUnreachable
    real = arbiter.etcd._post
    cut = {"on": True}

    def post(path, payload):
        if cut["on"]:
            raise EtcdUnreachable("etcd unreachable (cut off by the test)")
        return real(path, payload)
    arbiter.etcd._post = post
    return cut


def _deadline(seconds):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


def test_lost_key_is_final(etcd_server, arbiters):
    spec = _spec(etcd_server)
    lost = []
    a = arbiters(spec, "a", on_lost=lost.append)
    a.serve_fresh()
    a.set_pair("p")
    _wait(lambda: a.pair == "p", what="the pair record")
    cut = _cut_off(a)                                   # a cannot renew ...
    b = arbiters(spec, "b")
    assert b.take_over(pair="p", cancel=_deadline(10))  # ... and b wins once a's lease expired
    assert not a.fence.may_release()
    cut["on"] = False
    _wait(lambda: a.health == Health.LOST, what="a to learn it lost")
    assert lost and ("names b" in lost[0] or "held by b" in lost[0]), lost
    assert not a.fence.may_release()
    a.fence.renewed(time.monotonic(), 10)
    assert not a.fence.may_release()
    assert a.status()["state"] == "lost the key"


def test_graceful_quit_hands_over_at_once(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    a.set_pair("p")
    _wait(lambda: a.pair == "p", what="the pair record")
    b = arbiters(spec, "b")
    lid = a.lease_id
    a.close()
    assert a.etcd.time_to_live(lid) == -1        # given back, not left to expire
    assert b.take_over(pair="p", cancel=_deadline(10))


def test_standbys_register_and_vanish(etcd_server, arbiters):
    spec = _spec(etcd_server)
    a = arbiters(spec, "a")
    a.serve_fresh()
    s1 = arbiters(_spec(etcd_server, role="standby"), "s1")
    s1.register_standby({"uri": "tcp:10.0.0.9:5555", "mem": 256 << 20})
    s2 = arbiters(_spec(etcd_server, role="standby"), "s2")
    s2.register_standby({"uri": "tcp:10.0.0.8:5555", "mem": 256 << 20})
    found = a.refresh_standbys()
    assert [s["name"] for s in found] == ["s1", "s2"]     # oldest registration first
    assert found[0]["uri"] == "tcp:10.0.0.9:5555"
    time.sleep(1.5)                                      # renewed: still there
    assert [s["name"] for s in a.refresh_standbys()] == ["s1", "s2"]
    s1.unregister_standby()
    assert [s["name"] for s in a.refresh_standbys()] == ["s2"]
    _wait(lambda: a.status()["standbys"] == ["s2"], what="the status to follow")
