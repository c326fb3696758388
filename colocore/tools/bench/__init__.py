"""`colocore bench ...`: the figures a user picks a fault-tolerance engine by, measured on
real guests, next to a reference measured in the same run (memcpy, the unprotected guest).

    pipeline    the hot path's codecs and the dirty-log harvest (pipeline.py)
    checkpoint  pause, latency and guest progress under COLO (checkpoint.py)
    failover    x_colo_lost_heartbeat to the first answer (failover.py)
    migrate     initial live migration (migrate.py)
    net         the networked guest (kvnet) against redis-server (net.py)
    partitions  an etcd-arbitrated service cut apart at random: split brain, lost writes,
                failover time (partitions.py; needs root for network namespaces)

Progress goes to stderr so `--json` stdout stays clean. Every node is started through a
NodeSet and stopped by pid when the benchmark ends, fails, or is interrupted (Ctrl-C,
SIGTERM).
"""
import importlib
import json
import os
import signal
import sys

from colocore.errors import ColocoreError
from colocore.tools.bench.common import host_line, machine_description, say

BENCHMARKS = ("pipeline", "checkpoint", "failover", "migrate", "net", "partitions")


def main(args):
    """Run `args.what`; print its table (the host first) or JSON (the host kernel in
    every row)."""
    bench = importlib.import_module("colocore.tools.bench." + args.what)

    main_pid = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != main_pid:
            # a forked helper (pyroute2's NetNS runs one per namespace it enters) inherits
            # this handler and our stack: unwinding it there would run our cleanups in the
            # child, which deletes the lab's namespaces under the benchmark. End it quietly.
            os._exit(128 + signum)
        raise KeyboardInterrupt        # SIGTERM (e.g. `timeout`) cleans up like Ctrl-C
    signal.signal(signal.SIGTERM, terminated)
    try:
        data = bench.run(args)
    except ColocoreError as exc:
        print("colocore bench %s: %s" % (args.what, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("interrupted: every node this benchmark started was stopped")
        return 130
    host = machine_description()
    if args.json:
        for row in data if isinstance(data, list) else [data]:
            row["kernel"] = host["kernel"]
        print(json.dumps(data))
    else:
        print(host_line(host))
        print(bench.format(data))
    return 0
