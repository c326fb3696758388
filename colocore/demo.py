"""`colocore demo`: boot kvstore, write keys, save to a file, restore in a new process,
check every key, keep writing. Exit 0 only if nothing was lost."""
import json
import os
import sys
import time

from .errors import ColocoreError
from .kvclient import KvClient
from .procs import NodeSet


def main(args):
    out = _Printer(args.json)
    try:
        ok = run(args.keys, out)
    except ColocoreError as exc:
        out.step("error", error=str(exc))
        return 1
    return 0 if ok else 1


class _Printer:
    def __init__(self, as_json):
        self.as_json = as_json

    def step(self, name, **fields):
        if self.as_json:
            print(json.dumps(dict(step=name, **fields)), flush=True)
        else:
            extra = " ".join("%s=%s" % kv for kv in fields.items())
            print("%-10s %s" % (name, extra), flush=True)


def run(nkeys, out):
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
        res = a.hmp("migrate file:%s" % snap, timeout=120)
        if res:
            out.step("save", error=res)
            return False
        status = a.hmp("info status")
        out.step("save", file=snap, bytes=os.path.getsize(snap),
                 ms=round((time.monotonic() - t) * 1000), status=status)
        a.hmp("quit")
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
