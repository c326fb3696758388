"""`colocore bench checkpoint`: pause, latency and guest progress under COLO.

A primary/secondary pair on loopback runs the `dirtier` guest, in one of two write
patterns (`pattern`): hot (it rewrites `wss` pages per pass and prints
`progress <passes> <guest_clock_ns>`) or scan (every 200 ms it writes the next `wss` pages
of a ring over its RAM, pages it did not write recently, and counts units of
computation), with the primary in a pause mode (`mode`, colo/checkpoint.py pause_mode:
copy is the engine before hot pages and copy-on-write, hot+pre+cow its default) and a
plain or a TLS channel (`tls`: TLS pairs run in the default mode, hot pattern). Per
pattern and working set, cycles of: the guest unprotected, protected at each
x-checkpoint-delay, unprotected again (after a failover on the primary), each mode and
channel taking its turn within a cycle, so protected and unprotected windows alternate
and share a noisy machine's noise. Pause and latency come from every checkpoint
(`colocore run --stats-file`); the limit is a memcpy of as many pages, timed in this
process in the same run. The guest clock is host CLOCK_MONOTONIC, so windows are chosen
on time.monotonic_ns() and rates are computed from the numbers inside the console lines:
protected output is held until the secondary acknowledged the checkpoint (output
commit) and arrives in bursts.
"""
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time

from colocore.clients import connect
from colocore.errors import ColocoreError
from colocore.migration.params import pause_mode_parameters
from colocore.tools.bench.common import memcpy_ms, say
from colocore.tools.pki import make_pki
from colocore.tools.procs import NodeSet, free_port, protect, wait_until
from colocore.tools.stats import percentile

WSS = (0, 100, 1000, 10000)
DELAYS = (200, 25)
PATTERNS = ("hot", "scan")
# copy: the engine before issue 15 (every dirty page copied and re-protected in the
# pause); hot+pre+cow: the engine's default
MODES = ("copy", "hot+pre+cow")
DEFAULT_MODE = "hot+pre+cow"
SCAN_WSS = (1000, 10000)


class ConsoleLines(threading.Thread):
    """Reads a node's console in the background; keeps `progress` lines as (passes, ns)."""

    def __init__(self, address):
        super().__init__(name="console-reader", daemon=True)
        self.sock = connect(address, 10.0)
        self.sock.settimeout(None)
        self.progress = []
        self.cond = threading.Condition()
        self.start()

    def run(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            got = []
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and parts[0] == b"progress":
                    got.append((int(parts[1]), int(parts[2])))
            if got:
                with self.cond:
                    self.progress.extend(got)
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_past(self, ns, timeout=10.0):
        """Wait until a line stamped after `ns` arrived (held output comes late)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.progress or self.progress[-1][1] <= ns:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    raise ColocoreError("the dirtier guest printed no progress for %.0f s" % timeout)
                self.cond.wait(left)

    def rate(self, start_ns, end_ns):
        """Passes per second of guest time between the first and last line in the window."""
        with self.cond:
            inside = [p for p in self.progress if start_ns <= p[1] <= end_ns]
        if len(inside) < 2:
            raise ColocoreError("too few progress lines in a %.1f s window" % ((end_ns - start_ns) / 1e9))
        (p0, t0), (p1, t1) = inside[0], inside[-1]
        return (p1 - p0) / ((t1 - t0) / 1e9)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def read_stats(path, t_from, t_to):
    """Checkpoint records (--stats-file) whose event time lies in [t_from, t_to]."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue            # a line being written right now
                if t_from <= r["time"] <= t_to:
                    rows.append(r)
    except FileNotFoundError:
        pass
    return rows


def _unprotected_window(console, seconds):
    a = time.monotonic_ns()
    time.sleep(seconds)
    b = time.monotonic_ns()
    console.wait_past(b)
    return console.rate(a, b)


def _guest_args(pattern, wss):
    """The dirtier's command line for a pattern (scan: wss new pages every 200 ms)."""
    return "wss=%d pattern=%s" % (wss, pattern) + (" interval=200" if pattern == "scan" else "")


def _settle(pri, delay_ms, limit_s=8.0):
    """After protect: the first checkpoints carry what the guest wrote during the initial
    migration (a scanning guest writes 40 MB/s), and while a checkpoint takes longer
    than the delay the next one carries more: wait until a checkpoint's latency is back
    under the delay (or `limit_s`), in every mode alike, before measuring."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        colo = pri.qmp("query-migrate").get("x-colo") or {}
        if colo.get("checkpoints", 0) >= 3 and colo.get("last-latency-ms", 1e9) < max(delay_ms, 50):
            return
        time.sleep(0.1)


def _start_pair(nodes, pattern, wss, mem, stats, tls_dirs):
    """A secondary waiting on loopback and a dirtier primary; with tls_dirs (a PKI from
    tools/pki.py) the channel is TLS with mutual authentication, as an operator sets it
    up: --incoming defer, tls-creds, then migrate-incoming."""
    uri = "tcp:127.0.0.1:%d" % free_port()
    pri_args = ["--kernel", "dirtier", "--append", _guest_args(pattern, wss), "-m", mem,
                "--stats-file", stats]
    if tls_dirs is None:
        sec = nodes.start("secondary", ["-m", mem, "--incoming", uri])
        pri = nodes.start("primary", pri_args)
        sec.wait_monitor()
        pri.wait_monitor()
        return sec, pri, uri
    sec = nodes.start("secondary", ["-m", mem, "--incoming", "defer", "--object",
                                    "tls-creds-x509,id=tls0,dir=%s,endpoint=server" % tls_dirs["server"]])
    pri = nodes.start("primary", pri_args + ["--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=client"
                                             % tls_dirs["client"]])
    sec.qmp("migrate-set-parameters", {"tls-creds": "tls0"})
    sec.qmp("migrate-incoming", {"uri": uri})
    pri.qmp("migrate-set-parameters", {"tls-creds": "tls0"})
    return sec, pri, uri


def _checkpoint_one_wss(pattern, wss, variants, delays, window_s, base_s, cycles, mem,
                        capabilities, pki_dir):
    """Cycles of U P200 P25 U, where U is unprotected and P protected at one delay: a
    fresh pair per cycle, the primary failing over at the end of it, so unprotected and
    protected windows of the same guest alternate and share the machine's noise. (One
    guest cannot be protected twice yet: see docs/benchmarks.md.) Within a cycle each
    variant (pause mode, TLS or plain) takes its turn, so they are compared in the same
    run."""
    base_rates = {v: [] for v in variants}
    protected = {(v, d): [] for v in variants for d in delays}   # passes/s per window
    checkpoints = {(v, d): [] for v in variants for d in delays}
    tls_dirs = make_pki(pki_dir) if any(tls for mode, tls in variants) else None
    for cycle in range(cycles):
        for v in variants:
            mode, tls = v
            _one_cycle(pattern, wss, mode, delays, window_s, base_s, cycle, cycles, mem,
                       capabilities, tls_dirs if tls else None, base_rates[v],
                       {d: protected[(v, d)] for d in delays},
                       {d: checkpoints[(v, d)] for d in delays})
    return base_rates, protected, checkpoints


def _one_cycle(pattern, wss, mode, delays, window_s, base_s, cycle, cycles, mem, capabilities,
               tls_dirs, base_rates, protected, checkpoints):
    label = "%s wss=%d %s%s" % (pattern, wss, mode, " tls" if tls_dirs else "")
    with NodeSet() as nodes:
        stats = os.path.join(nodes.workdir, "checkpoints.jsonl")
        sec, pri, uri = _start_pair(nodes, pattern, wss, mem, stats, tls_dirs)
        console = ConsoleLines(pri.console)
        try:
            console.wait_past(time.monotonic_ns())          # the guest runs
            time.sleep(0.3)
            say("checkpoint: %s (cycle %d/%d): unprotected %.0f s", label, cycle + 1,
                cycles, base_s)
            base_rates.append(_unprotected_window(console, base_s))
            protect(pri, uri, delays[0], capabilities, timeout=120, pause_mode=mode)
            if tls_dirs and not pri.qmp("query-migrate").get("x-channel", {}).get("authenticated"):
                raise ColocoreError("the TLS pair's channel is not authenticated")
            _settle(pri, delays[0])
            for n, delay in enumerate(delays):
                if n:
                    pri.qmp("migrate-set-parameters", {"x-checkpoint-delay": delay})
                time.sleep(max(0.5, 3 * delay / 1000.0))     # settle on the new rate
                say("checkpoint: %s delay=%d ms: protected %.0f s", label, delay, window_s)
                a, a_wall = time.monotonic_ns(), time.time()
                time.sleep(window_s)
                b, b_wall = time.monotonic_ns(), time.time()
                console.wait_past(b)
                protected[delay].append(console.rate(a, b))
                checkpoints[delay] += read_stats(stats, a_wall, b_wall)
            say("checkpoint: %s: failover on the primary, unprotected %.0f s", label, base_s)
            pri.qmp("x-colo-lost-heartbeat")
            wait_until(pri, "query-colo-status", lambda d: d["mode"] == "none", "COLO's end")
            sec.stop()
            time.sleep(0.3)
            base_rates.append(_unprotected_window(console, base_s))
        finally:
            console.close()


def bench_checkpoint(wss_list=WSS, delays=DELAYS, window_s=3.0, base_s=2.0, cycles=3,
                     mem="256M", capabilities=("compress",), tls_modes=(False, True),
                     tls_wss=None, patterns=PATTERNS, modes=MODES, scan_wss=SCAN_WSS):
    """tls_modes: plain and/or TLS pairs (rows carry `tls`; TLS runs in the engine's default
    pause mode, hot pattern); tls_wss: the working sets measured with TLS too (default:
    all of them); patterns, modes: the guest's write patterns and the primary's pause
    modes (rows carry `pattern` and `mode`)."""
    rows = []
    limits = {}
    with tempfile.TemporaryDirectory(prefix="colocore-pki-") as pki_dir:
        for pattern in patterns:
            for wss in (wss_list if pattern == "hot" else scan_wss):
                if wss not in limits:
                    say("checkpoint: wss=%d: memcpy reference", wss)
                    limits[wss] = memcpy_ms(wss)
                limit = limits[wss]
                variants = []
                for mode in modes:
                    if False in tls_modes:
                        variants.append((mode, False))
                    if True in tls_modes and mode == DEFAULT_MODE and pattern == "hot" and \
                            (tls_wss is None or wss in tls_wss):
                        variants.append((mode, True))
                if not variants:
                    continue
                base_rates, protected, checkpoints = _checkpoint_one_wss(
                    pattern, wss, variants, delays, window_s, base_s, cycles, mem,
                    capabilities, pki_dir)
                plain = {}
                for v in variants:
                    mode, tls = v
                    base = statistics.mean(base_rates[v])
                    for delay in delays:
                        row = _row(pattern, mode, wss, delay, tls, capabilities,
                                   checkpoints[(v, delay)], protected[(v, delay)],
                                   base_rates[v], base, limit, window_s, cycles)
                        if not tls:
                            plain[(mode, delay)] = row
                        elif (mode, delay) in plain:
                            # what TLS costs, against the plain pair of the same run
                            p = plain[(mode, delay)]
                            row["tls_pause_vs_plain"] = _ratio(row["pause_ms_p50"], p["pause_ms_p50"])
                            row["tls_latency_vs_plain"] = _ratio(row["latency_ms_p50"],
                                                                 p["latency_ms_p50"])
                            row["tls_progress_vs_plain"] = _ratio(row["progress_ratio"],
                                                                  p["progress_ratio"])
                        rows.append(row)
                        say("checkpoint: %s wss=%d %s delay=%d%s: pause p50 %.2f ms p99 %.2f ms "
                            "(memcpy %.3f ms), latency p50 %.2f ms, hot %d, wp faults %.1f, "
                            "%d B/checkpoint, progress %.3f", pattern, wss, mode, delay,
                            " tls" if tls else "", row["pause_ms_p50"], row["pause_ms_p99"],
                            limit, row["latency_ms_p50"], row["hot_pages"],
                            row["wp_faults_per_checkpoint"], row["bytes_per_checkpoint"],
                            row["progress_ratio"])
    return rows


def _ratio(a, b):
    return round(a / b, 3) if b else None


def _row(pattern, mode, wss, delay, tls, capabilities, cps, rates, base_rates, base, limit,
         window_s, cycles):
    if not cps:
        raise ColocoreError("no checkpoints recorded at %s wss=%d %s delay=%d%s"
                            % (pattern, wss, mode, delay, " tls" if tls else ""))
    rate = statistics.mean(rates)
    pauses = [c["pause-ms"] for c in cps]
    lat = [c["latency-ms"] for c in cps]
    sent = sum(c["bytes"] for c in cps)
    raw = sum(c.get("raw-bytes", 0) for c in cps)
    steps = {}
    for name in ("kick", "ram", "vcpu", "devices"):
        got = [c["pause-steps-us"][name] for c in cps if name in c.get("pause-steps-us", {})]
        if got:
            steps[name] = round(percentile(got, 50), 1)
    return {
        "pattern": pattern, "mode": mode, "modes_used": sorted({c.get("mode", "?") for c in cps}),
        "kernel": platform.release(),
        "wss": wss, "delay_ms": delay, "tls": tls, "capabilities": list(capabilities),
        "checkpoints": len(cps),
        "checkpoints_per_s": round(len(cps) / (window_s * cycles), 2),
        "pause_ms_p50": round(percentile(pauses, 50), 3),
        "pause_ms_p90": round(percentile(pauses, 90), 3),
        "pause_ms_p99": round(percentile(pauses, 99), 3),
        "pause_ms_max": round(max(pauses), 3),
        "pause_steps_us_p50": steps,
        "latency_ms_p50": round(percentile(lat, 50), 3),
        "latency_ms_p99": round(percentile(lat, 99), 3),
        "dirty_pages_p50": int(percentile([c["dirty-pages"] for c in cps], 50)),
        "hot_pages": int(percentile([c.get("hot-pages", 0) for c in cps], 50)),
        "cow_pages_p50": int(percentile([c.get("cow-pages", 0) for c in cps], 50)),
        "unchanged_pages_p50": int(percentile([c.get("unchanged-pages", 0) for c in cps], 50)),
        "wp_faults_per_checkpoint": round(statistics.mean(c.get("wp-faults", 0) for c in cps), 2),
        "bytes_per_checkpoint": int(sent / len(cps)),
        "compression_ratio": round(raw / sent, 3) if sent else 0.0,
        "memcpy_ms": round(limit, 4),
        "pause_vs_memcpy": round(percentile(pauses, 50) / limit, 2) if limit else None,
        "progress_ratio": round(rate / base, 4) if base else 0.0,
        "rate_protected": [round(r, 1) for r in rates],
        "rate_unprotected": [round(r, 1) for r in base_rates],
    }


def format(rows):
    head = ("%-5s %-12s %6s %6s %4s %5s %7s %7s %7s %8s %8s %6s %7s %9s %7s %8s %6s %9s"
            % ("pat", "mode", "wss", "delay", "tls", "ckpts", "p50", "p90", "p99", "lat p50",
               "memcpy", "hot", "faults", "B/ckpt", "compr", "progress", "noise", "lat/plain"))
    caps = ",".join(rows[0]["capabilities"]) if rows else ""
    lines = ["colocore checkpoint benchmark (pause and latency in ms; progress = protected / "
             "unprotected guest rate; noise = spread of the unprotected windows; hot = hot "
             "pages p50; faults = write-protect faults per checkpoint; capabilities: %s)"
             % (caps or "none"), head]
    for r in rows:
        u = r["rate_unprotected"]
        noise = (max(u) - min(u)) / statistics.mean(u) if u else 0.0
        mode = r["mode"] if r["modes_used"] == [r["mode"]] else \
            "%s(%s)" % (r["mode"], "/".join(r["modes_used"]))
        lines.append("%-5s %-12s %6d %6d %4s %5d %7.2f %7.2f %7.2f %8.2f %8.3f %6d %7.1f %9d %7.1f %8.3f %5.0f%% %9s" % (
            r["pattern"], mode, r["wss"], r["delay_ms"], "on" if r.get("tls") else "off",
            r["checkpoints"], r["pause_ms_p50"], r["pause_ms_p90"], r["pause_ms_p99"],
            r["latency_ms_p50"], r["memcpy_ms"], r["hot_pages"], r["wp_faults_per_checkpoint"],
            r["bytes_per_checkpoint"], r["compression_ratio"], r["progress_ratio"], 100 * noise,
            "%.2fx" % r["tls_latency_vs_plain"] if r.get("tls_latency_vs_plain") else "-"))
    lines.append("")
    lines += checkpoint_targets(rows)
    return "\n".join(lines)


def checkpoint_targets(rows, mode=DEFAULT_MODE):
    """Issue 15's goals, for the plain rows of the engine's default mode."""
    out = []
    for r in rows:
        if r["mode"] != mode or r.get("tls"):
            continue
        key = (r["pattern"], r["wss"], r["delay_ms"])
        want = {("hot", 10000, 200): 0.95, ("hot", 10000, 25): 0.9, ("hot", 1000, 25): 0.97,
                ("scan", 10000, 200): 0.9}.get(key)
        if want is not None:
            out.append("target: %s progress at wss=%d, %d ms >= %.2f: %.3f %s"
                       % (r["pattern"], r["wss"], r["delay_ms"], want, r["progress_ratio"],
                          "met" if r["progress_ratio"] >= want else "MISSED"))
        if r["pattern"] == "hot" and r["wss"] in (1000, 10000):
            limit = 1.3 * r["memcpy_ms"] + 0.3
            out.append("target: hot pause p50 at wss=%d, %d ms <= 1.3x memcpy + 0.3 ms = %.2f ms: "
                       "%.2f ms %s" % (r["wss"], r["delay_ms"], limit, r["pause_ms_p50"],
                                       "met" if r["pause_ms_p50"] <= limit else "MISSED"))
        if key == ("scan", 10000, 200):
            out.append("target: scan pause p50 at wss=10000, 200 ms <= 1 ms: %.2f ms %s"
                       % (r["pause_ms_p50"], "met" if r["pause_ms_p50"] <= 1.0 else "MISSED"))
    return out


def _csv(text, kind=str):
    return tuple(kind(x) for x in (text or "").split(",") if x)


def run(args):
    caps = _csv(args.capabilities)
    tls_modes = {"both": (False, True), "on": (True,), "off": (False,)}[getattr(args, "tls", "both")]
    patterns = _csv(getattr(args, "patterns", None)) or PATTERNS
    modes = _csv(getattr(args, "modes", None)) or MODES
    for p in patterns:
        if p not in PATTERNS:
            raise ColocoreError("unknown pattern %r; use %s" % (p, ",".join(PATTERNS)))
    for m in modes:
        pause_mode_parameters(m)               # a clear error for a bad name
    kw = {"capabilities": caps, "tls_modes": tls_modes, "patterns": patterns, "modes": modes}
    if args.quick:
        kw.update(wss_list=(1000,), scan_wss=(1000,), delays=(50,), window_s=1.0,
                  base_s=0.7, cycles=1)
    if getattr(args, "wss", None):
        kw["wss_list"] = kw["scan_wss"] = _csv(args.wss, int)
    if getattr(args, "delays", None):
        kw["delays"] = _csv(args.delays, int)
    if getattr(args, "cycles", None):
        kw["cycles"] = args.cycles
    return bench_checkpoint(**kw)
