"""`colocore bench failover`: trials of a protected kvstore pair under a client load, the
primary killed (SIGKILL), `x_colo_lost_heartbeat` to the secondary; the time from sending
the command to the first answered request on the secondary's console. `--net`: the same
for the networked guest, as a TCP client sees it (failover_net.py)."""
import time

from colocore.clients import connect_when_open
from colocore.clients.kv import KvClient
from colocore.errors import ColocoreError
from colocore.tools.bench.common import say
from colocore.tools.load import KeyWriter
from colocore.tools.procs import NodeSet, free_port, protect, wait_until
from colocore.tools.stats import percentile


def failover_trial(mem="256M", load_s=0.6, delay_ms=200):
    with NodeSet() as nodes:
        uri = "tcp:127.0.0.1:%d" % free_port()
        sec = nodes.start("secondary", ["-m", mem, "--incoming", uri])
        pri = nodes.start("primary", ["--kernel", "kvstore", "-m", mem])
        sec.wait_monitor()
        pri.wait_monitor()
        load = KeyWriter([pri.console], batch=16, prefix="k", remember=False)
        load.start()
        try:
            protect(pri, uri, delay_ms)
            wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary",
                       "COLO secondary")
            time.sleep(load_s)
            acked = load.last
            pri.kill()                                  # SIGKILL, waits until reaped
        finally:
            load.stop()
        if acked is None:
            raise ColocoreError("the client load got no SET answered before the kill")
        # Let the secondary see the peer go (EOF on the channel), as an external
        # heartbeat agent would have, then time the takeover command alone.
        wait_until(sec, "query-colo-status", lambda d: d["peer"] == "lost", "peer lost",
                   timeout=10)
        t0 = time.perf_counter()
        sec.qmp("x-colo-lost-heartbeat")
        s = connect_when_open(sec.console, 10, "the secondary")
        kv = KvClient(sec.console, sock=s)
        kv.sock.sendall(b"GET %s\n" % acked[0].encode())
        # "OK" lines first are the load's SET replies the primary still held: the
        # secondary releases them to whoever is connected (its console is a byte stream)
        value = "OK"
        while value == "OK":
            value = kv._readline(time.monotonic() + 10)
        t1 = time.perf_counter()
        count = int(kv.request("COUNT"))
        kv.close()
        if value != acked[1] or count < load.count:
            raise ColocoreError("failover lost acknowledged writes: GET %s -> %r, COUNT %d"
                                % (acked[0], value, count))
        return {"failover_ms": (t1 - t0) * 1000, "acked_writes": load.count, "count": count}


def bench_failover(trials=20, mem="256M"):
    results = []
    for n in range(trials):
        r = failover_trial(mem)
        results.append(r)
        say("failover: trial %d/%d: %.1f ms (%d acknowledged writes, all present)",
            n + 1, trials, r["failover_ms"], r["acked_writes"])
    ms = [r["failover_ms"] for r in results]
    return {"trials": trials, "failover_ms_p50": round(percentile(ms, 50), 2),
            "failover_ms_p90": round(percentile(ms, 90), 2),
            "failover_ms_max": round(max(ms), 2), "failover_ms_min": round(min(ms), 2),
            "failover_ms": [round(x, 2) for x in ms],
            "acked_writes_min": min(r["acked_writes"] for r in results)}


def format(res):
    if res.get("net"):
        from colocore.tools.bench import failover_net
        return failover_net.format(res)
    return "\n".join([
        "colocore failover benchmark (%d trials; x_colo_lost_heartbeat sent -> first answer "
        "on the secondary)" % res["trials"],
        "  p50 %.1f ms   p90 %.1f ms   max %.1f ms   min %.1f ms" % (
            res["failover_ms_p50"], res["failover_ms_p90"], res["failover_ms_max"],
            res["failover_ms_min"]),
        "  every acknowledged write was found on the secondary (at least %d per trial)"
        % res["acked_writes_min"],
        "target: failover p50 <= 50 ms: %s" % (
            "met" if res["failover_ms_p50"] <= 50 else
            "MISSED by %.1f ms" % (res["failover_ms_p50"] - 50))])




def run(args):
    if getattr(args, "net", False):
        from colocore.tools.bench import failover_net
        return failover_net.bench_failover_net(2 if args.quick else (args.trials or 20),
                                               seed=args.seed,
                                               hybrid=getattr(args, "hybrid", False))
    return bench_failover(args.trials or 20)
