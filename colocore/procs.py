"""Start and stop node processes (demo, script mode, tests, benchmarks).

Every process started here is remembered by pid and stopped again by `stop()` or
`NodeSet.close()`, also when the caller fails half-way.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .errors import ColocoreError
from .monitor_client import MonitorClient


# Every node process started here, by pid: the test suite checks at its end that none
# of them outlived it (colocore's rule: whatever a test or benchmark starts, it stops).
STARTED_PIDS = set()


def still_running(pids):
    """The pids of `pids` that are still alive (zombies, reaped or not, count as gone)."""
    alive = []
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


class NodeProcess:
    def __init__(self, name, workdir, run_args, log_path=None, env=None, qmp=False, prefix=()):
        self.name = name
        self.workdir = workdir
        self.monitor_path = os.path.join(workdir, "%s-mon.sock" % name)
        self.console_path = os.path.join(workdir, "%s-console.sock" % name)
        self.log_path = log_path or os.path.join(workdir, "%s.log" % name)
        # prefix: e.g. ["ip", "netns", "exec", NS] to run the node on a test host
        argv = [*prefix, sys.executable, "-m", "colocore", "run", "--name", name,
                "--monitor", "unix:%s,server=on,wait=off" % self.monitor_path,
                "--console", "unix:%s,server=on,wait=off" % self.console_path] + list(run_args)
        # qmp=True: also a QMP socket, NAME-qmp.sock beside the monitor's
        self.qmp_path = os.path.join(workdir, "%s-qmp.sock" % name) if qmp else None
        if qmp:
            argv += ["--qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        self.logf = open(self.log_path, "ab")
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=full_env)
        self.pid = self.proc.pid
        STARTED_PIDS.add(self.pid)
        self.monitor = None

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
        if self.monitor is not None:
            try:
                self.monitor.close()
            except OSError:
                pass
            self.monitor = None
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

    def start(self, name, run_args, env=None, qmp=False, prefix=()):
        if name in self.nodes:
            self.nodes[name].stop()
        node = NodeProcess(name, self.workdir, run_args, env=env, qmp=qmp, prefix=prefix)
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
    """Poll an HMP command until its output contains `pattern`; return the output."""
    deadline = time.monotonic() + timeout
    while True:
        out = node.hmp(command)
        if pattern in out:
            return out
        if node.proc.poll() is not None:
            raise ColocoreError("node %s died while waiting for %r; log:\n%s"
                                % (node.name, pattern, node.log_tail()))
        if time.monotonic() > deadline:
            raise ColocoreError("node %s: %r never showed %r; last output:\n%s"
                                % (node.name, command, pattern, out))
        time.sleep(0.02)


def start_protected_pair(nodes, kernel="kvstore", append="", mem="256M", delay_ms=200,
                         verify=False, primary_env=None, secondary_env=None,
                         primary_extra=(), secondary_extra=(), capabilities=(), qmp=False,
                         pause_mode=None):
    """A primary and a secondary on loopback, x-colo on, in COLO. Returns (pri, sec).
    `pause_mode` (default: the NodeSet's `pause_mode` attribute, else the engine's
    default) is a checkpoint.pause_mode name, e.g. copy or hot+pre+cow."""
    port = free_port()
    uri = "tcp:127.0.0.1:%d" % port
    verify_arg = ["--colo-verify"] if verify else []
    sec = nodes.start("secondary", ["-m", mem, "--incoming", uri, *verify_arg, *secondary_extra],
                      env=secondary_env, qmp=qmp)
    pri_args = ["--kernel", kernel, "-m", mem, *verify_arg, *primary_extra]
    if append:
        pri_args += ["--append", append]
    pri = nodes.start("primary", pri_args, env=primary_env, qmp=qmp)
    sec.wait_monitor()
    pri.wait_monitor()
    for cap in ("x-colo", *capabilities):
        out = pri.hmp("migrate_set_capability %s on" % cap)
        if out:
            raise ColocoreError("primary refused %s: %s" % (cap, out))
    out = pri.hmp("migrate_set_parameter x-checkpoint-delay %d" % delay_ms)
    if out:
        raise ColocoreError("primary refused the checkpoint delay: %s" % out)
    mode = pause_mode or getattr(nodes, "pause_mode", None)
    if mode:
        from .params import pause_mode_parameters
        for name, value in pause_mode_parameters(mode).items():
            out = pri.hmp("migrate_set_parameter %s %s" % (name, value))
            if out:
                raise ColocoreError("primary refused pause mode %s: %s" % (mode, out))
    out = pri.hmp("migrate %s" % uri)
    if out:
        raise ColocoreError("migrate failed: %s" % out)
    wait_for(pri, "info migrate", "Migration status: colo")
    wait_for(sec, "info colo", "COLO mode: secondary")
    return pri, sec
