"""The `colocore` command: run a node, the demo, the monitor client, benchmarks."""
import argparse
import asyncio
import logging
import sys

from colocore.errors import ColocoreError
from colocore.tools.bench import BENCHMARKS


def _run_parser(sub):
    p = sub.add_parser("run", help="run a guest (a colocore node)")
    p.add_argument("--kernel", help="kvstore, dirtier, kvnet, or a path to a Multiboot v1 ELF32 image")
    p.add_argument("--append", default="", help="the multiboot command line")
    p.add_argument("-m", default=None, help="guest memory, e.g. 256M (default 256M)")
    p.add_argument("--console", help="chardev of the virtio console (the guest's service)")
    p.add_argument("--serial", help="chardev of COM1 (default: the node's log)")
    p.add_argument("--monitor", help="chardev of the HMP monitor")
    p.add_argument("--qmp", help="chardev of the QMP (JSON) monitor, e.g. unix:PATH,server=on,wait=off")
    p.add_argument("-S", action="store_true", help="do not start the guest (cont starts it)")
    p.add_argument("--incoming", help="file:PATH (restore a saved guest), tcp:HOST:PORT "
                   "(wait for a live migration / become a COLO secondary) or defer "
                   "(migrate_incoming tcp:HOST:PORT later, after tls-creds)")
    p.add_argument("--object", action="append", metavar="TYPE,id=ID,...",
                   help="tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off] "
                        "or authz-simple,id=ID,identity=DN|sha256:FINGERPRINT (repeatable)")
    p.add_argument("--name", help="the node's name (logs, events)")
    p.add_argument("--nic", metavar="tap,ifname=NAME[,mac=MAC][,br=BRIDGE][,mirror=LINK]",
                   help="a virtio-net card on tap NAME (created if missing, attached to BRIDGE, "
                        "brought up; removed at exit if this node created it). mirror=LINK: "
                        "the COLO mirror link toward the other host (a primary mirrors the "
                        "frames toward its guest there; a secondary logs them and replays "
                        "them at a takeover; an --incoming node joins BRIDGE only when it "
                        "serves)")
    p.add_argument("--colo-verify", action="store_true",
                   help="debug: compare page hashes of secondary and primary at every checkpoint")
    p.add_argument("--stats-file", metavar="PATH",
                   help="append one JSON line per COLO checkpoint (pause, pages, bytes) to PATH")
    p.add_argument("--arbiter", metavar="etcd:URL,key=KEY[,ttl=MS][,role=serve|standby][,protect=auto|manual]",
                   help="let an etcd lease on KEY decide who serves: automatic failover "
                        "without split brain, standbys, re-protection (README: Arbiter)")
    p.add_argument("--log-level", default="info")
    return p


def _setup_logging(level, name=None):
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s " + (name or "colocore") + " %(levelname)s %(message)s",
                        stream=sys.stderr)


def cmd_run(args):
    from colocore.control.node import Node
    _setup_logging(args.log_level, args.name)
    try:
        node = Node(args)
        asyncio.run(node.run())
    except ColocoreError as exc:
        print("colocore: %s" % exc, file=sys.stderr)
        return getattr(exc, "exit_status", 1)
    except OSError as exc:
        # KvmError and friends already carry an actionable message
        print("colocore: %s" % (exc.strerror if exc.strerror else exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return node.exit_status


def cmd_protect(args):
    from colocore.clients.qmp import QmpClient
    try:
        c = QmpClient(args.address)
        try:
            out = c.execute("x-colo-protect", {"standby": args.standby} if args.standby else {})
        finally:
            c.close()
    except ColocoreError as exc:
        print("colocore protect: %s" % exc, file=sys.stderr)
        return 1
    print("protecting onto standby %s at %s" % (out["standby"], out["uri"]))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="colocore", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    d = sub.add_parser("demo", help="the main job: a protected guest survives the death of its host")
    d.add_argument("--keys", type=int, default=20000, help="stop writing after this many keys")
    d.add_argument("--seconds", type=float, default=4.0, help="how long the client writes")
    d.add_argument("--delay", type=int, default=100, help="x-checkpoint-delay in ms")
    d.add_argument("--snapshot", action="store_true",
                   help="the single-node job instead: save to a file, restore, check")
    d.add_argument("--json", action="store_true", help="one JSON object per step")
    d.add_argument("--auto", action="store_true",
                   help="under an etcd arbiter: automatic failover, then re-protection onto a standby")
    pr = sub.add_parser("protect", help="protect a node serving alone onto a registered standby")
    pr.add_argument("address", help="the serving node's QMP socket, unix:PATH or tcp:HOST:PORT")
    pr.add_argument("--standby", help="a standby's name or id (default: the one listed first)")
    mon = sub.add_parser("monitor", help="talk to a node's HMP monitor")
    mon.add_argument("address", help="unix:PATH or tcp:HOST:PORT")
    mon.add_argument("command", nargs="*")
    sc = sub.add_parser("script", help="run a scenario against nodes, headless (JSON lines out)")
    sc.add_argument("file", help="the scenario file, or - for stdin")
    sc.add_argument("--workdir", help="where started nodes keep sockets and logs (default: a temp dir)")
    b = sub.add_parser("bench", help="benchmarks (figures as ratios to a reference measured "
                                     "in the same run)")
    b.add_argument("what", choices=BENCHMARKS)
    b.add_argument("--json", action="store_true")
    b.add_argument("--trials", type=int, default=None,
                   help="failover: number of trials (20); partitions: cuts and heals (50)")
    b.add_argument("--seed", type=int, help="partitions: the random seed (default: random)")
    b.add_argument("--ttl", type=int, default=1000, help="partitions: the lease in ms")
    b.add_argument("--net", action="store_true",
                   help="failover: the networked guest, timed as a TCP client sees it "
                        "(with and without the replay of mirrored frames; --seed too)")
    b.add_argument("--hybrid", action="store_true",
                   help="failover --net: the pair in hybrid COLO (x-colo-hybrid) instead of "
                        "periodic; net: nothing (its hybrid rows always run)")
    b.add_argument("--capabilities", default="compress", metavar="CAP,...",
                   help="checkpoint: migration capabilities of the primary (default compress)")
    b.add_argument("--patterns", metavar="P,...", help="checkpoint: guest write patterns "
                   "(hot: a working set rewritten all the time; scan: wss new pages every "
                   "200 ms); default hot,scan")
    b.add_argument("--modes", metavar="M,...", help="checkpoint: pause modes of the primary: "
                   "hot, pre, then cow or copy, joined by + (copy is the engine before hot "
                   "pages and copy-on-write); default copy,hot+pre+cow")
    b.add_argument("--wss", metavar="N,...", help="checkpoint: working sets in pages "
                   "(default 0,100,1000,10000 for hot, 1000,10000 for scan)")
    b.add_argument("--delays", metavar="MS,...", help="checkpoint: x-checkpoint-delay values "
                   "(default 200,25)")
    b.add_argument("--cycles", type=int, help="checkpoint: cycles per row (default 3)")
    b.add_argument("--tls", choices=("both", "on", "off"), default="both",
                   help="checkpoint: plain and TLS pairs in the same run (both, the default), "
                        "or only one kind")
    b.add_argument("--no-harvest", action="store_true",
                   help="pipeline: skip the dirty-log harvest (needs /dev/kvm and 4 GiB)")
    b.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # smoke tests
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "demo":
        from colocore.tools import demo
        return demo.main(args)
    if args.cmd == "monitor":
        from colocore.clients import hmp
        return hmp.main(args)
    if args.cmd == "script":
        from colocore.tools import script
        return script.main(args)
    if args.cmd == "protect":
        return cmd_protect(args)
    if args.cmd == "bench":
        from colocore.tools import bench
        return bench.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
