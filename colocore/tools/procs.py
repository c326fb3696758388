"""Start and stop node processes (demo, script mode, tests, benchmarks).

Every process started here is stopped again by `stop()` or `NodeSet.close()`, by pid,
also when the caller fails half-way, and dies with the process that started it however
that one dies (SIGKILL included): see `spawn()`. Each node gets an HMP monitor, a QMP
socket and a console socket in the work directory; tools read a node's state as QMP data.
"""
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from colocore.clients.hmp import MonitorClient
from colocore.clients.qmp import QmpClient
from colocore.errors import ColocoreError
from colocore.migration.params import pause_mode_parameters


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent_pid):
    """preexec_fn: the child gets SIGKILL when its parent dies. Set in the child between
    fork and exec (it survives exec); if the parent died before prctl took effect, the
    child is already an orphan (its parent pid changed) and kills itself."""
    def preexec():
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


class _Spawner(threading.Thread):
    """PR_SET_PDEATHSIG fires when the THREAD that forked the child ends, not the
    process: a node started from a worker thread (the console's demo starts its pair in
    one) would be killed as soon as that worker returned. So every child is forked by
    this one thread, which lives exactly as long as the process."""

    def __init__(self):
        super().__init__(name="procs-spawner", daemon=True)
        self.requests = queue.Queue()
        self.start()

    def run(self):
        while True:
            argv, kwargs, done = self.requests.get()
            try:
                done.append(subprocess.Popen(argv, preexec_fn=_die_with_parent(os.getpid()),
                                             **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.append(exc)
            finally:
                with _spawn_lock:
                    _spawn_cond.notify_all()


_spawn_lock = threading.Lock()
_spawn_cond = threading.Condition(_spawn_lock)
_spawner = None


def spawn(argv, **kwargs):
    """subprocess.Popen(argv, **kwargs) for a child that dies with this process."""
    global _spawner
    with _spawn_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = _Spawner()
        done = []
        _spawner.requests.put((argv, kwargs, done))
        while not done:
            _spawn_cond.wait()
    result = done[0]
    if isinstance(result, BaseException):
        raise result
    return result


def qmp_path(workdir, name):
    """Where a node started here serves QMP (known before it starts: the console's demo)."""
    return os.path.join(workdir, "%s-qmp.sock" % name)


class NodeProcess:
    def __init__(self, name, workdir, run_args, log_path=None, env=None, prefix=()):
        self.name = name
        self.workdir = workdir
        self.monitor_path = os.path.join(workdir, "%s-mon.sock" % name)
        self.console_path = os.path.join(workdir, "%s-console.sock" % name)
        self.log_path = log_path or os.path.join(workdir, "%s.log" % name)
        # prefix: e.g. ["ip", "netns", "exec", NS] to run the node on a test host
        argv = [*prefix, sys.executable, "-m", "colocore", "run", "--name", name,
                "--monitor", "unix:%s,server=on,wait=off" % self.monitor_path,
                "--console", "unix:%s,server=on,wait=off" % self.console_path] + list(run_args)
        self.qmp_path = qmp_path(workdir, name)
        if "--qmp" not in run_args:          # a caller's own --qmp (e.g. tcp with TLS) wins
            argv += ["--qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        self.logf = open(self.log_path, "ab")
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        self.proc = spawn(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True, env=full_env)
        self.pid = self.proc.pid
        self.monitor = None
        self._qmp = None

    @property
    def console(self):
        return "unix:" + self.console_path

    def wait_monitor(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ColocoreError("node %s exited with %s before its monitor came up; log:\n%s"
                                    % (self.name, self.proc.returncode, self.log_tail()))
            if os.path.exists(self.monitor_path):
                try:
                    self.monitor = MonitorClient("unix:" + self.monitor_path)
                    return self.monitor
                except ColocoreError:
                    pass
            if time.monotonic() > deadline:
                raise ColocoreError("node %s: monitor not up after %.0f s" % (self.name, timeout))
            time.sleep(0.02)

    def hmp(self, line, timeout=None):
        if self.monitor is None:
            self.wait_monitor()
        return self.monitor.cmd(line, timeout)

    def qmp(self, command, arguments=None, timeout=None):
        """Run a QMP command; returns its data (QmpError for an error reply)."""
        if self._qmp is None:
            self.wait_monitor()
            self._qmp = QmpClient("unix:" + self.qmp_path)
        return self._qmp.execute(command, arguments, timeout=timeout)

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self, timeout=5.0):
        """Stop the node by pid: quit politely, then SIGTERM, then SIGKILL."""
        for client in (self.monitor, self._qmp):
            if client is not None:
                try:
                    client.close()
                except OSError:
                    pass
        self.monitor = self._qmp = None
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        self.logf.close()
        return self.proc.returncode


class NodeSet:
    """The nodes of a run; `close()` stops every one of them."""

    def __init__(self, workdir=None):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="colocore-")
            workdir = self._tmp.name
        self.workdir = workdir
        self.nodes = {}

    def start(self, name, run_args, env=None, prefix=()):
        if name in self.nodes:
            self.nodes[name].stop()
        node = NodeProcess(name, self.workdir, run_args, env=env, prefix=prefix)
        self.nodes[name] = node
        return node

    def close(self):
        for node in self.nodes.values():
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(node, command, pattern, timeout=30.0):
    """Poll an HMP command until its output contains `pattern`; return the output.
    (For tests of the monitor's words; tools wait on QMP data with wait_until.)"""
    return _poll(node, lambda: node.hmp(command), lambda out: pattern in out,
                 "%r to show %r" % (command, pattern), timeout)


def wait_until(node, command, test, what, timeout=30.0, interval=0.02):
    """Poll a QMP query until `test(data)` holds; return the data."""
    return _poll(node, lambda: node.qmp(command), test, what, timeout, interval)


def _poll(node, read, test, what, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        out = read()
        if test(out):
            return out
        if node.proc.poll() is not None:
            raise ColocoreError("node %s died while waiting for %s; log:\n%s"
                                % (node.name, what, node.log_tail()))
        if time.monotonic() > deadline:
            raise ColocoreError("node %s: timed out waiting for %s; last:\n%s"
                                % (node.name, what, out))
        time.sleep(interval)


def protect(pri, uri, delay_ms=200, capabilities=(), timeout=60.0, pause_mode=None):
    """x-colo (and `capabilities`) on, the checkpoint delay (and the parameters of
    `pause_mode`, a colo/checkpoint.py pause_mode name such as copy or hot+pre+cow),
    migrate to `uri`, and wait until the primary is in COLO. Returns the milliseconds
    that took."""
    pri.qmp("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": True} for c in ("x-colo", *capabilities)]})
    pri.qmp("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})
    if pause_mode:
        pri.qmp("migrate-set-parameters", pause_mode_parameters(pause_mode))
    t0 = time.perf_counter()
    pri.qmp("migrate", {"uri": uri})
    wait_until(pri, "query-migrate", lambda d: d["status"] in ("colo", "failed"),
               "COLO", timeout)
    status = pri.qmp("query-migrate")
    if status["status"] != "colo":
        raise ColocoreError("migrate %s failed: %s" % (uri, status.get("error-desc")))
    return (time.perf_counter() - t0) * 1000


def start_protected_pair(nodes, kernel="kvstore", append="", mem="256M", delay_ms=200,
                         verify=False, primary_env=None, secondary_env=None,
                         primary_extra=(), secondary_extra=(), capabilities=(),
                         pause_mode=None):
    """A primary and a secondary on loopback, x-colo on, in COLO. Returns (pri, sec).
    `pause_mode` (default: the NodeSet's `pause_mode` attribute, else the engine's
    default) is a colo/checkpoint.py pause_mode name, e.g. copy or hot+pre+cow."""
    uri = "tcp:127.0.0.1:%d" % free_port()
    verify_arg = ["--colo-verify"] if verify else []
    sec = nodes.start("secondary", ["-m", mem, "--incoming", uri, *verify_arg, *secondary_extra],
                      env=secondary_env)
    pri_args = ["--kernel", kernel, "-m", mem, *verify_arg, *primary_extra]
    if append:
        pri_args += ["--append", append]
    pri = nodes.start("primary", pri_args, env=primary_env)
    sec.wait_monitor()
    pri.wait_monitor()
    protect(pri, uri, delay_ms, capabilities,
            pause_mode=pause_mode or getattr(nodes, "pause_mode", None))
    wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO secondary")
    return pri, sec
