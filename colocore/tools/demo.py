"""`colocore demo`: the main job, a protected kvstore guest that survives its host.

A primary and a secondary on loopback, x-colo on; a client writes keys to the primary
while checkpoints flow (one line per checkpoint); the primary is killed with SIGKILL;
`x_colo_lost_heartbeat` on the secondary; every key the client saw `OK` for is read back
there; a summary; exit 0 only if nothing was lost. `--snapshot` runs the single-node
save-to-file / restore job instead. `--auto` tells the same story under an etcd arbiter
with nobody typing a COLO command: protection onto a registered standby, failover after
SIGKILL, re-protection onto the next standby, a second SIGKILL.
"""
import json
import os
import signal
import time

from colocore.clients import connect_when_open
from colocore.clients.kv import KvClient
from colocore.clients.qmp import QmpClient
from colocore.errors import ColocoreError
from colocore.tools.load import KeyWriter
from colocore.tools.etcd import EtcdServer
from colocore.tools.procs import NodeSet, free_port, start_protected_pair, wait_until


class Printer:
    def __init__(self, as_json):
        self.as_json = as_json

    def step(self, name, **fields):
        if self.as_json:
            print(json.dumps(dict(step=name, **fields)), flush=True)
        else:
            extra = " ".join("%s=%s" % kv for kv in fields.items())
            print("%-11s %s" % (name, extra), flush=True)


def main(args):
    out = Printer(args.json)
    try:
        if args.snapshot:
            ok = run_snapshot(args.keys, out)
        elif args.auto:
            ok = run_auto(args.delay, args.seconds, out)
        else:
            ok = run_protected(args.keys, args.delay, args.seconds, out)
    except ColocoreError as exc:
        out.step("error", error=str(exc))
        return 1
    except KeyboardInterrupt:
        out.step("error", error="interrupted; every node the demo started was stopped")
        return 130
    return 0 if ok else 1


def run_protected(max_keys, delay_ms, seconds, out):
    with NodeSet() as nodes:
        t0 = time.monotonic()
        pri, sec = start_protected_pair(nodes, kernel="kvstore", delay_ms=delay_ms,
                                        capabilities=("compress",))
        out.step("protected", primary_pid=pri.pid, secondary_pid=sec.pid,
                 ms=round((time.monotonic() - t0) * 1000), delay_ms=delay_ms)
        events = QmpClient("unix:" + pri.qmp_path)
        writer = KeyWriter([pri.console], batch=256)
        writer.start()
        deadline = time.monotonic() + seconds
        checkpoints = 0
        while time.monotonic() < deadline and writer.count < max_keys:
            ev = events.get_event(timeout=0.5)
            if ev is None or ev.get("event") != "COLO_CHECKPOINT":
                continue
            d = ev["data"]
            checkpoints += 1
            out.step("checkpoint", id=d["id"], pause_ms=d["pause-ms"], dirty_pages=d["dirty-pages"],
                     bytes=d["bytes"], ratio=d["compression-ratio"], latency_ms=d["latency-ms"],
                     keys_acked=writer.count)
        events.close()
        pri.kill(signal.SIGKILL)
        writer.stop()
        acked = dict(writer.acked)
        out.step("crash", killed="primary", pid=pri.pid, signal="SIGKILL", keys_acked=len(acked))
        t = time.monotonic()
        sec.qmp("x-colo-lost-heartbeat")
        kv, first = _first_answer(sec.console)
        failover_ms = (first - t) * 1000
        wait_until(sec, "query-colo-status", lambda d: d["failover-state"] == "completed",
                   "the failover to complete")
        out.step("failover", node="secondary", first_answer_ms=round(failover_ms, 1),
                 status=sec.qmp("query-status")["status"])
        keys = list(acked)
        replies = kv.pipeline(["GET %s" % k for k in keys], window=512) if keys else []
        lost = [k for k, r in zip(keys, replies) if r != acked[k]]
        more = kv.pipeline(["SET after%d %d" % (i, i) for i in range(100)])
        kv.close()
        ok = not lost and bool(keys) and all(r == "OK" for r in more)
        out.step("summary", ok=ok, checkpoints=checkpoints, keys_acknowledged=len(keys),
                 keys_lost=len(lost), failover_ms=round(failover_ms, 1),
                 serving_after_failover=all(r == "OK" for r in more))
        return ok


def _first_answer(address, timeout=30.0):
    """(client, time) of the first PING the new primary answers; its console opens only
    when it takes over, so connecting is part of the wait."""
    kv = KvClient(address, timeout=5, sock=connect_when_open(address, timeout, "the secondary"))
    kv.wait_ready(timeout)
    return kv, time.monotonic()


def run_snapshot(nkeys, out):
    with NodeSet() as nodes:
        snap = os.path.join(nodes.workdir, "kvstore.snap")
        t0 = time.monotonic()
        a = nodes.start("node-a", ["--kernel", "kvstore", "-m", "256M"])
        a.wait_monitor()
        kv = KvClient(a.console)
        kv.wait_ready()
        out.step("boot", node="node-a", pid=a.pid, ms=round((time.monotonic() - t0) * 1000))
        keys = {"key%06d" % i: "value-%d-%d" % (i, i * 7919 % 100003) for i in range(nkeys)}
        t = time.monotonic()
        replies = kv.pipeline(["SET %s %s" % kv_ for kv_ in keys.items()])
        acked = sum(1 for r in replies if r == "OK")
        out.step("write", keys=acked, ms=round((time.monotonic() - t) * 1000))
        kv.close()
        t = time.monotonic()
        a.qmp("migrate", {"uri": "file:%s" % snap})
        mig = wait_until(a, "query-migrate", lambda d: d["status"] in ("completed", "failed"),
                         "the save", timeout=120)
        if mig["status"] != "completed":
            out.step("save", error=mig.get("error-desc"))
            return False
        out.step("save", file=snap, bytes=os.path.getsize(snap),
                 ms=round((time.monotonic() - t) * 1000), status=a.qmp("query-status")["status"])
        a.stop()
        t = time.monotonic()
        b = nodes.start("node-b", ["--incoming", "file:%s" % snap])
        b.wait_monitor()
        kv = KvClient(b.console)
        kv.wait_ready()
        out.step("restore", node="node-b", pid=b.pid, ms=round((time.monotonic() - t) * 1000))
        replies = kv.pipeline(["GET %s" % k for k in keys])
        missing = [k for k, r in zip(keys, replies) if r != keys[k]]
        count = kv.request("COUNT")
        more = kv.pipeline(["SET extra%d %d" % (i, i) for i in range(100)])
        count2 = kv.request("COUNT")
        kv.close()
        ok = not missing and acked == nkeys and count == str(nkeys) and \
            all(r == "OK" for r in more) and count2 == str(nkeys + 100)
        out.step("summary", ok=ok, keys_written=acked, keys_checked=len(keys),
                 keys_missing=len(missing), count_after_restore=count, count_after_more=count2)
        return ok


# ---- colocore demo --auto: failover and re-protection decided by an etcd arbiter -----

def _protected(st):
    a = st.get("arbiter") or {}
    return st["mode"] == "primary" and a.get("pair-recorded") and a.get("may-release")


def run_auto(delay_ms, seconds, out, ttl_ms=1000):
    """Three nodes on loopback and an etcd; after the start nobody types a COLO command."""
    with NodeSet() as nodes:
        etcd = EtcdServer(os.path.join(nodes.workdir, "etcd-data"))
        try:
            etcd.start()
            key = "/demo/kvstore"
            arb = "etcd:%s,key=%s,ttl=%d,protect=auto" % (etcd.url, key, ttl_ms)
            out.step("etcd", url=etcd.url, pid=etcd.proc.pid, key=key, ttl_ms=ttl_ms)

            def standby(name):
                n = nodes.start(name, ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % free_port(),
                                       "--arbiter", arb + ",role=standby"])
                n.wait_monitor()
                return n
            t0 = time.monotonic()
            a = nodes.start("node-a", ["--kernel", "kvstore", "-m", "256M", "--arbiter", arb])
            a.wait_monitor()
            a.qmp("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})
            out.step("serving", node="node-a", pid=a.pid, holds=key)
            b = standby("node-b")
            wait_until(a, "query-colo-status", _protected, "protection", timeout=60)
            out.step("protected", primary="node-a", secondary="node-b", by="protect=auto",
                     ms=round((time.monotonic() - t0) * 1000))
            acked = {}
            ok = True
            primary, secondary = a, b
            for round_no in (1, 2):
                writer = KeyWriter([primary.console], batch=32, prefix="r%dk" % round_no)
                writer.start()
                time.sleep(seconds / 2)
                primary.kill(signal.SIGKILL)
                t_kill = time.monotonic()
                writer.stop()
                acked.update(writer.acked)
                out.step("crash", killed=primary.name, signal="SIGKILL", keys_acked=len(acked))
                kv, first = _first_answer(secondary.console)
                st = secondary.qmp("query-colo-status")
                out.step("failover", node=secondary.name, automatic=True,
                         first_answer_ms=round((first - t_kill) * 1000, 1),
                         arbiter=st["arbiter"]["state"], holds=st["arbiter"]["holder"])
                keys = list(acked)
                replies = kv.pipeline(["GET %s" % k for k in keys], window=512) if keys else []
                lost = [k for k, r in zip(keys, replies) if r != acked[k]]
                kv.close()
                out.step("check", node=secondary.name, keys_acknowledged=len(keys),
                         keys_lost=len(lost))
                ok = ok and not lost and bool(keys)
                if round_no == 1:
                    # the dead host's supervisor brings it back as a standby (contrib/systemd)
                    spare = standby("node-c")
                    t = time.monotonic()
                    wait_until(secondary, "query-colo-status", _protected, "re-protection",
                               timeout=60)
                    out.step("reprotected", primary=secondary.name, secondary=spare.name,
                             by="protect=auto", ms=round((time.monotonic() - t) * 1000))
                    primary, secondary = secondary, spare
            out.step("summary", ok=ok, failovers=2, operator_commands=0,
                     keys_acknowledged=len(acked))
            return ok
        finally:
            etcd.stop()
