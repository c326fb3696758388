"""`colocore bench partitions`: a protected service under an etcd arbiter, cut apart again
and again, checked for split brain and lost writes.

Three test hosts in network namespaces joined by a pyroute2 mesh: p and s run colocore
nodes (one at a time each, restarted as a standby whenever theirs exits, as the systemd
unit does), e runs etcd. A client on p and one on s write keys to the node of their own
host (127.0.0.1 inside that host). Each trial cuts a random non-empty set of the three
links for a random time, heals them, and waits until the service is protected again.

Checked, with one CLOCK_MONOTONIC for every namespace:
- split_brain_events: answers a client got from a host after another host won the key
  (the takeover point) and before its own host won it again;
- acked_lost: acknowledged writes that the final primary cannot read back;
- failover_ms: from the cut that isolated the serving host to the first answer the
  new primary gave, over the trials whose new primary kept its link to etcd during the
  cut (the others can fail over only after the heal; they count as takeovers).

Every process is stopped by its pid and every namespace deleted, also on failure.
"""
import os
import random
import shutil
import socket
import tempfile
import threading
import time

from colocore.errors import ColocoreError
from colocore.tools.bench.common import say
from colocore.tools.etcd import EtcdServer
from colocore.tools.netlab import Lab
from colocore.tools.procs import NodeSet
from colocore.tools.stats import percentile

CONSOLE_PORT = 7000
INCOMING_PORT = 5555
REQUEST_TIMEOUT = 2.0


class Writer(threading.Thread):
    """A client on one test host: SET unique keys, one at a time, to the host's own node;
    remembers what was acknowledged and when each answer arrived."""

    def __init__(self, host, tag, stop):
        super().__init__(daemon=True, name="writer-" + tag)
        self.host = host
        self.tag = tag
        self.stop_flag = stop
        self.acked = {}
        self.answers = []          # monotonic receive times of every answer
        self.sent = 0

    def run(self):
        with Lab.enter(self.host):
            while not self.stop_flag.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", CONSOLE_PORT), timeout=0.3)
                except OSError:
                    time.sleep(0.05)
                    continue
                try:
                    self._session(sock)
                except (OSError, ColocoreError):
                    pass
                finally:
                    sock.close()
                time.sleep(0.05)

    def _session(self, sock):
        # Each write is "SET k v" then "GET k" with a value no other request has: the write
        # counts as acknowledged only when that value comes back. The console is one byte
        # stream per guest, and a node that takes over delivers the output it held, which
        # may answer requests of an earlier connection (or another client): a bare "OK"
        # cannot be attributed, the unique value can.
        f = sock.makefile("rb")
        sock.settimeout(REQUEST_TIMEOUT)
        while not self.stop_flag.is_set():
            key = "%s%07d" % (self.tag, self.sent)
            value = "v%s%d" % (self.tag, self.sent)
            self.sent += 1
            sock.sendall(("SET %s %s\nGET %s\n" % (key, value, key)).encode())
            while True:
                line = f.readline()          # a timeout ends the session: answer unknown
                if not line:
                    raise ColocoreError("closed")
                if line.strip().decode("utf-8", "replace") == value:
                    break
            self.answers.append(time.monotonic())
            self.acked[key] = value
            time.sleep(0.005)


def read_back(host, acked):
    """GET every acknowledged key from the node on `host`; returns the keys not found."""
    keys = list(acked)
    lost = []
    with Lab.enter(host):
        sock = socket.create_connection(("127.0.0.1", CONSOLE_PORT), timeout=5)
    try:
        sock.settimeout(10)
        f = sock.makefile("rwb")
        # skip whatever output the node still held for earlier connections
        marker = "sync%d" % random.randrange(1 << 30)
        f.write(("SET %s %s\nGET %s\n" % (marker, marker, marker)).encode())
        f.flush()
        while f.readline().strip().decode("utf-8", "replace") != marker:
            pass
        for i in range(0, len(keys), 256):
            chunk = keys[i:i + 256]
            f.write(("".join("GET %s\n" % k for k in chunk)).encode())
            f.flush()
            for k in chunk:
                if f.readline().strip().decode() != acked[k]:
                    lost.append(k)
    finally:
        sock.close()
    return lost


class Service:
    """The lab, etcd and the two node hosts, supervised like systemd would."""

    def __init__(self, workdir=None, ttl_ms=1000, delay_ms=50, mem="256M", prefix="ccpt"):
        self._tmp = None
        self.keep = False            # a failed run keeps its logs
        if workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="colocore-partitions-")
            workdir = self._tmp
        self.workdir = workdir
        self.ttl_ms = ttl_ms
        self.delay_ms = delay_ms
        self.mem = mem
        self.lab = Lab(prefix)
        self.nodes = NodeSet(workdir)
        self.etcd = None
        self.node_on = {}            # host -> NodeProcess
        self.generation = 0
        self.takeovers = []          # (monotonic, host) from the winners' status
        self._seen_takeovers = set()
        try:
            self.p = self.lab.host("p", "10.80.0.1")
            self.s = self.lab.host("s", "10.80.0.2")
            self.e = self.lab.host("e", "10.80.0.3")
            self.lab.mesh(self.p, self.s, self.e)
            self.etcd = EtcdServer(os.path.join(workdir, "etcd-data"), host=self.e.address,
                                   prefix=self.lab.exec_prefix(self.e))
            self.etcd.start()
        except BaseException:
            self.keep = True
            self.close()
            raise
        self.key = "/bench/svc"
        self.links = [(self.p, self.s), (self.p, self.e), (self.s, self.e)]

    def arbiter_arg(self, role):
        return "etcd:%s,key=%s,ttl=%d,role=%s,protect=auto" % (self.etcd.url, self.key,
                                                                self.ttl_ms, role)

    def _start(self, host, serve):
        self.generation += 1
        name = "%s%d" % (host.ns.rsplit("-", 1)[1], self.generation)
        console = "tcp:127.0.0.1:%d,server=on,wait=off" % CONSOLE_PORT
        if serve:
            args = ["--kernel", "kvstore", "-m", self.mem, "--console", console,
                    "--arbiter", self.arbiter_arg("serve")]
        else:
            args = ["-m", self.mem, "--incoming", "tcp:%s:%d" % (host.address, INCOMING_PORT),
                    "--console", console, "--arbiter", self.arbiter_arg("standby")]
        node = self.nodes.start(name, args, prefix=self.lab.exec_prefix(host))
        node.host = host
        self.node_on[host] = node
        return node

    def start(self):
        pri = self._start(self.p, serve=True)
        pri.wait_monitor()
        for cmd in ("migrate_set_parameter x-checkpoint-delay %d" % self.delay_ms,):
            out = pri.hmp(cmd)
            if out:
                raise ColocoreError("primary refused %r: %s" % (cmd, out))
        self.takeovers.append((0.0, self.p))
        sec = self._start(self.s, serve=False)
        sec.wait_monitor()
        self.wait_protected(60)

    def supervise(self):
        """Restart any exited node as a standby on its host (systemd's Restart=always)."""
        for host, node in list(self.node_on.items()):
            if node.proc.poll() is not None:
                new = self._start(host, serve=False)
                new.wait_monitor()

    @staticmethod
    def status(node):
        """query-colo-status of a node, or None while it cannot answer (gone, starting)."""
        if node.proc.poll() is not None:
            return None
        try:
            return node.qmp("query-colo-status", timeout=5)
        except (ColocoreError, OSError):
            return None

    def poll(self):
        """Collect takeover moments; returns {host: status}."""
        out = {}
        for host, node in list(self.node_on.items()):
            st = self.status(node)
            if st is None:
                continue
            out[host] = st
            arb = st.get("arbiter") or {}
            t = arb.get("takeover-at")
            if t and (node.pid, t) not in self._seen_takeovers:
                self._seen_takeovers.add((node.pid, t))
                self.takeovers.append((t, host))
                self.takeovers.sort(key=lambda x: x[0])
        return out

    def serving_host(self):
        return self.takeovers[-1][1]

    def protected(self, statuses):
        for host, st in statuses.items():
            arb = st.get("arbiter") or {}
            if st.get("mode") == "primary" and arb.get("pair-recorded") and arb.get("may-release"):
                return host
        return None

    def wait_protected(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            self.supervise()
            host = self.protected(self.poll())
            if host is not None:
                return host
            if time.monotonic() > deadline:
                raise ColocoreError("the service was not protected again within %.0f s; "
                                    "logs in %s" % (timeout, self.workdir))
            time.sleep(0.1)

    def heal_all(self):
        for a, b in self.links:
            self.lab.heal(a, b)

    def close(self):
        self.nodes.close()
        if self.etcd is not None:
            self.etcd.stop()
        self.lab.close()
        if self._tmp is not None and not self.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.keep = True
        self.close()


def split_brain_events(takeovers, answers_by_host, end):
    """Answers from a host while another host was the rightful server (after its own
    takeover point)."""
    events = 0
    for i, (t, host) in enumerate(takeovers):
        t_next = takeovers[i + 1][0] if i + 1 < len(takeovers) else end
        for other, answers in answers_by_host.items():
            if other is host:
                continue
            events += sum(1 for a in answers if t < a < t_next)
    return events


def run_trials(svc, trials, seed=None, log=None):
    rng = random.Random(seed)
    stop = threading.Event()
    writers = {h: Writer(h, h.ns.rsplit("-", 1)[1], stop) for h in (svc.p, svc.s)}
    for w in writers.values():
        w.start()
    failovers = []
    ttl = svc.ttl_ms / 1000.0
    try:
        for n in range(trials):
            serving = svc.wait_protected(60)
            cut = [l for l in svc.links if rng.random() < 0.5] or [rng.choice(svc.links)]
            hold = rng.uniform(0.3, 3.0) * ttl
            before = len(svc.takeovers)
            t_cut = time.monotonic()
            for a, b in cut:
                svc.lab.cut(a, b)
            end = time.monotonic() + hold
            while time.monotonic() < end:
                svc.poll()
                time.sleep(0.05)
            svc.heal_all()
            # settle: the old primary learns, the stale side restarts, protection resumes
            svc.wait_protected(60)
            svc.poll()
            new = svc.takeovers[before:]
            if new and (new[0][1], svc.e) not in cut and (svc.e, new[0][1]) not in cut:
                # the new primary kept etcd during the cut: the failover happened in it
                t_key, host = new[0]
                first = next((a for a in writers[host].answers if a > t_key), None)
                if first is not None:
                    failovers.append((first - t_cut) * 1000)
            if log:
                log({"trial": n + 1, "cut": ["%s-%s" % (a.ns[-1], b.ns[-1]) for a, b in cut],
                     "hold_ms": round(hold * 1000), "serving_before": serving.ns[-1],
                     "takeovers": [h.ns[-1] for _, h in new]})
        time.sleep(0.5)
    finally:
        stop.set()
        for w in writers.values():
            w.join(REQUEST_TIMEOUT + 1)
    final = svc.wait_protected(60)
    acked = {}
    for w in writers.values():
        acked.update(w.acked)
    lost = read_back(final, acked)
    answers = {h: list(w.answers) for h, w in writers.items()}
    return {"trials": trials,
            "split_brain_events": split_brain_events(svc.takeovers, answers, time.monotonic()),
            "acked_lost": len(lost),
            "acked": len(acked),
            "takeovers": len(svc.takeovers) - 1,
            "failover_ms_p50": _round(percentile(failovers, 50)) if failovers else None,
            "failover_ms_p99": _round(percentile(failovers, 99)) if failovers else None,
            "failovers_measured": len(failovers),
            "ttl_ms": svc.ttl_ms}


def _round(v):
    return None if v is None else round(v, 1)


def run(args):
    """`colocore bench partitions [--trials N] [--seed S] [--ttl MS]`."""
    trials = args.trials or 50

    def log(line):
        say(" ".join("%s=%s" % kv for kv in line.items()))
    with Service(ttl_ms=args.ttl) as svc:
        svc.start()
        return run_trials(svc, trials, seed=args.seed, log=log)


def format(res):
    return "\n".join([
        "colocore partitions benchmark (%d trials, ttl %d ms; random cuts and heals between "
        "three namespaced hosts, clients writing on both sides)" % (res["trials"], res["ttl_ms"]),
        "  split_brain_events %d   acked_lost %d of %d acknowledged writes" % (
            res["split_brain_events"], res["acked_lost"], res["acked"]),
        "  takeovers %d   failover (cut -> first answer of the new primary, %d measured): "
        "p50 %s ms   p99 %s ms" % (res["takeovers"], res["failovers_measured"],
                                   res["failover_ms_p50"], res["failover_ms_p99"])])
