"""`colocore bench checkpoint|failover|migrate`: the three numbers a user picks a
fault-tolerance engine by, measured on real guests, next to what the hardware allows.

checkpoint  A primary/secondary pair on loopback runs the `dirtier` guest (it writes `wss`
            pages per pass and prints `progress <passes> <guest_clock_ns>`). Per working
            set, cycles of: the guest unprotected, protected at each x-checkpoint-delay,
            unprotected again (after a failover on the primary), so protected and
            unprotected windows alternate and share a noisy machine's noise. Pause and
            latency come from every checkpoint (`colocore run --stats-file`); the limit is
            a memcpy of as many pages, timed in this process in the same run.
failover    Trials of: a protected kvstore pair under a client load, the primary killed
            (SIGKILL), `x_colo_lost_heartbeat` to the secondary; time from sending the
            command to the first answered request on the secondary's console.
migrate     Initial (non-COLO) live migration of an idle (kvstore) and a busy (dirtier
            wss=10000) guest of 256 MiB and 1 GiB, engine defaults: total time,
            downtime, bytes sent (the source's `info migrate`), and the wall time to the
            destination answering.

Progress goes to stderr so `--json` stdout stays clean. Every node is started through a
NodeSet and stopped by pid when the benchmark ends, fails, or is interrupted (Ctrl-C).
The guest clock is host CLOCK_MONOTONIC, so windows are chosen on time.monotonic_ns() and
rates are computed from the numbers inside the console lines: protected output is held
until the secondary acknowledged the checkpoint (output commit) and arrives in bursts.
"""
import ctypes
import json
import os
import platform
import re
import signal
import socket
import statistics
import sys
import threading
import time

from .chardev import connect
from .errors import ColocoreError
from .kvclient import KvClient
from .params import pause_mode_parameters
from .procs import NodeSet, free_port, wait_for

PAGE = 4096
WSS = (0, 100, 1000, 10000)
DELAYS = (200, 25)


# ---- small tools ---------------------------------------------------------------------

def say(fmt, *args):
    """Progress on the terminal (stderr)."""
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), fmt % args if args else fmt))
    sys.stderr.flush()


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); q in 0..100."""
    v = sorted(values)
    if not v:
        return 0.0
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


_libc = ctypes.CDLL(None)
_libc.memcpy.restype = ctypes.c_void_p
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def memcpy_ms(npages, repeats=31):
    """Median time of one memcpy of `npages` pages (warm buffers, fresh each size)."""
    if npages == 0:
        return 0.0
    size = npages * PAGE
    src = (ctypes.c_char * size).from_buffer(bytearray(os.urandom(PAGE) * npages))
    dst = (ctypes.c_char * size).from_buffer(bytearray(size))
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        _libc.memcpy(dst, src, size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def machine_description():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    kvm = "kvm_pvm" if os.path.exists("/sys/module/kvm_pvm") else \
        "kvm_intel" if os.path.exists("/sys/module/kvm_intel") else \
        "kvm_amd" if os.path.exists("/sys/module/kvm_amd") else "kvm"
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        mem_gib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "kernel": platform.release(), "kvm": kvm, "python": platform.python_version()}


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


def hmp_ok(node, line, timeout=None):
    out = node.hmp(line, timeout)
    if out.startswith("Error") or out.startswith("unknown command"):
        raise ColocoreError("%s: %r failed: %s" % (node.name, line, out))
    return out


def info_fields(text):
    """`name: value unit` lines of `info migrate` -> {name: float or str}."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        first = value.split()[0] if value.split() else ""
        try:
            out[name.strip()] = float(first)
        except ValueError:
            out[name.strip()] = value.strip()
    return out


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


def _protect(pri, uri, delay_ms, capabilities=()):
    for cap in ("x-colo",) + tuple(capabilities):
        hmp_ok(pri, "migrate_set_capability %s on" % cap)
    hmp_ok(pri, "migrate_set_parameter x-checkpoint-delay %d" % delay_ms)
    t0 = time.perf_counter()
    hmp_ok(pri, "migrate %s" % uri)
    wait_for(pri, "info migrate", "Migration status: colo", timeout=120)
    return (time.perf_counter() - t0) * 1000


# ---- colocore bench checkpoint ------------------------------------------------------------

PATTERNS = ("hot", "scan")
# copy: the engine before issue 15 (every dirty page copied and re-protected in the
# pause); hot+pre+cow: the engine's default (checkpoint.pause_mode names the parts)
MODES = ("copy", "hot+pre+cow")
SCAN_WSS = (1000, 10000)


def _unprotected_window(console, seconds):
    a = time.monotonic_ns()
    time.sleep(seconds)
    b = time.monotonic_ns()
    console.wait_past(b)
    return console.rate(a, b)


def _guest_args(pattern, wss):
    """The dirtier's command line for a pattern (scan: wss new pages every 200 ms)."""
    return "wss=%d pattern=%s" % (wss, pattern) + (" interval=200" if pattern == "scan" else "")


def _checkpoint_one_wss(wss, delays, window_s, base_s, cycles, mem, capabilities,
                        pattern="hot", mode="copy"):
    """Cycles of U P200 P25 U, where U is unprotected and P protected at one delay: a
    fresh pair per cycle, the primary failing over at the end of it, so unprotected and
    protected windows of the same guest alternate and share the machine's noise."""
    base_rates = []
    protected = {d: [] for d in delays}        # delay -> [passes/s per window]
    checkpoints = {d: [] for d in delays}
    parameters = pause_mode_parameters(mode)
    for cycle in range(cycles):
        with NodeSet() as nodes:
            stats = os.path.join(nodes.workdir, "checkpoints.jsonl")
            uri = "tcp:127.0.0.1:%d" % free_port()
            sec = nodes.start("secondary", ["-m", mem, "--incoming", uri])
            pri = nodes.start("primary", ["--kernel", "dirtier", "--append", _guest_args(pattern, wss),
                                          "-m", mem, "--stats-file", stats])
            sec.wait_monitor()
            pri.wait_monitor()
            console = ConsoleLines(pri.console)
            try:
                console.wait_past(time.monotonic_ns())          # the guest runs
                time.sleep(0.3)
                say("checkpoint: %s wss=%d %s (cycle %d/%d): unprotected %.0f s", pattern, wss,
                    mode, cycle + 1, cycles, base_s)
                base_rates.append(_unprotected_window(console, base_s))
                for name, value in parameters.items():
                    hmp_ok(pri, "migrate_set_parameter %s %s" % (name, value))
                _protect(pri, uri, delays[0], capabilities)
                for n, delay in enumerate(delays):
                    if n:
                        hmp_ok(pri, "migrate_set_parameter x-checkpoint-delay %d" % delay)
                    time.sleep(max(0.5, 3 * delay / 1000.0))     # settle on the new rate
                    say("checkpoint: %s wss=%d %s delay=%d ms: protected %.0f s", pattern, wss,
                        mode, delay, window_s)
                    a, a_wall = time.monotonic_ns(), time.time()
                    time.sleep(window_s)
                    b, b_wall = time.monotonic_ns(), time.time()
                    console.wait_past(b)
                    protected[delay].append(console.rate(a, b))
                    checkpoints[delay] += read_stats(stats, a_wall, b_wall)
                say("checkpoint: %s wss=%d %s: failover on the primary, unprotected %.0f s",
                    pattern, wss, mode, base_s)
                hmp_ok(pri, "x_colo_lost_heartbeat")
                wait_for(pri, "info colo", "COLO mode: none")
                sec.stop()
                time.sleep(0.3)
                base_rates.append(_unprotected_window(console, base_s))
            finally:
                console.close()
    return base_rates, protected, checkpoints


def bench_checkpoint(wss_list=WSS, delays=DELAYS, window_s=3.0, base_s=2.0, cycles=3,
                     mem="256M", capabilities=("compress",), patterns=PATTERNS, modes=MODES,
                     scan_wss=SCAN_WSS):
    rows = []
    limits = {}
    for pattern in patterns:
        for wss in (wss_list if pattern == "hot" else scan_wss):
            if wss not in limits:
                say("checkpoint: wss=%d: memcpy reference", wss)
                limits[wss] = memcpy_ms(wss)
            limit = limits[wss]
            for mode in modes:
                base_rates, protected, checkpoints = _checkpoint_one_wss(
                    wss, delays, window_s, base_s, cycles, mem, capabilities, pattern, mode)
                base = statistics.mean(base_rates)
                for delay in delays:
                    cps = checkpoints[delay]
                    if not cps:
                        raise ColocoreError("no checkpoints recorded at %s wss=%d %s delay=%d"
                                            % (pattern, wss, mode, delay))
                    row = _checkpoint_row(pattern, mode, wss, delay, cps, capabilities, limit,
                                          statistics.mean(protected[delay]), base,
                                          protected[delay], base_rates, window_s * cycles)
                    rows.append(row)
                    say("checkpoint: %s wss=%d %s delay=%d: pause p50 %.2f ms p99 %.2f ms "
                        "(memcpy %.3f ms), hot %d, wp faults %.1f, %d B/checkpoint, progress %.3f",
                        pattern, wss, mode, delay, row["pause_ms_p50"], row["pause_ms_p99"],
                        limit, row["hot_pages"], row["wp_faults_per_checkpoint"],
                        row["bytes_per_checkpoint"], row["progress_ratio"])
    return rows


def _checkpoint_row(pattern, mode, wss, delay, cps, capabilities, limit, rate, base,
                    rates_protected, rates_unprotected, seconds):
    pauses = [c["pause-ms"] for c in cps]
    lat = [c["latency-ms"] for c in cps]
    sent = sum(c["bytes"] for c in cps)
    raw = sum(c.get("raw-bytes", 0) for c in cps)
    used = sorted({c.get("mode", "?") for c in cps})
    steps = {}
    for name in ("kick", "ram", "vcpu", "devices"):
        got = [c["pause-steps-us"][name] for c in cps if name in c.get("pause-steps-us", {})]
        if got:
            steps[name] = round(percentile(got, 50), 1)
    return {
        "pattern": pattern, "mode": mode, "modes_used": used, "kernel": platform.release(),
        "wss": wss, "delay_ms": delay, "capabilities": list(capabilities),
        "checkpoints": len(cps),
        "checkpoints_per_s": round(len(cps) / seconds, 2),
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
        "rate_protected": [round(r, 1) for r in rates_protected],
        "rate_unprotected": [round(r, 1) for r in rates_unprotected],
    }


def format_checkpoint(rows, machine=None):
    head = ("%-5s %-8s %6s %6s %5s %7s %7s %7s %8s %8s %6s %7s %9s %7s %8s %6s"
            % ("pat", "mode", "wss", "delay", "ckpts", "p50", "p90", "p99", "lat p50", "memcpy",
               "hot", "faults", "B/ckpt", "compr", "progress", "noise"))
    caps = ",".join(rows[0]["capabilities"]) if rows else ""
    m = machine or machine_description()
    lines = ["colocore checkpoint benchmark (pause and latency in ms; progress = protected / "
             "unprotected guest rate; noise = spread of the unprotected windows; hot = hot "
             "pages p50; faults = write-protect faults per checkpoint; capabilities: %s; "
             "kernel %s, %s)" % (caps or "none", m["kernel"], m["kvm"]), head]
    for r in rows:
        u = r["rate_unprotected"]
        noise = (max(u) - min(u)) / statistics.mean(u) if u else 0.0
        mode = r["mode"] if r.get("modes_used", [r["mode"]]) == [r["mode"]] or not r.get("modes_used") \
            else "%s(%s)" % (r["mode"], "/".join(r["modes_used"]))
        lines.append("%-5s %-8s %6d %6d %5d %7.2f %7.2f %7.2f %8.2f %8.3f %6d %7.1f %9d %7.1f %8.3f %5.0f%%" % (
            r["pattern"], mode, r["wss"], r["delay_ms"], r["checkpoints"], r["pause_ms_p50"],
            r["pause_ms_p90"], r["pause_ms_p99"], r["latency_ms_p50"], r["memcpy_ms"],
            r["hot_pages"], r["wp_faults_per_checkpoint"], r["bytes_per_checkpoint"],
            r["compression_ratio"], r["progress_ratio"], 100 * noise))
    lines.append("")
    lines += checkpoint_targets(rows)
    return "\n".join(lines)


def checkpoint_targets(rows, mode="hot+pre+cow"):
    """Issue 15's goals, for the rows of the engine's default mode."""
    out = []
    for r in rows:
        if r["mode"] != mode:
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


# ---- colocore bench failover -------------------------------------------------------------

class LoadClient(threading.Thread):
    """Pipelined SETs against the primary's kvstore until the connection dies."""

    def __init__(self, address):
        super().__init__(name="load", daemon=True)
        self.kv = KvClient(address, timeout=5.0)
        self.kv.wait_ready()
        self.acked = -1                 # highest key index whose SET was answered OK
        self.stop_flag = False
        self.start()

    def run(self):
        i = 0
        try:
            while not self.stop_flag:
                batch = ["SET k%d v%d" % (j, j) for j in range(i, i + 16)]
                replies = self.kv.pipeline(batch, window=16)
                if replies != ["OK"] * len(batch):
                    raise ColocoreError("kvstore answered %r" % replies[:3])
                i += len(batch)
                self.acked = i - 1
        except (OSError, ColocoreError):
            pass                        # the primary was killed

    def close(self):
        self.stop_flag = True
        self.kv.close()
        self.join(5)


def failover_trial(mem="256M", load_s=0.6, delay_ms=200):
    with NodeSet() as nodes:
        uri = "tcp:127.0.0.1:%d" % free_port()
        sec = nodes.start("secondary", ["-m", mem, "--incoming", uri])
        pri = nodes.start("primary", ["--kernel", "kvstore", "-m", mem])
        sec.wait_monitor()
        pri.wait_monitor()
        load = LoadClient(pri.console)
        try:
            _protect(pri, uri, delay_ms)
            wait_for(sec, "info colo", "COLO mode: secondary")
            time.sleep(load_s)
            acked = load.acked
            pri.kill()                                  # SIGKILL, waits until reaped
        finally:
            load.close()
        if acked < 0:
            raise ColocoreError("the client load got no SET answered before the kill")
        # Let the secondary see the peer go (EOF on the channel), as an external
        # heartbeat agent would have, then time the takeover command alone.
        wait_for(sec, "info colo", "peer: lost", timeout=10)
        mon = sec.monitor
        t0 = time.perf_counter()
        mon.sock.sendall(b"x_colo_lost_heartbeat\n")
        deadline = time.monotonic() + 10
        while True:
            try:
                s = connect(sec.console, 1.0)
                break
            except ColocoreError:
                if time.monotonic() > deadline:
                    raise ColocoreError("the secondary never opened its console; log:\n%s"
                                        % sec.log_tail())
                time.sleep(0.0005)
        s.sendall(b"GET k%d\n" % acked)
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(4096)
            if not data:
                raise ColocoreError("the secondary closed its console")
            buf += data
        t1 = time.perf_counter()
        s.close()
        out = mon._read_until_prompt(10)
        if out.strip():
            raise ColocoreError("x_colo_lost_heartbeat: %s" % out.strip())
        value = buf.decode().strip()
        kv = KvClient(sec.console)
        count = int(kv.request("COUNT"))
        kv.close()
        if value != "v%d" % acked or count < acked + 1:
            raise ColocoreError("failover lost acknowledged writes: GET k%d -> %r, COUNT %d"
                                % (acked, value, count))
        return {"failover_ms": (t1 - t0) * 1000, "acked_writes": acked + 1, "count": count}


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


def format_failover(res):
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


# ---- colocore bench migrate ----------------------------------------------------------------

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
        hmp_ok(src, "migrate %s" % uri, timeout=300)
        t_cmd = time.perf_counter()
        info = info_fields(src.hmp("info migrate"))
        if info.get("Migration status") != "completed":
            raise ColocoreError("migration did not complete: %s" % src.hmp("info migrate"))
        deadline = time.monotonic() + 30
        while True:                         # the destination opens its console once it runs
            try:
                kv = KvClient(dst.console)
                break
            except ColocoreError:
                if time.monotonic() > deadline:
                    raise ColocoreError("the destination never opened its console; log:\n%s"
                                        % dst.log_tail())
                time.sleep(0.001)
        kv.wait_ready(30)
        t_dst = time.perf_counter()
        kv.close()
        return {"guest": kind, "mem": mem, "wss": busy_wss if kind == "busy" else 0,
                "total_ms": info["total time"], "downtime_ms": info["downtime"],
                "rounds": int(info["dirty sync count"]),
                "bytes_sent": int(info["transferred ram"] * 1024),
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


def format_migrate(rows):
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


# ---- entry ---------------------------------------------------------------------------------

def _csv(text, kind=str):
    return tuple(kind(x) for x in (text or "").split(",") if x)


def main(what, json_out=False, trials=20, quick=False, capabilities="compress",
         patterns=None, modes=None, wss=None, delays=None, cycles=None):
    caps = _csv(capabilities)
    patterns = _csv(patterns) or PATTERNS
    modes = _csv(modes) or MODES
    for p in patterns:
        if p not in PATTERNS:
            print("colocore bench: unknown pattern %r; use %s" % (p, ",".join(PATTERNS)),
                  file=sys.stderr)
            return 2
    for m in modes:
        try:
            pause_mode_parameters(m)
        except ColocoreError as exc:
            print("colocore bench: %s" % exc, file=sys.stderr)
            return 2

    def terminated(signum, frame):
        raise KeyboardInterrupt        # SIGTERM (e.g. `timeout`) cleans up like Ctrl-C
    signal.signal(signal.SIGTERM, terminated)
    try:
        if what == "checkpoint":
            kw = {"capabilities": caps, "patterns": patterns, "modes": modes}
            if quick:
                kw.update(wss_list=(1000,), scan_wss=(1000,), delays=(50,), window_s=1.0,
                          base_s=0.7, cycles=1)
            if wss:
                kw["wss_list"] = kw["scan_wss"] = _csv(wss, int)
            if delays:
                kw["delays"] = _csv(delays, int)
            if cycles:
                kw["cycles"] = cycles
            rows = bench_checkpoint(**kw)
            print(json.dumps(rows) if json_out else format_checkpoint(rows))
        elif what == "failover":
            res = bench_failover(trials)
            print(json.dumps(res) if json_out else format_failover(res))
        elif what == "migrate":
            if quick:
                rows = bench_migrate(cases=(("idle", "256M"), ("busy", "256M")), busy_wss=1000)
            else:
                rows = bench_migrate()
            print(json.dumps(rows) if json_out else format_migrate(rows))
        else:
            raise ColocoreError("unknown benchmark %r" % what)
    except ColocoreError as exc:
        print("colocore bench %s: %s" % (what, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("interrupted: every node this benchmark started was stopped")
        return 130
    return 0
