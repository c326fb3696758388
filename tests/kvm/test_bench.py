"""The checkpoint, failover and migrate benchmarks run end to end with tiny settings.

Shape and consistency only: figures are positive and hang together. Never timed
assertions (the targets are for `colocore bench`, on a quiet machine).
"""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "colocore", "bench", *args, "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip(), "a benchmark shows its progress on stderr"
    return json.loads(proc.stdout)        # stdout holds the JSON and nothing else


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_checkpoint_quick():
    rows = _bench("checkpoint", "--quick")
    assert {(r["pattern"], r["mode"], r["wss"], r["delay_ms"], r["tls"]) for r in rows} == {
        ("hot", "copy", 1000, 50, False), ("hot", "hot+pre+cow", 1000, 50, False),
        ("hot", "hot+pre+cow", 1000, 50, True), ("scan", "copy", 1000, 50, False),
        ("scan", "hot+pre+cow", 1000, 50, False)}
    for r in rows:
        if r["tls"]:       # what TLS costs, against the plain pair of the same run
            assert r["tls_latency_vs_plain"] > 0 and r["tls_pause_vs_plain"] > 0
    for r in rows:
        for key in ("wss", "delay_ms", "pause_ms_p50", "pause_ms_p99", "memcpy_ms",
                    "progress_ratio", "bytes_per_checkpoint", "hot_pages",
                    "wp_faults_per_checkpoint", "kernel"):
            assert key in r
        assert r["modes_used"] == [r["mode"]]          # the node ran the mode asked for
        assert r["checkpoints"] >= 2
        assert 0 < r["pause_ms_p50"] <= r["pause_ms_p90"] <= r["pause_ms_p99"] <= r["pause_ms_max"]
        assert r["latency_ms_p50"] > 0
        assert r["bytes_per_checkpoint"] > 0 and r["compression_ratio"] > 0
        assert r["progress_ratio"] > 0 and min(r["rate_unprotected"]) > 0
        assert len(r["rate_unprotected"]) == 2 and len(r["rate_protected"]) == 1
        assert r["memcpy_ms"] > 0 and r["wp_faults_per_checkpoint"] >= 0
        if r["mode"] == "copy":
            assert r["hot_pages"] == 0 and r["wp_faults_per_checkpoint"] == 0
    hot = [r for r in rows if r["pattern"] == "hot"]
    # every pass of the guest rewrites its 1,000 pages: each checkpoint carries them all,
    # and the default mode keeps them writable
    assert all(r["dirty_pages_p50"] >= 1000 for r in hot)
    kept = [r["hot_pages"] for r in hot if r["mode"] != "copy"]
    assert len(kept) == 2 and min(kept) >= 1000, kept
    assert all(r["bytes_per_checkpoint"] > 1000 * 4096 // 2 or r["compression_ratio"] > 1.5
               for r in hot)


def test_checkpoint_refuses_unknown_modes_and_patterns():
    for args, text in ((("--modes", "fast"), "unknown pause mode 'fast'"),
                       (("--patterns", "zigzag"), "unknown pattern 'zigzag'")):
        proc = subprocess.run([sys.executable, "-m", "colocore", "bench", "checkpoint", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and text in proc.stderr, proc.stderr


def test_failover_two_trials():
    res = _bench("failover", "--trials", "2")
    assert res["trials"] == 2 and len(res["failover_ms"]) == 2
    assert 0 < res["failover_ms_p50"] <= res["failover_ms_p90"] <= res["failover_ms_max"]
    assert res["acked_writes_min"] > 0


def test_migrate_quick():
    rows = _bench("migrate", "--quick")
    assert [(r["guest"], r["mem"]) for r in rows] == [("idle", "256M"), ("busy", "256M")]
    for r in rows:
        assert r["total_ms"] > 0 and r["bytes_sent"] > 0 and r["rounds"] >= 1
        assert 0 <= r["downtime_ms"] <= r["total_ms"]
        assert r["destination_answers_ms"] >= r["command_ms"] > 0
    idle, busy = rows
    assert busy["bytes_sent"] > 1000 * 4096 > idle["bytes_sent"]


def test_ctrl_c_stops_every_node():
    proc = subprocess.Popen([sys.executable, "-m", "colocore", "bench", "checkpoint", "--quick"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    nodes = []
    try:
        for line in proc.stderr:
            if ": protecting" in line or "delay=" in line:   # both nodes are up
                break
        nodes = _children(proc.pid)
        assert len(nodes) == 2
        proc.send_signal(signal.SIGINT)
        proc.stderr.read()
        assert proc.wait(30) == 130
        assert [p for p in nodes if _alive(p)] == []
    finally:
        # never leave nodes behind, even when this test fails: SIGKILL on the bench
        # would orphan them, so interrupt it first and only then kill what is left
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in nodes:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("what", ["checkpoint", "failover", "migrate"])
def test_help_lists_benchmarks(what):
    proc = subprocess.run([sys.executable, "-m", "colocore", "bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert what in proc.stdout
