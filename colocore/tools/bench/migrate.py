"""`colocore bench migrate`: initial (non-COLO) live migration of an idle (kvstore) and a
busy (dirtier wss=10000) guest of 256 MiB and 1 GiB, engine defaults: total time,
downtime, bytes sent (the source's query-migrate), and the wall time to the destination
answering."""
import time

from colocore.clients import connect_when_open
from colocore.clients.kv import KvClient
from colocore.errors import ColocoreError
from colocore.tools.bench.common import say
from colocore.tools.procs import NodeSet, free_port, wait_until


MIGRATE_CASES = (("idle", "256M"), ("busy", "256M"), ("idle", "1G"), ("busy", "1G"))


def migrate_once(kind, mem, busy_wss=10000):
    with NodeSet() as nodes:
        uri = "tcp:127.0.0.1:%d" % free_port()
        dst = nodes.start("destination", ["-m", mem, "--incoming", uri])
        if kind == "idle":
            src = nodes.start("source", ["--kernel", "kvstore", "-m", mem])
        else:
            src = nodes.start("source", ["--kernel", "dirtier", "--append", "wss=%d" % busy_wss,
                                         "-m", mem])
        dst.wait_monitor()
        src.wait_monitor()
        kv = KvClient(src.console)
        kv.wait_ready()                     # both guests answer PING once they run
        kv.close()
        time.sleep(0.5)
        t0 = time.perf_counter()
        src.qmp("migrate", {"uri": uri})
        info = wait_until(src, "query-migrate", lambda d: d["status"] in ("completed", "failed",
                                                                         "cancelled"),
                          "the migration to end", timeout=300, interval=0.002)
        t_cmd = time.perf_counter()
        if info["status"] != "completed":
            raise ColocoreError("migration did not complete: %s" % info)
        kv = KvClient(dst.console, sock=connect_when_open(dst.console, 30, "the destination"))
        kv.wait_ready(30)
        t_dst = time.perf_counter()
        kv.close()
        return {"guest": kind, "mem": mem, "wss": busy_wss if kind == "busy" else 0,
                "total_ms": info["total-time"], "downtime_ms": info["downtime"],
                "rounds": info["ram"]["dirty-sync-count"],
                "bytes_sent": info["ram"]["transferred"],
                "command_ms": round((t_cmd - t0) * 1000, 1),
                "destination_answers_ms": round((t_dst - t0) * 1000, 1)}


def bench_migrate(cases=MIGRATE_CASES, busy_wss=10000):
    rows = []
    for kind, mem in cases:
        say("migrate: %s %s guest", kind, mem)
        r = migrate_once(kind, mem, busy_wss)
        say("migrate: %s %s: total %.0f ms, downtime %.0f ms, %.1f MB sent, %d rounds", kind,
            mem, r["total_ms"], r["downtime_ms"], r["bytes_sent"] / 1e6, r["rounds"])
        rows.append(r)
    return rows


def format(rows):
    lines = ["colocore migration benchmark (initial live migration, engine defaults)",
             "%-6s %6s %6s %9s %9s %7s %11s %11s" % ("guest", "RAM", "wss", "total ms",
                                                   "downtime", "rounds", "MB sent", "dst answers")]
    for r in rows:
        lines.append("%-6s %6s %6d %9.0f %9.0f %7d %11.1f %9.0f ms" % (
            r["guest"], r["mem"], r["wss"], r["total_ms"], r["downtime_ms"], r["rounds"],
            r["bytes_sent"] / 1e6, r["destination_answers_ms"]))
    for r in rows:
        if r["guest"] == "idle" and r["mem"] == "256M":
            lines.append("target: initial migration of an idle 256 MiB guest <= 1 s: %.0f ms %s"
                         % (r["total_ms"], "met" if r["total_ms"] <= 1000 else "MISSED"))
    return "\n".join(lines)




def run(args):
    if args.quick:
        return bench_migrate(cases=(("idle", "256M"), ("busy", "256M")), busy_wss=1000)
    return bench_migrate()
