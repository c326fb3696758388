"""Hybrid COLO with a networked guest (issue 14): the secondary's guest runs on the same
input as the primary's (fed live from the mirror log), its frames go back over the mirror
link to the primary's comparer and never reach a client, and the primary's frames leave
as soon as both copies produced them, not at the next checkpoint. --colo-verify checks
that every load makes the secondary's RAM the primary's."""
import time

from colocore.tools.procs import protect, wait_until

from netkit import colo_hosts, link_stats, need_redis_py, wait_resp

DELAY = 60000           # the periodic backstop: no checkpoint of that cause in these tests


def _hybrid_pair(nodes, ch, timeout_ms=None):
    sec, uri = ch.start_secondary(nodes, "s", extra=["--colo-verify"])
    pri = ch.start_primary(nodes, "p", extra=["--colo-verify"])
    sec.wait_monitor()
    wait_resp(ch.lab, ch.c, node=pri).close()
    if timeout_ms is not None:
        pri.qmp("migrate-set-parameters", {"x-compare-timeout": timeout_ms})
    protect(pri, uri, DELAY, capabilities=("x-colo-hybrid",))
    wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")
    return pri, sec


def _redis(ch):
    redis = need_redis_py()
    with ch.lab.enter(ch.c):
        r = redis.Redis(host="10.0.0.2", port=6379, socket_timeout=20,
                        socket_connect_timeout=10)
        r.ping()
    return r


def test_redis_py_in_hybrid_mode_replies_leave_on_a_match_not_a_checkpoint(nodes):
    with colo_hosts("cch") as ch:
        pri, sec = _hybrid_pair(nodes, ch)
        r = _redis(ch)
        before = pri.qmp("query-colo-status")
        assert before["checkpoint-mode"] == "hybrid"
        n = 300
        for i in range(n):
            assert r.set("h%d" % i, "v%d" % i) is True
        assert [r.get("h%d" % i) for i in range(0, n, 7)] == \
            [("v%d" % i).encode() for i in range(0, n, 7)]
        st = pri.qmp("query-colo-status")
        cmp = st["net"]["compare"]
        # every reply came back although the periodic backstop (60 s) never ran: they were
        # released by the comparer, which matched them against the secondary's
        assert st["checkpoint-causes"]["periodic"] == 0, st
        assert cmp["matched"] >= n and cmp["released"] >= n, cmp
        # a divergence would have been repaired by a checkpoint; kvnet is deterministic
        # enough that there is (almost) none: at most a handful in 300+ requests
        diverged = sum(st["checkpoint-causes"][c] for c in ("mismatch", "timeout", "bound"))
        assert diverged <= 5, st
        # force checkpoints: every load leaves the secondary's RAM exactly the primary's
        for _ in range(3):
            pri.qmp("migrate-set-parameters", {"x-checkpoint-delay": DELAY})   # checkpoint now
            time.sleep(0.2)
            assert r.incr("counter") >= 1
        ss = wait_until(sec, "query-colo-status", lambda d: d["verified"] >= 3,
                        "three verified checkpoints", timeout=30)
        assert ss["verify-mismatches"] == 0, ss
        assert ss["net"]["tee-sent"] > 0 and ss["net"]["tee-dropped"] == 0, ss["net"]
        # the secondary's copy never wrote a frame into its tap (only onto the mirror link)
        assert link_stats(ch.lab, ch.s, "taps")["rx_packets"] == 0
        info = pri.hmp("info colo")
        assert "checkpoint mode: hybrid" in info and "hybrid: frames compared" in info, info
        assert "x-compare-timeout: 20 ms" in pri.hmp("info migrate_parameters")
        r.close()
