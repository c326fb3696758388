"""Hybrid COLO with a networked guest (issue 14): the secondary's guest runs on the same
input as the primary's (fed live from the mirror log), its frames go back over the mirror
link to the primary's comparer and never reach a client, and the primary's frames leave
as soon as both copies produced them, not at the next checkpoint. --colo-verify checks
that every load makes the secondary's RAM the primary's."""
import signal
import socket
import struct
import time

from colocore.tools.procs import protect, wait_until

from netkit import (GUEST_IP, PipelineWriter, checksum, colo_hosts, icmp_ping, link_stats, redis_in,
                    wait_resp)

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
    return redis_in(ch.lab, ch.c, GUEST_IP, 6379, socket_timeout=20, socket_connect_timeout=10)


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


def test_a_guest_made_to_diverge_takes_mismatch_checkpoints_and_clients_see_one_answer(nodes):
    """TIME answers from the host's clock: the two copies send different bytes, the
    comparer finds the mismatch, a checkpoint releases the primary's reply. Each client
    gets exactly one reply per command, the primary's: its clock never goes back."""
    with colo_hosts("cci") as ch:
        pri, sec = _hybrid_pair(nodes, ch)
        clients = [_redis(ch) for _ in range(3)]
        last = [(0, 0)] * len(clients)
        rounds = 8
        for k in range(rounds):
            for i, r in enumerate(clients):
                t = r.time()
                assert isinstance(t, tuple) and len(t) == 2 and 0 <= t[1] < 10 ** 6, t
                assert t >= last[i], "client %d: TIME went back from %s to %s" % (i, last[i], t)
                last[i] = t
                assert r.set("d%d-%d" % (i, k), "x%d" % k) is True    # the stream stays in step
        for i, r in enumerate(clients):
            assert r.mget(["d%d-%d" % (i, k) for k in range(rounds)]) == \
                [("x%d" % k).encode() for k in range(rounds)]
            r.close()
        st = pri.qmp("query-colo-status")
        assert st["checkpoint-causes"]["mismatch"] >= rounds, st
        assert st["net"]["compare"]["mismatched"] >= rounds, st["net"]["compare"]
        ss = sec.qmp("query-colo-status")
        assert ss["verified"] >= rounds and ss["verify-mismatches"] == 0, ss
        assert link_stats(ch.lab, ch.s, "taps")["rx_packets"] == 0


def test_the_comparer_is_bounded_a_flood_at_the_bound_is_a_checkpoint_not_a_drop(nodes):
    """A secondary that gets no input (COLOCORE_HYBRID_STARVE) never matches anything; with
    long x-compare-timeout and x-checkpoint-delay the primary's held frames reach the
    comparer's bound under an ICMP echo flood: that is a checkpoint (cause "bound") that
    releases them. No frame the guest sent is dropped, and the held frames stay near the
    bound (what comes while the bound's checkpoint is under way comes on top)."""
    with colo_hosts("ccj") as ch:
        sec, uri = ch.start_secondary(nodes, "s", env={"COLOCORE_HYBRID_STARVE": "1"})
        pri = ch.start_primary(nodes, "p")
        sec.wait_monitor()
        wait_resp(ch.lab, ch.c, node=pri).close()
        assert icmp_ping(ch.lab, ch.c, GUEST_IP, count=1)     # ARP resolved before
        pri.qmp("migrate-set-parameters", {"x-compare-timeout": 60000})
        protect(pri, uri, DELAY, capabilities=("x-colo-hybrid",))
        with ch.lab.enter(ch.c):
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.settimeout(0.5)
        n, seen = 6000, set()
        try:
            for seq in range(n):
                body = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + bytes(16)
                s.sendto(body[:2] + struct.pack("!H", checksum(body)) + body[4:], (GUEST_IP, 0))
                if seq % 100 == 99:
                    time.sleep(0.002)               # the tap's queue: 1,000 frames
            deadline = time.monotonic() + 20
            while len(seen) < 4096 and time.monotonic() < deadline:
                try:
                    data = s.recv(2048)
                except socket.timeout:
                    continue
                icmp = data[(data[0] & 0xF) * 4:]
                if icmp[0] == 0 and icmp[4:6] == b"\x42\x42":
                    seen.add(struct.unpack("!H", icmp[6:8])[0])
            st = pri.qmp("query-colo-status")
            cmp = st["net"]["compare"]
            assert st["checkpoint-causes"]["bound"] >= 1, st
            assert len(seen) >= 4096, "%d echo replies came out at the bound" % len(seen)
            assert cmp["held-max"] <= 2 * cmp["bound-frames"], cmp
            # the rest goes with the next checkpoint (asked for here): nothing was dropped
            pri.qmp("migrate-set-parameters", {"x-checkpoint-delay": DELAY})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                net = pri.qmp("x-query-net")
                if net["tx-held"] == 0:
                    break
                time.sleep(0.1)
            assert net["tx-held"] == 0 and net["counters"]["tx_dropped"] == 0, net
            assert net["tx-written"] >= net["counters"]["tx_frames"] - 1, net
        finally:
            s.close()


def test_primary_sigkill_in_hybrid_mode_one_tcp_connection_carries_on(nodes):
    """The guarantees of periodic mode (test_colo_failover_tcp.py), in hybrid mode and with
    fewer trials: the primary killed from outside or at a crash point of its checkpoint
    loop, x_colo_lost_heartbeat on the secondary, whose guest carries on from where it
    runs (no rollback): the same connection, every acknowledged SET there."""
    plans = [("external", 0), ("after-received", 2), ("mid-ram", 2)]

    def env(plan):
        return None if plan[0] == "external" else {"COLOCORE_CRASH_AT": "%s:%d" % plan}

    with colo_hosts("cck") as ch:
        where = "p"
        sec, uri = ch.start_secondary(nodes, "s", name="n1", port=5601, env=env(plans[1]))
        pri = ch.start_primary(nodes, "p", name="n0", env=env(plans[0]))
        sec.wait_monitor()
        wait_resp(ch.lab, ch.c, node=pri).close()
        w = PipelineWriter(ch.lab, ch.c, batch=16).start()
        try:
            for trial, (point, k) in enumerate(plans):
                protect(pri, uri, 50, capabilities=("x-colo-hybrid",))
                wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary",
                           "COLO secondary")
                if point == "external":
                    time.sleep(0.3)
                    pri.kill()
                else:
                    deadline = time.monotonic() + 20
                    while pri.proc.poll() is None:
                        assert time.monotonic() < deadline, "never reached %s:%d" % (point, k)
                        time.sleep(0.01)
                wait_until(sec, "query-colo-status", lambda d: d["peer"] == "lost",
                           "the primary lost", timeout=10)
                t0 = time.monotonic()
                sec.qmp("x-colo-lost-heartbeat")
                w.first_reply_after(t0, timeout=30)
                st = wait_until(sec, "query-colo-status",
                                lambda d: d["failover-state"] == "completed", "takeover")
                assert st["net"]["takeover"]["error"] is None, st["net"]["takeover"]
                assert w.error is None and w.same_connection(), "trial %d: %s" % (trial, w.error)
                acked = w.pause()
                bad = w.missing(acked)
                assert not bad, "trial %d (%s): acknowledged SETs lost: %s" % (trial, point, bad[:5])
                w.resume()
                pri, where = sec, ch.other(where)
                if trial + 1 < len(plans):
                    sec, uri = ch.start_secondary(
                        nodes, ch.other(where), name="n%d" % (trial + 2), port=5602 + trial,
                        env=env(plans[trial + 2]) if trial + 2 < len(plans) else None)
                    sec.wait_monitor()
        finally:
            w.close()


def test_secondary_sigkill_in_hybrid_mode_the_primary_serves_on(nodes):
    """The secondary killed: the primary leaves COLO, stops comparing, releases what it held
    and serves alone on the same connection."""
    with colo_hosts("ccl") as ch:
        sec, uri = ch.start_secondary(nodes, "s")
        pri = ch.start_primary(nodes, "p")
        sec.wait_monitor()
        wait_resp(ch.lab, ch.c, node=pri).close()
        w = PipelineWriter(ch.lab, ch.c).start()
        try:
            protect(pri, uri, DELAY, capabilities=("x-colo-hybrid",))
            time.sleep(0.5)
            sec.kill(signal.SIGKILL)
            t0 = time.monotonic()
            wait_until(pri, "query-colo-status", lambda d: d["failover-state"] == "completed",
                       "the primary serving alone", timeout=10)
            w.first_reply_after(t0)
            time.sleep(0.2)
            acked = w.pause()
            assert w.error is None and w.same_connection()
            assert w.missing(acked) == []
            st = pri.qmp("query-colo-status")
            assert st["mode"] == "none" and st["net"]["held"] == 0 and "compare" not in st["net"]
        finally:
            w.close()
