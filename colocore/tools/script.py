"""`colocore script FILE|-`: run a scenario against nodes, headless, JSON lines out.

A scenario is one step per line (`#` starts a comment):

    set NAME VALUE                    $NAME / ${NAME} in later lines; VALUE free-port
                                      picks a free TCP port on 127.0.0.1
    node NAME run ARGS...             start `colocore run ARGS...` (monitor, console and
                                      QMP sockets are added); stopped at the end
    node NAME attach MONITOR [qmp=ADDRESS] [console=ADDRESS]
                                      use a running node (never stopped by the script)
    @NAME COMMAND...                  an HMP command; an error fails the scenario
    @NAME? COMMAND...                 the same, but an error is only recorded
    sleep SECONDS
    wait @NAME STATUS [TIMEOUT]       until `info migrate` or `info status` says STATUS
                                      (colo, completed, running, paused, ...), or, for an
                                      upper-case STATUS, until the node has sent that QMP
                                      event (each wait consumes one: the first one after
                                      the event the previous wait on NAME matched);
                                      TIMEOUT in seconds, default 30
    expect @NAME REGEX                search the node's last output (HMP or console)
    kill @NAME                        SIGKILL a node the script started
    console @NAME LINE                send LINE to the guest's console, capture the reply

The whole scenario is parsed before anything starts; a syntax error is reported as
`line N: ...`. One JSON line is printed per step and per QMP event; the exit status is
non-zero on the first failed step, after the nodes the script started are stopped.
"""
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from colocore.clients.hmp import MonitorClient, is_error
from colocore.clients.kv import KvClient
from colocore.clients.qmp import QmpClient
from colocore.errors import ColocoreError
from colocore.tools.procs import NodeSet, free_port

DEFAULT_TIMEOUT = 30.0
MIGRATION_STATUSES = ("none", "setup", "active", "completed", "failed", "cancelled", "colo")
RUN_STATES = ("running", "paused", "postmigrate", "prelaunch", "inmigrate", "finish-migrate",
              "shutdown", "guest-panicked", "internal-error")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_EVENT = re.compile(r"^[A-Z][A-Z0-9_]*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class ScriptError(ColocoreError):
    pass


@dataclass
class Step:
    lineno: int
    op: str                  # start, attach, hmp, sleep, wait, expect, kill, console
    node: str = ""
    text: str = ""           # HMP command, console line, regex, status
    args: list = field(default_factory=list)
    seconds: float = 0.0
    tolerate_error: bool = False
    options: dict = field(default_factory=dict)


def _number(text, lineno, what):
    try:
        value = float(text)
    except ValueError:
        raise ScriptError("line %d: %s %r is not a number of seconds" % (lineno, what, text)) from None
    if value < 0:
        raise ScriptError("line %d: %s must not be negative" % (lineno, what))
    return value


def parse(text, variables=None):
    """Parse a whole scenario; return the steps or raise ScriptError('line N: ...')."""
    variables = dict(variables or {})
    steps = []
    declared = {}            # node name -> "start" | "attach"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def subst(m, lineno=lineno):
            name = m.group(1) or m.group(2)
            if name not in variables:
                raise ScriptError("line %d: unknown variable $%s; define it with `set %s VALUE`"
                                  % (lineno, name, name))
            return variables[name]
        line = _VAR.sub(subst, line)
        word, _, rest = line.partition(" ")
        rest = rest.strip()

        def need_node(token, lineno=lineno, word=word):
            if not token.startswith("@") or len(token) < 2:
                raise ScriptError("line %d: %s needs @NODE, got %r" % (lineno, word, token))
            name = token[1:]
            if name not in declared:
                raise ScriptError("line %d: node %r is not declared; add `node %s run ...` or "
                                  "`node %s attach ...` before this line" % (lineno, name, name, name))
            return name

        if word == "set":
            parts = rest.split(None, 1)
            if len(parts) != 2 or not _NAME.match(parts[0]):
                raise ScriptError("line %d: usage: set NAME VALUE" % lineno)
            variables[parts[0]] = str(free_port()) if parts[1] == "free-port" else parts[1]
        elif word == "node":
            try:
                parts = shlex.split(rest)
            except ValueError as exc:
                raise ScriptError("line %d: %s" % (lineno, exc)) from None
            if len(parts) < 2 or parts[1] not in ("run", "attach"):
                raise ScriptError("line %d: usage: node NAME run ARGS... | node NAME attach "
                                  "MONITOR [qmp=ADDRESS] [console=ADDRESS]" % lineno)
            name = parts[0]
            if not _NAME.match(name):
                raise ScriptError("line %d: bad node name %r (letters, digits, _ . -)" % (lineno, name))
            if name in declared:
                raise ScriptError("line %d: node %r is declared twice" % (lineno, name))
            if parts[1] == "run":
                for a in parts[2:]:
                    if a.split("=")[0] in ("--monitor", "--console", "--qmp", "--name"):
                        raise ScriptError("line %d: %s is set by the script itself" % (lineno, a))
                declared[name] = "start"
                steps.append(Step(lineno, "start", name, args=parts[2:]))
            else:
                if len(parts) < 3:
                    raise ScriptError("line %d: node %s attach needs the monitor address "
                                      "(unix:PATH or tcp:HOST:PORT)" % (lineno, name))
                options = {}
                for opt in parts[3:]:
                    k, eq, v = opt.partition("=")
                    if k not in ("qmp", "console") or not eq or not v:
                        raise ScriptError("line %d: unknown attach option %r; use qmp=ADDRESS "
                                          "or console=ADDRESS" % (lineno, opt))
                    options[k] = v
                for addr in [parts[2]] + list(options.values()):
                    if not re.match(r"^(unix:.+|tcp:.*:\d+)$", addr):
                        raise ScriptError("line %d: address %r: use unix:PATH or tcp:HOST:PORT"
                                          % (lineno, addr))
                declared[name] = "attach"
                steps.append(Step(lineno, "attach", name, text=parts[2], options=options))
        elif word.startswith("@"):
            tolerate = word.endswith("?")
            name = need_node(word[:-1] if tolerate else word)
            if not rest:
                raise ScriptError("line %d: an HMP command is missing after %s" % (lineno, word))
            steps.append(Step(lineno, "hmp", name, text=rest, tolerate_error=tolerate))
        elif word == "sleep":
            if not rest or len(rest.split()) != 1:
                raise ScriptError("line %d: usage: sleep SECONDS" % lineno)
            steps.append(Step(lineno, "sleep", seconds=_number(rest, lineno, "sleep")))
        elif word == "wait":
            parts = rest.split()
            if len(parts) not in (2, 3):
                raise ScriptError("line %d: usage: wait @NODE STATUS [TIMEOUT]" % lineno)
            name = need_node(parts[0])
            status = parts[1]
            if status not in MIGRATION_STATUSES and status not in RUN_STATES \
                    and not _EVENT.match(status):
                raise ScriptError("line %d: unknown status %r; use a migration status (%s), a "
                                  "VM status (%s) or an EVENT_NAME" % (
                                      lineno, status, ", ".join(MIGRATION_STATUSES),
                                      ", ".join(RUN_STATES[:3])))
            timeout = _number(parts[2], lineno, "timeout") if len(parts) == 3 else DEFAULT_TIMEOUT
            steps.append(Step(lineno, "wait", name, text=status, seconds=timeout))
        elif word == "expect":
            target, _, regex = rest.partition(" ")
            name = need_node(target)
            regex = regex.strip()
            if not regex:
                raise ScriptError("line %d: usage: expect @NODE REGEX" % lineno)
            try:
                re.compile(regex)
            except re.error as exc:
                raise ScriptError("line %d: bad regular expression %r: %s" % (lineno, regex, exc)) from None
            steps.append(Step(lineno, "expect", name, text=regex))
        elif word == "kill":
            if len(rest.split()) != 1:
                raise ScriptError("line %d: usage: kill @NODE" % lineno)
            name = need_node(rest)
            if declared[name] != "start":
                raise ScriptError("line %d: kill @%s: the script only kills nodes it started"
                                  % (lineno, name))
            steps.append(Step(lineno, "kill", name))
        elif word == "console":
            target, _, payload = rest.partition(" ")
            name = need_node(target)
            if not payload.strip():
                raise ScriptError("line %d: usage: console @NODE LINE" % lineno)
            steps.append(Step(lineno, "console", name, text=payload.strip()))
        else:
            raise ScriptError("line %d: unknown step %r; use node, @NODE, sleep, wait, expect, "
                              "kill, console or set" % (lineno, word))
    return steps


# ---- running -------------------------------------------------------------------------------

class _Printer:
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def emit(self, record):
        with self.lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()


class _Node:
    def __init__(self, name):
        self.name = name
        self.proc = None             # NodeProcess when the script started it
        self.monitor = None
        self.qmp = None
        self.console_address = None
        self.kv = None
        self.last_output = ""
        self.events = []
        self.event_mark = 0
        self.lock = threading.Lock()

    def close(self):
        for c in (self.kv, self.qmp, self.monitor):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        self.kv = self.qmp = self.monitor = None


class StepFailed(ColocoreError):
    pass


class Runner:
    def __init__(self, steps, out=None, workdir=None):
        self.steps = steps
        self.printer = _Printer(out or sys.stdout)
        self.nodeset = NodeSet(workdir)
        self.nodes = {}

    def run(self):
        ok, failed = True, None
        t0 = time.monotonic()
        try:
            for i, step in enumerate(self.steps, 1):
                t = time.monotonic()
                record = {"step": i, "line": step.lineno, "op": step.op}
                if step.node:
                    record["node"] = step.node
                try:
                    record.update(getattr(self, "_do_" + step.op)(step) or {})
                    record["ok"] = True
                except (ColocoreError, OSError) as exc:
                    record["ok"] = False
                    record["error"] = str(exc)
                record["ms"] = round((time.monotonic() - t) * 1000, 1)
                self.printer.emit(record)
                if not record["ok"]:
                    ok, failed = False, step.lineno
                    break
        finally:
            for node in self.nodes.values():
                node.close()
            self.nodeset.close()
        summary = {"summary": "ok" if ok else "failed", "ok": ok, "steps": len(self.steps),
                   "ms": round((time.monotonic() - t0) * 1000, 1)}
        if failed is not None:
            summary["failed_line"] = failed
        self.printer.emit(summary)
        return ok

    def _on_event(self, node, msg):
        with node.lock:
            node.events.append(msg["event"])
        self.printer.emit({"event": msg["event"], "node": node.name, "data": msg.get("data", {}),
                           "timestamp": msg.get("timestamp")})

    def _connect_qmp(self, node, address, deadline):
        while True:
            try:
                node.qmp = QmpClient(address, on_event=lambda m, n=node: self._on_event(n, m))
                return
            except ColocoreError:
                if time.monotonic() > deadline:
                    raise
                if node.proc is not None and node.proc.proc.poll() is not None:
                    raise StepFailed("node %s exited; log:\n%s" % (node.name, node.proc.log_tail()))
            time.sleep(0.02)

    def _do_start(self, step):
        node = self.nodes[step.node] = _Node(step.node)
        node.proc = self.nodeset.start(step.node, step.args)
        node.monitor = node.proc.wait_monitor()
        node.console_address = node.proc.console
        self._connect_qmp(node, "unix:" + node.proc.qmp_path, time.monotonic() + 20)
        return {"pid": node.proc.pid}

    def _do_attach(self, step):
        node = self.nodes[step.node] = _Node(step.node)
        node.monitor = MonitorClient(step.text)
        node.console_address = step.options.get("console")
        if "qmp" in step.options:
            self._connect_qmp(node, step.options["qmp"], time.monotonic() + 10)
        return {"monitor": step.text}

    def _node(self, step):
        return self.nodes[step.node]

    def _do_hmp(self, step):
        node = self._node(step)
        if node.monitor is None:
            raise StepFailed("node %s has no monitor (killed?)" % step.node)
        out = node.monitor.cmd(step.text, timeout=600)
        node.last_output = out
        record = {"command": step.text, "output": out}
        if is_error(out) and not step.tolerate_error:
            raise StepFailed("%s: %s" % (step.text, out))
        return record

    def _do_sleep(self, step):
        time.sleep(step.seconds)
        return {"seconds": step.seconds}

    def _do_wait(self, step):
        node = self.nodes[step.node]
        deadline = time.monotonic() + step.seconds
        want = step.text
        while True:
            if _EVENT.match(want):
                with node.lock:
                    fresh = node.events[node.event_mark:]
                    if want in fresh:
                        node.event_mark += fresh.index(want) + 1
                        return {"status": want}
                seen = "events %s" % (", ".join(fresh[-5:]) or "none")
            else:
                if node.qmp is None:
                    raise StepFailed("node %s has no QMP to read its status from (killed? "
                                     "attach it with qmp=ADDRESS)" % step.node)
                mig = node.qmp.execute("query-migrate")["status"]
                run = node.qmp.execute("query-status")["status"]
                # "paused" also matches every state `info status` prints as "paused (...)"
                if want in (mig, run) or (want == "paused" and run != "running"):
                    return {"status": want}
                seen = "migration %s, VM %s" % (mig, run)
            if node.proc is not None and node.proc.proc.poll() is not None:
                raise StepFailed("node %s exited while waiting for %s" % (step.node, want))
            if time.monotonic() > deadline:
                raise StepFailed("timeout: %s did not reach %s within %g s (%s)"
                                 % (step.node, want, step.seconds, seen))
            time.sleep(0.05)

    def _do_expect(self, step):
        node = self.nodes[step.node]
        if not re.search(step.text, node.last_output, re.M):
            raise StepFailed("expected /%s/ in the last output of %s, got %r"
                             % (step.text, step.node, node.last_output))
        return {"regex": step.text}

    def _do_kill(self, step):
        node = self.nodes[step.node]
        node.close()
        node.proc.kill(signal.SIGKILL)
        return {"pid": node.proc.pid}

    def _do_console(self, step):
        node = self._node(step)
        if node.console_address is None:
            raise StepFailed("node %s has no console address (attach ... console=ADDRESS)" % step.node)
        deadline = time.monotonic() + 10
        while True:
            try:
                if node.kv is None:
                    node.kv = KvClient(node.console_address)
                reply = node.kv.request(step.text)
                break
            except (ColocoreError, ConnectionError) as exc:
                if node.kv is not None:
                    node.kv.close()
                    node.kv = None
                # a secondary opens its console only once it serves: try again for a while
                if time.monotonic() > deadline or "did not answer" in str(exc):
                    raise StepFailed("console %s: %s" % (step.node, exc)) from None
                time.sleep(0.05)
        node.last_output = reply
        return {"send": step.text, "reply": reply}


def main(args):
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file) as f:
                text = f.read()
    except OSError as exc:
        print("colocore script: cannot read %s: %s" % (args.file, exc.strerror), file=sys.stderr)
        return 2
    try:
        steps = parse(text)
    except ScriptError as exc:
        print("colocore script: %s: %s" % (args.file, exc), file=sys.stderr)
        return 2

    def terminate(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, terminate)
    workdir = getattr(args, "workdir", None)
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    try:
        return 0 if Runner(steps, workdir=workdir).run() else 1
    except KeyboardInterrupt:
        return 130
