"""`colocore bench net --quick --json` (unprotected, periodic and hybrid rows) and
`colocore bench failover --net --quick --json` (the TCP failover figures, with and without
the replay; --hybrid: in hybrid mode)."""
import json
import subprocess
import sys

from netkit import need_tools


def test_bench_net_quick_rows():
    need_tools("redis-benchmark", "redis-server", "redis-cli")
    p = subprocess.run([sys.executable, "-m", "colocore", "bench", "net", "--quick", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["kernel"] and all(r["kernel"] == res["kernel"] for r in res["rows"])
    rows = [r for r in res["rows"] if r["mode"] == "unprotected"]
    keys = {(r["target"], r["test"], r["pipeline"]) for r in rows}
    assert keys == {(t, test, p) for t in ("guest", "redis-server") for test in ("SET", "GET")
                    for p in (1, 16)}
    periodic = [r for r in res["rows"] if r["mode"] == "periodic"]
    assert {(r["checkpoint_delay_ms"], r["test"], r["pipeline"]) for r in periodic} == {
        (d, test, p) for d in (200, 25) for test in ("SET", "GET") for p in (1, 16)}
    for r in periodic:
        assert r["target"] == "guest" and r["checkpoints"] > 0 and r["rps"] > 0
        assert 0 < r["ratio_to_unprotected"] < 1
        # output commit: a reply waits for the next checkpoint
        assert r["p50_ms"] >= r["checkpoint_delay_ms"] / 4
    hybrid = [r for r in res["rows"] if r["mode"] == "hybrid"]
    assert {(r["test"], r["pipeline"]) for r in hybrid} == {
        (test, p) for test in ("SET", "GET") for p in (1, 16)}
    for r in hybrid:
        assert r["rps"] > 0 and r["frames_compared"] > 0
        # replies leave on a match: most frames, and no reply waits for the 2 s backstop
        assert r["frames_released_on_match"] > r["frames_compared"] / 2, r
        assert set(r["checkpoint_causes"]) == {"periodic", "mismatch", "timeout", "bound",
                                               "request"}
        assert r["p50_ms"] < r["checkpoint_delay_ms"] / 4
    for r in rows:
        assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        if r["target"] == "redis-server":
            assert r["ratio_to_reference"] == 1.0
        else:
            assert r["ratio_to_reference"] > 0
            assert r["exits_per_1k_requests"] > 0 and r["frames_per_exit"] > 0
    for p in res["frame_path"]:
        assert p["ns_per_frame"] > 0 and p["python_loop_ns_per_frame"] > 0


def test_bench_failover_net_quick():
    need_tools("redis-cli")
    p = subprocess.run([sys.executable, "-m", "colocore", "bench", "failover", "--net", "--quick",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert [r["replay"] for r in res["rows"]] == [True, False]
    for r in res["rows"]:
        assert r["trials"] == 2 and r["kernel"]
        assert r["connections_reset"] == 0 and r["acked_lost"] == 0, r
        assert len(r["failover_tcp_ms"]) == 2 and r["failover_tcp_ms_p50"] > 0


def test_bench_failover_net_hybrid_quick():
    need_tools("redis-cli")
    p = subprocess.run([sys.executable, "-m", "colocore", "bench", "failover", "--net", "--hybrid",
                        "--quick", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["mode"] == "hybrid" and [r["replay"] for r in res["rows"]] == [True]
    r = res["rows"][0]
    assert r["mode"] == "hybrid" and r["trials"] == 2
    assert r["connections_reset"] == 0 and r["acked_lost"] == 0, r
