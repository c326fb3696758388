"""`colocore bench net --quick --json`: the rows the later network issues build on."""
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
    rows = res["rows"]
    keys = {(r["target"], r["test"], r["pipeline"]) for r in rows}
    assert keys == {(t, test, p) for t in ("guest", "redis-server") for test in ("SET", "GET")
                    for p in (1, 16)}
    for r in rows:
        assert r["mode"] == "unprotected"
        assert r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        if r["target"] == "redis-server":
            assert r["ratio_to_reference"] == 1.0
        else:
            assert r["ratio_to_reference"] > 0
            assert r["exits_per_1k_requests"] > 0 and r["frames_per_exit"] > 0
    for p in res["frame_path"]:
        assert p["ns_per_frame"] > 0 and p["python_loop_ns_per_frame"] > 0
