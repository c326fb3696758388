"""Failover as a TCP client sees it (issue 13): ONE redis-py connection pipelining SETs
lives through 20 failovers. Each trial kills the primary (SIGKILL) at a random point of
its checkpoint cycle, either from outside at a random moment or from inside at one of
the protocol's crash points (colo/faults.py), runs x_colo_lost_heartbeat on the
secondary, and checks that the same connection carries on (no reset, no reconnect), that
every SET whose reply the client read is there, and that the survivor answers. Then the
survivor is re-protected onto a fresh secondary on the other host while the client keeps
writing, and becomes the next trial's primary."""
import os
import random
import time

from colocore.colo.faults import POINTS
from colocore.tools.procs import protect, wait_until

from netkit import PipelineWriter, colo_hosts, wait_resp

TRIALS = 20
DELAY_MS = 50
KILL_POINTS = ("external",) + POINTS


def _plan(rng):
    """(kill point, checkpoint number) of one trial."""
    point = rng.choice(KILL_POINTS)
    return point, rng.randint(2, 4)


def test_one_tcp_connection_survives_twenty_primary_failures(nodes):
    seed = int(os.environ.get("COLOCORE_TEST_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    plans = [_plan(rng) for _ in range(TRIALS)]
    print("seed %d: %s" % (seed, plans))

    def env(plan):
        point, k = plan
        return None if point == "external" else {"COLOCORE_CRASH_AT": "%s:%d" % (point, k)}

    with colo_hosts() as ch:
        where = "p"
        sec, uri = ch.start_secondary(nodes, ch.other(where), name="n1", port=5601,
                                      env=env(plans[1]))
        pri = ch.start_primary(nodes, where, name="n0", env=env(plans[0]))
        sec.wait_monitor()
        wait_resp(ch.lab, ch.c, node=pri).close()
        w = PipelineWriter(ch.lab, ch.c, batch=16).start()
        checked = 0
        timings = []
        try:
            for trial in range(TRIALS):
                protect(pri, uri, DELAY_MS)
                wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary",
                           "COLO secondary")
                point, k = plans[trial]
                if point == "external":
                    time.sleep(rng.uniform(0.05, 0.05 + 4 * DELAY_MS / 1000.0))
                    pri.kill()
                else:
                    deadline = time.monotonic() + 20
                    while pri.proc.poll() is None:
                        assert time.monotonic() < deadline, \
                            "trial %d: the primary never reached %s:%d" % (trial, point, k)
                        time.sleep(0.01)
                wait_until(sec, "query-colo-status", lambda d: d["peer"] == "lost",
                           "the primary lost", timeout=10)
                t0 = time.monotonic()
                sec.qmp("x-colo-lost-heartbeat")
                timings.append(w.first_reply_after(t0, timeout=30))
                wait_until(sec, "query-colo-status",
                           lambda d: d["failover-state"] == "completed", "takeover")
                assert w.error is None, "trial %d (%s:%d): %s" % (trial, point, k, w.error)
                assert w.same_connection(), "trial %d: the client reconnected" % trial
                acked = w.pause()
                # the SETs acknowledged since the last trial; every fifth trial, all of them
                missing = _missing_since(w, 0 if trial % 5 == 4 else checked, acked)
                assert not missing, "trial %d (%s:%d): acknowledged SETs lost: %s" % (
                    trial, point, k, missing[:10])
                assert w.command("PING") in (b"PONG", "PONG", True)   # the survivor answers
                checked = acked
                w.resume()
                # re-protect the survivor onto a fresh secondary on the dead primary's host
                # while the client writes on: the survivor is the next trial's primary, the
                # fresh node the primary of the trial after (its crash point is set now)
                pri, where = sec, ch.other(where)
                if trial + 1 < TRIALS:
                    sec, uri = ch.start_secondary(
                        nodes, ch.other(where), name="n%d" % (trial + 2), port=5602 + trial,
                        env=env(plans[trial + 2]) if trial + 2 < TRIALS else None)
                    sec.wait_monitor()
        finally:
            w.close()
        print("failover_tcp_ms: %s" % ", ".join("%.0f" % (t * 1000) for t in timings))
        assert len(timings) == TRIALS


def _missing_since(w, lo, hi):
    """Acknowledged keys lo..hi-1 that the guest does not hold (on the same connection)."""
    bad = []
    for start in range(lo, hi, 60):
        keys = [w.key(i) for i in range(start, min(hi, start + 60))]
        for i, v in zip(range(start, start + len(keys)), w.command("MGET", *keys)):
            if v is None or v.decode() != w.value(i):
                bad.append(w.key(i))
    return bad
