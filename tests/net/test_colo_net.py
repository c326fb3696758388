"""A networked guest under COLO, on three test hosts (client, primary host, secondary host;
netkit.ColoHosts): the guest's frames are held until the checkpoint that produced them is
safe on the secondary, the secondary's copy stays off the service network, and the two
ways COLO ends without a takeover (the secondary dies; a partition, decided by the
operator) let the held frames out on the same TCP connection."""
import json
import signal
import time

from colocore.tools.procs import protect, wait_until

from netkit import (GUEST_MAC, Capture, PipelineWriter, colo_hosts, link_master, link_stats,
                    mac_bytes, tc_kinds, wait_resp)

GUEST = mac_bytes(GUEST_MAC)


def _pair(nodes, ch, delay=100, secondary_extra=()):
    sec, uri = ch.start_secondary(nodes, "s", extra=secondary_extra)
    pri = ch.start_primary(nodes, "p")
    sec.wait_monitor()
    wait_resp(ch.lab, ch.c, node=pri).close()
    return pri, sec, uri


def _protect(pri, sec, uri, delay):
    protect(pri, uri, delay)
    wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")


def test_no_frame_reaches_the_wire_before_its_checkpoint_was_received(nodes, tmp_path):
    """Output commit for frames, seen from outside: a capture on the primary host's bridge
    numbers the guest's frames as they appear on the wire; the secondary records, for each
    checkpoint, when it acknowledged it (just before vmstate-received) and how many frames
    the guest had produced in its state. Frame k may appear only after the first
    checkpoint whose state produced it was acknowledged."""
    stats = tmp_path / "secondary-stats.jsonl"
    with colo_hosts() as ch:
        cap = Capture(ch.lab, ch.p, "brp", lambda f: f[6:12] == GUEST)   # before the guest
        pri, sec, uri = _pair(nodes, ch, secondary_extra=["--stats-file", str(stats)])
        writers = [PipelineWriter(ch.lab, ch.c, batch=8, prefix="w%d-" % i).start()
                   for i in range(4)]
        try:
            time.sleep(0.3)
            _protect(pri, sec, uri, 100)
            # the secondary's copy exists but is off the service network, silent
            assert link_master(ch.lab, ch.s, "taps") is None
            time.sleep(1.5)
            assert link_stats(ch.lab, ch.s, "taps")["rx_packets"] == 0, \
                "the secondary wrote frames into its tap while in COLO"
            for w in writers:
                w.pause()
                assert w.error is None and w.acked > 0
            time.sleep(0.35)                     # the last replies' checkpoints
        finally:
            for w in writers:
                w.close()
            frames = cap.stop()
        records = sorted((json.loads(line) for line in stats.read_text().splitlines()
                          if '"COLO_CHECKPOINT_LOADED"' in line), key=lambda r: r["id"])
        assert len(records) >= 10, "too few checkpoints to check: %d" % len(records)
        base0 = records[0]["net-base"]
        checked, spanned = 0, set()
        for k, (stamp, frame) in enumerate(frames, start=1):
            if k <= base0:
                continue                          # sent before COLO began
            covering = next((r for r in records if r["net-produced"] >= k), None)
            spanned.add(covering["id"] if covering else None)
            assert covering is not None, \
                "guest frame %d reached the wire, yet no checkpoint holding its state was " \
                "acknowledged (last covers %d)" % (k, records[-1]["net-produced"])
            assert stamp >= covering["received-at"], \
                "guest frame %d reached the wire %.3f ms before checkpoint %d, whose state " \
                "produced it, was acknowledged by the secondary" % (
                    k, (covering["received-at"] - stamp) * 1000, covering["id"])
            checked += 1
        assert checked >= 40 and len(spanned) >= 10, \
            "only %d frames of %d checkpoints checked" % (checked, len(spanned))
        info = pri.hmp("info colo")
        assert "mirror link" in info and "network frames: held" in info


def test_secondary_killed_the_primary_serves_on_and_releases_what_it_held(nodes):
    with colo_hosts() as ch:
        pri, sec, uri = _pair(nodes, ch)
        w = PipelineWriter(ch.lab, ch.c).start()
        try:
            _protect(pri, sec, uri, 200)
            assert tc_kinds(ch.lab, ch.p, "tapp") == ["clsact", "noqueue"] or \
                "clsact" in tc_kinds(ch.lab, ch.p, "tapp")
            time.sleep(0.5)
            sec.kill(signal.SIGKILL)
            t0 = time.monotonic()
            wait_until(pri, "query-colo-status", lambda d: d["failover-state"] == "completed",
                       "the primary serving alone", timeout=10)
            w.first_reply_after(t0)              # what it held went out, the same connection
            time.sleep(0.3)
            acked = w.pause()
            assert w.error is None and w.same_connection()
            assert w.missing(acked) == []
            assert "clsact" not in tc_kinds(ch.lab, ch.p, "tapp"), "the mirror was left behind"
            st = pri.qmp("query-colo-status")
            assert st["mode"] == "none" and st["net"]["held"] == 0
        finally:
            w.close()


def test_partition_holds_output_until_the_operator_decides(nodes):
    with colo_hosts() as ch:
        pri, sec, uri = _pair(nodes, ch)
        w = PipelineWriter(ch.lab, ch.c).start()
        try:
            _protect(pri, sec, uri, 100)
            time.sleep(0.4)
            ch.lab.set_link(ch.p, up=False)                            # replication cut
            ch.lab.set_link(ch.p, up=False, ifname=ch.info["p"]["mirror"])
            cut = time.monotonic()
            time.sleep(1.5)
            late = [t for t, _ in list(w.reply_times) if t > cut + 0.15]
            assert late == [], "replies reached the client during the partition"
            assert pri.qmp("query-status")["status"] == "running"       # guest runs, held
            assert link_master(ch.lab, ch.s, "taps") is None          # never took over
            t0 = time.monotonic()
            assert pri.hmp("x_colo_lost_heartbeat") == ""              # the operator decides
            w.first_reply_after(t0)
            wait_until(pri, "query-colo-status", lambda d: d["failover-state"] == "completed",
                       "the primary serving alone", timeout=10)
            time.sleep(0.2)
            acked = w.pause()
            assert w.error is None and w.same_connection()
            assert w.missing(acked) == []
            assert "clsact" not in tc_kinds(ch.lab, ch.p, "tapp")
            st = sec.qmp("query-colo-status")
            assert st["failover-state"] == "none"                      # nothing decided there
        finally:
            w.close()
