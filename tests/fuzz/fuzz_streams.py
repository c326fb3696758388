"""Mutated streams over TCP into real nodes: the --incoming listener, and a COLO secondary
mid-protocol. Not coverage-guided (the code under test runs in another process):
structure-aware mutations (tests/fuzz/streams.py) of streams recorded from a real pair,
so most cases pass the CRCs and reach the decoders, the checks and the apply.

    python tests/fuzz/fuzz_streams.py incoming|colo --seconds N [--seed S]
           [--findings DIR] [--known DIR]

Seeds: a real primary protects a kvstore guest through a recording proxy; the initial
migration and a few checkpoints are taken apart into sections (kept in the corpus dir).
After every case the node must still be alive, log no traceback (an exception escaped),
keep its listener answering (incoming) or notice that its primary is gone (colo), and
not grow its RSS past BOUND. A failing case is saved with its bytes and what went wrong;
exit status 1 if a finding is not among the known ones (--known).
"""
import argparse
import hashlib
import json
import os
import re
import socket
import struct
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

import streams  # noqa: E402
from colocore.clients.kv import KvClient  # noqa: E402
from colocore.tools.procs import NodeSet, free_port, protect, wait_until  # noqa: E402

MEM = "32M"
BOUND = 256 << 20          # RSS growth past the baseline that counts as a finding
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


# ---- seeds: a real pair through a recording proxy ----------------------------------------

class Recorder(threading.Thread):
    def __init__(self, target_port):
        super().__init__(daemon=True)
        self.listen = socket.socket()
        self.listen.bind(("127.0.0.1", 0))
        self.listen.listen(1)
        self.port = self.listen.getsockname()[1]
        self.target_port = target_port
        self.data = bytearray()
        self.start()

    def run(self):
        a, _ = self.listen.accept()
        b = socket.create_connection(("127.0.0.1", self.target_port))

        def back():
            try:
                while True:
                    d = b.recv(65536)
                    if not d:
                        break
                    a.sendall(d)
            except OSError:
                pass
        threading.Thread(target=back, daemon=True).start()
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                self.data += d
                b.sendall(d)
        except OSError:
            pass


def record_seeds(corpus):
    """(initial sections, [(checkpoint sections, device sections)]) from a real pair;
    cached in `corpus`."""
    path = os.path.join(corpus, "recorded.json")
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
        dec = lambda secs: [(k, bytes.fromhex(p)) for k, p in secs]  # noqa: E731
        return dec(rec["initial"]), [(dec(c), dec(d)) for c, d in rec["checkpoints"]]
    with NodeSet() as nodes:
        port = free_port()
        sec = nodes.start("secondary", ["-m", MEM, "--incoming", "tcp:127.0.0.1:%d" % port])
        pri = nodes.start("primary", ["--kernel", "kvstore", "-m", MEM])
        sec.wait_monitor()
        pri.wait_monitor()
        proxy = Recorder(port)
        kv = KvClient(pri.console)
        kv.wait_ready()
        protect(pri, "tcp:127.0.0.1:%d" % proxy.port, delay_ms=50,
                capabilities=("compress", "xbzrle"))
        for i in range(6):
            kv.pipeline(["SET k%d %s" % (j, "v" * (i + 1) * 100) for j in range(200 * i, 200 * i + 200)])
            time.sleep(0.1)
        wait_until(pri, "query-colo-status", lambda d: d["checkpoints"] >= 8, "8 checkpoints")
        kv.close()
    data = bytes(proxy.data)
    initial, pos = streams.split_sections(data)
    checkpoints = []
    while pos + 4 <= len(data):
        (msg,) = U32.unpack_from(data, pos)
        pos += 4
        if msg == 3:                                  # vmstate-send
            ram, pos = streams.split_sections(data, pos)
            if pos + 12 > len(data) or U32.unpack_from(data, pos)[0] != 4:
                break
            (n,) = U64.unpack_from(data, pos + 4)
            blob = data[pos + 12:pos + 12 + n]
            pos += 12 + n
            dev, _ = streams.split_sections(blob, 0)
            if len(blob) == n:
                checkpoints.append((ram, dev))
    enc = lambda secs: [(k, p.hex()) for k, p in secs]  # noqa: E731
    os.makedirs(corpus, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"initial": enc(initial), "checkpoints": [(enc(c), enc(d)) for c, d in checkpoints]}, f)
    return initial, checkpoints


# ---- one node, watched ---------------------------------------------------------------------

class Target:
    count = 0

    def __init__(self, nodes, name):
        # a name (and so a log file) of its own: NodeSet logs append per name
        Target.count += 1
        name = "%s%d" % (name, Target.count)
        self.port = free_port()
        self.node = nodes.start(name, ["-m", MEM, "--incoming", "tcp:127.0.0.1:%d" % self.port])
        self.node.wait_monitor()
        self.proc = psutil.Process(self.node.pid)
        self.rss0 = self.proc.memory_info().rss
        self.log_seen = 0

    def new_log(self):
        try:
            with open(self.node.log_path, "rb") as f:
                f.seek(self.log_seen)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        self.log_seen += len(text.encode())
        return text

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.settimeout(2.0)
        return s


def _drain(sock, seconds):
    """Read what the node answers until it closes or `seconds` pass."""
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            d = sock.recv(65536)
            if not d:
                break
            got += d
    except OSError:
        pass
    return got


def _signature(kind, log):
    """What a finding is, for dedupe: the exception and the innermost colocore frame. An
    escaped exception is named so whatever noticed it first (the traceback in the log,
    or the listener it left dead)."""
    tb = log[log.rfind("Traceback"):] if "Traceback" in log else ""
    if not tb:
        return kind
    frames = re.findall(r'File "[^"]*?/(colocore/[^"]+)", line \d+, in (\w+)', tb)
    exc = re.findall(r"^(\w+(?:Error|Exception|Exit)[^\n]*)$", tb, re.M)
    where = "%s:%s" % frames[-1] if frames else ""
    name = exc[-1].split(":")[0] if exc else ""
    return "exception escaped %s %s" % (name, where)


def core(sig):
    """The part of a signature that says what broke (the exception and where), so a
    finding known from one fuzzer is known to all."""
    for prefix in ("exception escaped ", "partial apply "):
        if sig.startswith(prefix):
            return sig[len(prefix):]
    return sig


def check(target, mode, log_extra=""):
    """[(kind, log excerpt)] of what went wrong with the node after a case."""
    problems = []
    node = target.node
    if node.proc.poll() is not None:
        return [("node died", target.new_log()[-3000:])]
    log = target.new_log() + log_extra
    if "Traceback" in log:
        time.sleep(0.5)               # the node may still be writing it
        log += target.new_log()
    if os.environ.get("FUZZ_VERBOSE"):
        print("".join("   | " + l + "\n" for l in log.splitlines()
                      if "ERROR" in l or "WARNING" in l)[-600:], end="", flush=True)
    if "Traceback" in log:
        problems.append(("exception escaped", log[log.find("Traceback"):][:3000]))
    rss = target.proc.memory_info().rss
    if rss - target.rss0 > BOUND:
        problems.append(("memory growth", "RSS %d MiB over a %d MiB baseline"
                         % ((rss - target.rss0) >> 20, target.rss0 >> 20)))
    return problems


def listener_alive(target):
    """A stream with a wrong magic is refused at once by a live incoming thread (it
    closes the connection); a dead thread leaves it in the kernel's backlog, never read."""
    try:
        s = target.connect()
    except OSError:
        return False
    try:
        s.sendall(b"NOTCOLO!" + bytes(8))
        deadline = time.monotonic() + 15.0           # generous: a loaded machine is slow
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            if not s.recv(65536):
                return True
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---- the two modes -------------------------------------------------------------------------

def case_incoming(target, initial, rng):
    """Returns (bytes sent, whether the node took the stream as a migration)."""
    secs, tail = streams.mutate_sections(initial, rng)
    data = streams.render(secs, tail)
    s = target.connect()
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    answer = _drain(s, 2.0)
    s.close()
    return data, answer.endswith(U32.pack(0x102))          # LOADED


def case_colo(target, initial, checkpoints, rng):
    """A valid initial migration with x-colo, then checkpoints of which one is mutated
    (its RAM part, its device part, or the messages around it)."""
    sent = bytearray()
    s = target.connect()

    def send(b):
        sent.extend(b)
        s.sendall(b)
    try:
        send(streams.join(initial))
        if _drain_until(s, 4, 10.0) != U32.pack(0):       # checkpoint-ready
            return bytes(sent), "no checkpoint-ready"
        bad = rng.randrange(len(checkpoints))
        for i, (ram, dev) in enumerate(checkpoints[:bad + 1]):
            send(U32.pack(1))                              # checkpoint-request
            _drain_until(s, 4, 5.0)
            if i == bad:
                which = rng.randrange(4)
                if which == 0:
                    ram, tail = streams.mutate_sections(ram, rng)
                    part = streams.render(ram, tail, header=False)
                else:
                    part = streams.join(ram, header=False)
                if which == 1:
                    dev, tail = streams.mutate_sections(dev, rng)
                    blob = streams.render(dev, tail, header=False)
                else:
                    blob = streams.join(dev, header=False)
                size = len(blob)
                if which == 2:                             # a lying vmstate-size
                    size = rng.choice([0, size - 1, size + 1, 1 << 30, 1 << 63])
                msgs = U32.pack(3) + part + U32.pack(4) + U64.pack(size) + blob
                if which == 3:                             # a cut or unknown message
                    msgs = msgs[:rng.randrange(len(msgs))] + U32.pack(rng.choice([7, 0x105, 0xffffffff]))
                send(msgs)
            else:
                blob = streams.join(dev, header=False)
                send(U32.pack(3) + streams.join(ram, header=False) + U32.pack(4)
                     + U64.pack(len(blob)) + blob)
            _drain_until(s, 8, 5.0)                        # received, loaded
    except OSError:
        pass
    finally:
        s.close()
    return bytes(sent), None


def _drain_until(s, n, seconds):
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while len(got) < n and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            d = s.recv(n - len(got))
            if not d:
                break
            got += d
    except OSError:
        pass
    return got


def colo_after(target):
    """After the primary's connection closed, the secondary must say its peer is lost
    (a COLO loop that died silently keeps saying connected)."""
    try:
        wait_until(target.node, "query-colo-status", lambda d: d["peer"] != "connected",
                   "the secondary to notice its primary left", timeout=8.0)
    except Exception as exc:  # noqa: BLE001 - the finding is what it says
        return [("colo loop silent", str(exc)[:1000])]
    return []


# ---- the run ---------------------------------------------------------------------------------

def save_finding(findings, mode, kind, sig, data, detail):
    os.makedirs(findings, exist_ok=True)
    name = "%s-%s" % (mode, hashlib.sha1(sig.encode()).hexdigest()[:10])
    with open(os.path.join(findings, name + ".bin"), "wb") as f:
        f.write(data)
    with open(os.path.join(findings, name + ".json"), "w") as f:
        json.dump({"mode": mode, "what": kind, "signature": sig, "detail": detail}, f, indent=1)
    return name


def known_signatures(known):
    sigs = set()
    if known and os.path.isdir(known):
        for f in os.listdir(known):
            if f.endswith(".json"):
                with open(os.path.join(known, f)) as fh:
                    sigs.add(core(json.load(fh)["signature"]))
    return sigs


def run(mode, seconds, seed, corpus, findings, known):
    initial, checkpoints = record_seeds(corpus)
    if mode == "colo" and not checkpoints:
        raise SystemExit("fuzz_streams: no checkpoint was recorded")
    known_sigs = known_signatures(known)
    found, new = {}, []
    cases = 0
    deadline = time.monotonic() + seconds
    with NodeSet() as nodes:
        target = None
        while time.monotonic() < deadline:
            if target is None or mode == "colo" or target.node.proc.poll() is not None:
                if target is not None:
                    target.node.stop()
                target = Target(nodes, "target")
            rng = streams.case_rng(seed, cases)
            cases += 1
            if mode == "incoming":
                try:
                    data, taken = case_incoming(target, initial, rng)
                except OSError as exc:
                    # refused or not accepted in time: the previous case left the listener
                    # stuck, or (refused) the node took a stream; checked below
                    data, taken = b"", False
                    if not isinstance(exc, ConnectionRefusedError):
                        time.sleep(1.0)
                problems = check(target, mode)
                if not problems and not taken and target.node.qmp("query-status")["status"] == "inmigrate" \
                        and not listener_alive(target) and not listener_alive(target):
                    problems.append(("listener dead", target.node.log_tail(40)))
                if not problems and (taken or target.node.qmp("query-status")["status"] != "inmigrate"):
                    target.node.stop()               # it took the stream: a fresh one next
                    target = None
                    continue
            else:
                data, why = case_colo(target, initial, checkpoints, rng)
                problems = check(target, mode) or (colo_after(target) if why is None else [])
                problems += check(target, mode)
            for kind, detail in problems:
                sig = _signature(kind, detail)
                if sig in found:
                    continue
                found[sig] = save_finding(findings, mode, kind, sig, data, detail)
                print("finding %s: %s" % (found[sig], sig), flush=True)
                if core(sig) not in known_sigs:
                    new.append(sig)
                target.node.stop()
                target = None
                break
    print("fuzz_streams %s: %d cases in %.0f s, %d findings (%d new)"
          % (mode, cases, seconds, len(found), len(new)), flush=True)
    return 1 if new else 0


def replay(path):
    """Send a saved reproducer to a fresh node: [(kind, detail)] of what went wrong."""
    with open(path[:-4] + ".json") as f:
        mode = json.load(f)["mode"]
    with open(path, "rb") as f:
        data = f.read()
    with NodeSet() as nodes:
        target = Target(nodes, "replay")
        s = target.connect()
        try:
            s.sendall(data)
            if mode == "incoming":
                s.shutdown(socket.SHUT_WR)
            _drain(s, 3.0)
        except OSError:
            pass
        finally:
            s.close()
        problems = check(target, mode)
        if not problems and mode == "colo":
            if target.node.qmp("query-colo-status")["mode"] == "secondary":
                problems = colo_after(target)
        elif not problems and target.node.qmp("query-status")["status"] == "inmigrate" \
                and not listener_alive(target):
            problems = [("listener dead", "")]
        return problems


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("incoming", "colo"))
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--corpus", default=os.path.join(HERE, "corpus", "streams"))
    p.add_argument("--findings", default=os.path.join(tempfile.gettempdir(), "colocore-findings"))
    p.add_argument("--known", default=os.path.join(HERE, "findings"))
    a = p.parse_args(argv)
    print("fuzz_streams %s: seed %d" % (a.mode, a.seed), flush=True)
    return run(a.mode, a.seconds, a.seed, a.corpus, a.findings, a.known)


if __name__ == "__main__":
    sys.exit(main())
