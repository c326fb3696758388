"""`colocore bench net`: the networked guest (kvnet) under redis-benchmark, next to
Debian's redis-server measured in the same run and the same topology.

Topology (network namespaces made with pyroute2, deleted at the end): a client host and
two server hosts on one bridge. The guest's node runs in host `h` with its tap on the
bridge; redis-server runs in host `r`, whose veth is on the same bridge. So each request
crosses the client's veth, the bridge, and one port (the tap, or redis-server's veth).

Rows (`--json`: {"rows", "frame_path", "kernel"}; every row has the kernel too): target
(guest | redis-server), mode (unprotected | periodic | hybrid), test
(SET | GET), pipeline (1 | 16), clients, requests, rps, p50_ms, p99_ms,
ratio_to_reference (rps over redis-server's for the same test and pipeline). Guest rows
carry a profile of the run: vCPU exits and frames per 1,000 requests, frames per exit,
and CPU seconds of the node and of the client.

Periodic rows: the same guest protected by COLO (a secondary in host `s`, joined to `h`
by a replication link and a mirror link, as in colocore.tools.colo_lab) at
x-checkpoint-delay 200 and 25 ms, with checkpoint_delay_ms, checkpoints taken during the
run, ratio_to_unprotected (rps over the guest's own unprotected rps in this run). Every
reply waits for the next checkpoint (output commit), so a client on one connection gets
about one reply per pipeline per checkpoint: fewer requests are run in those rows.

`frame_path`: the engine's frame path alone (colocore_ext.virtq.NetPath between a
SEQPACKET socket pair and rings in a buffer), ns per frame for receive and transmit
batches, against the same work done by a plain Python loop (one os.read/os.write and a
ring update per frame) in the same run.
"""
import ctypes
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import time

from colocore.errors import ColocoreError
from colocore.tools.bench.common import say
from colocore.tools.netlab import Lab
from colocore.tools.procs import NodeSet

GUEST_IP = "10.0.0.2"
REF_IP = "10.0.0.3"
PORT = 6379
CLIENTS = 50
TESTS = ("set", "get")
PIPELINES = (1, 16)
REQUESTS = {1: 100_000, 16: 400_000}
QUICK_REQUESTS = {1: 5_000, 16: 20_000}
DELAYS = (200, 25)
# (x-checkpoint-delay, pipeline) -> requests: a run of ~5-10 s each
PERIODIC_REQUESTS = {(200, 1): 2_000, (200, 16): 20_000, (25, 1): 10_000, (25, 16): 80_000}
GUEST_MAC = "52:54:00:0c:0c:02"
# hybrid rows: the periodic checkpoint is only a backstop there
HYBRID_DELAY = 2000


def _pdeathsig():
    """Children die with the benchmark (PR_SET_PDEATHSIG survives `ip netns exec`'s exec)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


def _cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _nic_counters(node):
    n = node.qmp("x-query-net")
    return {"rx": n["counters"]["rx_frames"], "tx": n["counters"]["tx_frames"],
            "exits": n["vcpu-exits"], "waits": n["waits"]}


def _benchmark(prefix, ip, pipeline, requests):
    """redis-benchmark -t set,get; returns ({test: (rps, p50, p99)}, client CPU seconds)."""
    argv = prefix + ["redis-benchmark", "-h", ip, "-p", str(PORT), "-t", ",".join(TESTS),
                     "-c", str(CLIENTS), "-P", str(pipeline), "-n", str(requests), "--csv"]
    before = os.times()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, preexec_fn=_pdeathsig)
    after = os.times()
    if p.returncode != 0:
        raise ColocoreError("redis-benchmark against %s failed: %s" % (ip, p.stderr.strip()[-300:]))
    out = {}
    for line in p.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 7 and cells[0] in ("SET", "GET"):
            out[cells[0]] = (float(cells[1]), float(cells[4]), float(cells[6]))
    if len(out) != len(TESTS):
        raise ColocoreError("redis-benchmark gave no CSV for %s: %r" % (ip, p.stdout[-300:]))
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return out, cpu


def _wait_ping(prefix, ip, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        p = subprocess.run(prefix + ["redis-cli", "-h", ip, "-p", str(PORT), "PING"],
                           capture_output=True, text=True, timeout=10)
        if p.stdout.strip() == "PONG":
            return
        if time.monotonic() > deadline:
            raise ColocoreError("%s at %s never answered PING: %s" % (what, ip, p.stderr.strip()))
        time.sleep(0.2)


def bench_net(quick=False):
    for tool in ("redis-benchmark", "redis-cli", "redis-server"):
        if shutil.which(tool) is None:
            raise ColocoreError("%s is missing: apt-get install redis-tools redis-server" % tool)
    if os.geteuid() != 0:
        raise ColocoreError("bench net builds network namespaces: run it as root")
    requests = QUICK_REQUESTS if quick else REQUESTS
    rows = []
    with Lab("ccbn") as lab, NodeSet() as nodes:
        h = lab.host("h", "10.77.0.1")          # the address of its replication link
        s = lab.host("s", "10.77.0.2")          # the COLO secondary's host
        c = lab.host("c", "10.0.0.1")
        r = lab.host("r", REF_IP)
        lab.bridge(h, "br0", "10.0.0.9")
        lab.wire(c, h, b_bridge="br0")
        lab.wire(r, h, b_bridge="br0")
        lab.link(h, s)
        mirror_h, mirror_s = lab.plain_link(h, s)
        say("starting the kvnet guest and redis-server")
        node = nodes.start("guest", ["--kernel", "kvnet", "-m", "256M", "--nic",
                                     "tap,ifname=tapbn,mac=%s,br=br0,mirror=%s" % (GUEST_MAC,
                                                                                  mirror_h),
                                     "--append", "ip=%s/24 port=%d" % (GUEST_IP, PORT)],
                           prefix=lab.exec_prefix(h))
        ref = subprocess.Popen(lab.exec_prefix(r) + [
            "redis-server", "--port", str(PORT), "--bind", REF_IP, "--save", "",
            "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        try:
            client = lab.exec_prefix(c)
            _wait_ping(client, GUEST_IP, "the kvnet guest")
            _wait_ping(client, REF_IP, "redis-server")
            for pipeline in PIPELINES:
                n = requests[pipeline]
                say("redis-benchmark -c %d -P %d -n %d: redis-server", CLIENTS, pipeline, n)
                ref_res, ref_cpu = _benchmark(client, REF_IP, pipeline, n)
                say("redis-benchmark -c %d -P %d -n %d: guest", CLIENTS, pipeline, n)
                before, node_cpu0 = _nic_counters(node), _cpu_s(node.pid)
                res, cli_cpu = _benchmark(client, GUEST_IP, pipeline, n)
                after, node_cpu1 = _nic_counters(node), _cpu_s(node.pid)
                total = n * len(TESTS)
                exits = after["exits"] - before["exits"]
                frames = (after["rx"] - before["rx"]) + (after["tx"] - before["tx"])
                profile = {"exits_per_1k_requests": round(1000.0 * exits / total, 2),
                           "frames_per_1k_requests": round(1000.0 * frames / total, 2),
                           "frames_per_exit": round(frames / exits, 2) if exits else 0.0,
                           "node_cpu_s": round(node_cpu1 - node_cpu0, 2),
                           "client_cpu_s": round(cli_cpu, 2)}
                for test in ("SET", "GET"):
                    for target, (rps, p50, p99), extra in (
                            ("redis-server", ref_res[test], {"client_cpu_s": round(ref_cpu, 2)}),
                            ("guest", res[test], profile)):
                        rows.append(dict({"target": target, "mode": "unprotected", "test": test,
                                          "pipeline": pipeline, "clients": CLIENTS,
                                          "requests": n, "rps": rps, "p50_ms": p50,
                                          "p99_ms": p99,
                                          "ratio_to_reference": round(rps / ref_res[test][0], 3)},
                                         **extra))
            rows += _periodic_rows(lab, nodes, node, client, s, mirror_s, rows, quick)
            rows += _hybrid_rows(lab, nodes, node, client, s, mirror_s, rows, quick)
        finally:
            if ref.poll() is None:
                ref.terminate()
                try:
                    ref.wait(10)
                except subprocess.TimeoutExpired:
                    ref.kill()
                    ref.wait(10)
    return rows


def _periodic_rows(lab, nodes, node, client, s, mirror_s, rows, quick):
    """The guest under COLO (periodic) at each of DELAYS; COLO ends with the secondary."""
    from colocore.tools.procs import protect, wait_until
    uri = "tcp:10.77.0.2:5555"
    sec = nodes.start("secondary", ["-m", "256M", "--incoming", uri, "--nic",
                                    "tap,ifname=tapbs,mac=%s,mirror=%s" % (GUEST_MAC, mirror_s)],
                      prefix=lab.exec_prefix(s))
    sec.wait_monitor()
    say("protecting the guest (COLO, periodic)")
    protect(node, uri, DELAYS[0])
    out = []
    ref = {(r["test"], r["pipeline"]): r["rps"] for r in rows if r["target"] == "redis-server"}
    alone = {(r["test"], r["pipeline"]): r["rps"] for r in rows if r["target"] == "guest"}
    for delay in DELAYS:
        node.qmp("migrate-set-parameters", {"x-checkpoint-delay": delay})
        for pipeline in PIPELINES:
            n = PERIODIC_REQUESTS[(delay, pipeline)] // (10 if quick else 1)
            say("redis-benchmark -c %d -P %d -n %d: guest under COLO, x-checkpoint-delay %d ms",
                CLIENTS, pipeline, n, delay)
            before, node_cpu0 = _nic_counters(node), _cpu_s(node.pid)
            cp0 = node.qmp("query-migrate")["x-colo"]["checkpoints"]
            res, cli_cpu = _benchmark(client, GUEST_IP, pipeline, n)
            colo = node.qmp("query-migrate")["x-colo"]
            after, node_cpu1 = _nic_counters(node), _cpu_s(node.pid)
            total = n * len(TESTS)
            frames = (after["rx"] - before["rx"]) + (after["tx"] - before["tx"])
            for test in ("SET", "GET"):
                rps, p50, p99 = res[test]
                out.append({"target": "guest", "mode": "periodic", "checkpoint_delay_ms": delay,
                            "test": test, "pipeline": pipeline, "clients": CLIENTS,
                            "requests": n, "rps": rps, "p50_ms": p50, "p99_ms": p99,
                            "ratio_to_reference": round(rps / ref[(test, pipeline)], 3),
                            "ratio_to_unprotected": round(rps / alone[(test, pipeline)], 3),
                            "checkpoints": colo["checkpoints"] - cp0,
                            "mean_pause_ms": colo["mean-pause-ms"],
                            "frames_per_1k_requests": round(1000.0 * frames / total, 2),
                            "node_cpu_s": round(node_cpu1 - node_cpu0, 2),
                            "client_cpu_s": round(cli_cpu, 2)})
    sec.kill()                          # the primary leaves COLO and serves alone
    wait_until(node, "query-colo-status", lambda d: d["failover-state"] == "completed",
               "the guest serving alone", timeout=20)
    return out


def _hybrid_rows(lab, nodes, node, client, s, mirror_s, rows, quick):
    """The guest under hybrid COLO (x-colo-hybrid) with a fresh secondary: replies leave
    when the secondary's guest produced the same, checkpoints come from divergence (by
    cause) or the HYBRID_DELAY backstop."""
    from colocore.tools.procs import protect, wait_until
    uri = "tcp:10.77.0.2:5556"
    sec = nodes.start("secondary-hybrid", ["-m", "256M", "--incoming", uri, "--nic",
                                           "tap,ifname=tapbh,mac=%s,mirror=%s" % (GUEST_MAC, mirror_s)],
                      prefix=lab.exec_prefix(s))
    sec.wait_monitor()
    say("protecting the guest (COLO, hybrid, x-checkpoint-delay %d ms backstop)", HYBRID_DELAY)
    protect(node, uri, HYBRID_DELAY, capabilities=("x-colo-hybrid",))
    out = []
    ref = {(r["test"], r["pipeline"]): r["rps"] for r in rows if r["target"] == "redis-server"}
    alone = {(r["test"], r["pipeline"]): r for r in rows
             if r["target"] == "guest" and r["mode"] == "unprotected"}
    for pipeline in PIPELINES:
        n = (QUICK_REQUESTS if quick else REQUESTS)[pipeline]
        say("redis-benchmark -c %d -P %d -n %d: guest under hybrid COLO", CLIENTS, pipeline, n)
        before, node_cpu0 = _nic_counters(node), _cpu_s(node.pid)
        st0 = node.qmp("query-colo-status")
        res, cli_cpu = _benchmark(client, GUEST_IP, pipeline, n)
        st1 = node.qmp("query-colo-status")
        after, node_cpu1 = _nic_counters(node), _cpu_s(node.pid)
        total = n * len(TESTS)
        frames = (after["rx"] - before["rx"]) + (after["tx"] - before["tx"])
        c0, c1 = st0["net"]["compare"], st1["net"]["compare"]
        causes = {k: st1["checkpoint-causes"][k] - st0["checkpoint-causes"][k]
                  for k in st1["checkpoint-causes"]}
        for test in ("SET", "GET"):
            rps, p50, p99 = res[test]
            base = alone[(test, pipeline)]
            out.append({"target": "guest", "mode": "hybrid", "checkpoint_delay_ms": HYBRID_DELAY,
                        "test": test, "pipeline": pipeline, "clients": CLIENTS,
                        "requests": n, "rps": rps, "p50_ms": p50, "p99_ms": p99,
                        "ratio_to_reference": round(rps / ref[(test, pipeline)], 3),
                        "ratio_to_unprotected": round(rps / base["rps"], 3),
                        "p50_to_unprotected": round(p50 / base["p50_ms"], 3) if base["p50_ms"] else None,
                        "checkpoints": st1["checkpoints"] - st0["checkpoints"],
                        "checkpoint_causes": causes,
                        "frames_compared": c1["compared"] - c0["compared"],
                        "frames_matched": c1["matched"] - c0["matched"],
                        "frames_mismatched": c1["mismatched"] - c0["mismatched"],
                        "frames_released_on_match": c1["released"] - c0["released"],
                        "frames_per_1k_requests": round(1000.0 * frames / total, 2),
                        "node_cpu_s": round(node_cpu1 - node_cpu0, 2),
                        "client_cpu_s": round(cli_cpu, 2)})
    sec.kill()
    wait_until(node, "query-colo-status", lambda d: d["failover-state"] == "completed",
               "the guest serving alone", timeout=20)
    return out


# ---- the frame path alone --------------------------------------------------------------

class RingDriver:
    """The guest's side of one split virtqueue in a buffer (the bench and unit tests)."""

    def __init__(self, ram, base, num=256):
        from colocore_ext import virtq
        self.ram, self.num = ram, num
        self.desc, self.avail, self.used = base, base + 16 * num, base + 16 * num + 4096
        self.q = virtq.Virtqueue()
        self.q.num, self.q.ready = num, 1
        self.q.desc, self.q.driver, self.q.device = self.desc, self.avail, self.used
        self.avail_idx = self.last_used = self.next_desc = 0

    def post(self, bufs):
        """bufs: [(gpa, len, writable)] as one chain; returns its head."""
        head = self.next_desc % self.num
        self.next_desc += len(bufs)
        for k, (gpa, length, w) in enumerate(bufs):
            i = (head + k) % self.num
            nxt = (i + 1) % self.num if k + 1 < len(bufs) else 0
            flags = (1 if k + 1 < len(bufs) else 0) | (2 if w else 0)
            struct.pack_into("<QIHH", self.ram, self.desc + 16 * i, gpa, length, flags, nxt)
        struct.pack_into("<H", self.ram, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.ram, self.avail + 2, self.avail_idx & 0xFFFF)
        return head

    def used_entries(self):
        idx = struct.unpack_from("<H", self.ram, self.used + 2)[0]
        out = []
        while self.last_used != idx & 0xFFFF:
            out.append(struct.unpack_from("<II", self.ram, self.used + 4 + 8 * (self.last_used % self.num)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def _naive_rx(fd, ram, drv, nframes):
    """What a Python device would do per frame: read, copy into the buffer, used entry."""
    got = 0
    while got < nframes:
        try:
            data = os.read(fd, 2048)
        except BlockingIOError:
            break
        head = struct.unpack_from("<H", ram, drv.avail + 4 + 2 * (got % drv.num))[0]
        addr, length = struct.unpack_from("<QI", ram, drv.desc + 16 * head)
        ram[addr:addr + 12] = bytes(12)
        ram[addr + 12:addr + 12 + len(data)] = data
        struct.pack_into("<II", ram, drv.used + 4 + 8 * (got % drv.num), head, 12 + len(data))
        got += 1
    struct.pack_into("<H", ram, drv.used + 2, got)
    return got


def bench_frame_path(batches=200, batch=64, frame_len=100):
    from colocore_ext import virtq
    ram = bytearray(4 << 20)
    bufs = 1 << 20
    results = []
    for direction in ("rx", "tx"):
        timings = {"colocore": 0.0, "python-loop": 0.0}
        for impl in ("colocore", "python-loop"):
            host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            tap.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            tap.setblocking(False)
            try:
                for _ in range(batches):
                    rx, tx = RingDriver(ram, 0), RingDriver(ram, 0x8000)
                    out = virtq.FrameQueue()
                    path = virtq.NetPath(virtq.GuestRam(memoryview(ram)), rx.q, tx.q, out)
                    if direction == "rx":
                        for k in range(batch):
                            rx.post([(bufs + 2048 * k, 2048, True)])
                        frame = b"f" * frame_len
                        for _ in range(batch):
                            host.send(frame)
                        t0 = time.perf_counter()
                        n = path.rx_fill(tap.fileno()) if impl == "colocore" else \
                            _naive_rx(tap.fileno(), ram, rx, batch)
                        timings[impl] += time.perf_counter() - t0
                    else:
                        for k in range(batch):
                            ram[bufs + 2048 * k:bufs + 2048 * k + 12 + frame_len] = bytes(12 + frame_len)
                            tx.post([(bufs + 2048 * k, 12 + frame_len, False)])
                        t0 = time.perf_counter()
                        if impl == "colocore":
                            n = path.tx_drain()
                            out.flush(tap.fileno())
                        else:
                            n = 0
                            for k in range(batch):
                                addr, length = struct.unpack_from("<QI", ram, tx.desc + 16 * k)
                                os.write(tap.fileno(), bytes(ram[addr + 12:addr + length]))
                                struct.pack_into("<II", ram, tx.used + 4 + 8 * k, k, 0)
                                n += 1
                            struct.pack_into("<H", ram, tx.used + 2, n)
                        timings[impl] += time.perf_counter() - t0
                        for _ in range(n):
                            host.recv(4096)
                    if n != batch:
                        raise ColocoreError("frame path bench: %d of %d frames moved" % (n, batch))
            finally:
                host.close()
                tap.close()
        total = batches * batch
        ns = {k: v / total * 1e9 for k, v in timings.items()}
        results.append({"direction": direction, "batch": batch, "frame_bytes": frame_len,
                        "ns_per_frame": round(ns["colocore"], 1),
                        "python_loop_ns_per_frame": round(ns["python-loop"], 1),
                        "speedup": round(ns["python-loop"] / ns["colocore"], 2)})
    return results


def format(data):
    rows, path = data["rows"], data["frame_path"]
    lines = ["kvnet guest vs redis-server, same topology, redis-benchmark -c %d" % CLIENTS, "",
             "| target | mode | delay ms | test | -P | rps | p50 ms | p99 ms | ratio | "
             "vs unprotected | exits/1k req | frames/exit | checkpoints |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cps = r.get("checkpoints", "")
        if "checkpoint_causes" in r:
            cps = "%s (%s)" % (cps, ", ".join("%s %d" % kv for kv in r["checkpoint_causes"].items() if kv[1]))
        lines.append("| %s | %s | %s | %s | %d | %.0f | %.3f | %.3f | %.3f | %s | %s | %s | %s |" % (
            r["target"], r["mode"], r.get("checkpoint_delay_ms", ""), r["test"], r["pipeline"],
            r["rps"], r["p50_ms"], r["p99_ms"], r["ratio_to_reference"],
            r.get("ratio_to_unprotected", ""), r.get("exits_per_1k_requests", ""),
            r.get("frames_per_exit", ""), cps))
    hyb = [r for r in rows if r["mode"] == "hybrid"]
    if hyb:
        lines += ["", "hybrid: frames compared / matched / mismatched / released on a match:"]
        for r in hyb[::2]:
            lines.append("  -P %d: %d / %d / %d / %d; checkpoints %s" % (
                r["pipeline"], r["frames_compared"], r["frames_matched"], r["frames_mismatched"],
                r["frames_released_on_match"], r["checkpoint_causes"]))
    lines += ["", "frame path (ns per frame, batches of %d):" % path[0]["batch"]]
    for p in path:
        lines.append("  %s: %.0f ns in colocore_ext.virtq, %.0f ns as a Python loop (x%.1f)" % (
            p["direction"], p["ns_per_frame"], p["python_loop_ns_per_frame"], p["speedup"]))
    return "\n".join(lines)


def run(args):
    path = bench_frame_path(batches=20 if args.quick else 200)
    rows = bench_net(quick=args.quick)
    for r in rows:
        r["kernel"] = platform.release()       # the host kernel in every row
    return {"rows": rows, "frame_path": path}
