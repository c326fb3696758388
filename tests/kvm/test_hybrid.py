"""Hybrid COLO, the machine side (x-colo-hybrid): the secondary's guest runs between
checkpoints, is suspended at checkpoint-request, and every load puts back what it wrote
from the RAM cache before the primary's pages go in, so the two copies are identical at
each checkpoint (--colo-verify compares every page). At a takeover the secondary's guest
carries on from where it is: it never rolls back."""
import signal

from colocore.clients.kv import KvClient
from colocore.tools.load import KeyWriter
from colocore.tools.procs import start_protected_pair, wait_until


def _status(node):
    return node.qmp("query-colo-status")


def test_the_secondary_runs_and_every_load_makes_it_the_primary(nodes):
    pri, sec = start_protected_pair(nodes, kernel="dirtier", append="wss=300", delay_ms=50,
                                    verify=True, capabilities=("x-colo-hybrid",))
    assert _status(sec)["checkpoint-mode"] == "hybrid"
    assert _status(pri)["checkpoint-mode"] == "hybrid"
    assert "x-colo-hybrid: on" in sec.hmp("info migrate_capabilities")   # learnt
    st = wait_until(sec, "query-colo-status", lambda d: d["verified"] >= 10,
                    "ten verified checkpoints", timeout=60)
    assert st["verify-mismatches"] == 0, st
    # its guest really ran: it wrote pages that the loads had to put back
    assert st["reverted-pages"] > 0, st
    assert sec.qmp("query-status")["status"] == "colo"


def test_takeover_in_hybrid_mode_carries_on_without_rolling_back(nodes):
    pri, sec = start_protected_pair(nodes, kernel="kvstore", delay_ms=40, verify=True,
                                    capabilities=("x-colo-hybrid",))
    w = KeyWriter([pri.console], batch=8, prefix="h", timeout=30)
    w.start()
    w.wait_acked(300)
    pri.kill(signal.SIGKILL)
    w.join(10)
    acked = dict(w.acked)
    wait_until(sec, "query-colo-status", lambda d: d["peer"] == "lost", "peer lost")
    st = _status(sec)
    assert st["verified"] > 0 and st["verify-mismatches"] == 0, st
    sec.qmp("x-colo-lost-heartbeat")
    wait_until(sec, "query-colo-status", lambda d: d["failover-state"] == "completed",
               "the takeover")
    assert sec.qmp("query-status")["status"] == "running"
    kv = KvClient(sec.console)
    kv.wait_ready()
    keys = list(acked)
    replies = kv.pipeline(["GET %s" % k for k in keys], window=256)
    lost = [k for k, r in zip(keys, replies) if r != acked[k]]
    assert not lost, "%d acknowledged keys lost, e.g. %s" % (len(lost), lost[:5])
    assert kv.request("SET after hybrid") == "OK"
    kv.close()
