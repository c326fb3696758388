"""Nodes die with whatever started them, however it dies. Finding '`colocore-tui --demo`
killed by its terminal (SIGHUP) leaves both demo nodes running' (and the same for the
demo, script mode and the benchmarks, which all start nodes through tools/procs.py)."""
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from colocore.tools.procs import NodeSet


def _gone(pids, timeout=10.0):
    """True once none of `pids` runs (zombies waiting for init count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _kill_leftovers(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_nodes_started_from_a_thread_outlive_the_thread_but_not_the_process(tmp_path):
    """PR_SET_PDEATHSIG fires when the forking THREAD ends: nodes are forked by one
    long-lived thread, so a worker that starts them (the console's demo) may return."""
    started = {}

    def worker(ns):
        node = ns.start("a", ["--kernel", "kvstore", "-m", "32M"])
        started["pid"] = node.pid
    with NodeSet(str(tmp_path)) as ns:
        t = threading.Thread(target=worker, args=(ns,))
        t.start()
        t.join()
        ns.nodes["a"].wait_monitor()
        time.sleep(0.5)
        assert psutil.pid_exists(started["pid"]) and ns.nodes["a"].proc.poll() is None
        assert ns.nodes["a"].qmp("query-status")["status"] == "running"


def test_demo_killed_with_sigkill_leaves_no_node():
    demo = subprocess.Popen([sys.executable, "-m", "colocore", "demo", "--json", "--seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    pids = []
    try:
        for line in demo.stdout:
            step = json.loads(line)
            if step["step"] == "protected":
                pids = [step["primary_pid"], step["secondary_pid"]]
                break
        assert pids and all(psutil.pid_exists(p) for p in pids)
        demo.kill()                              # SIGKILL: no cleanup code runs in the demo
        demo.wait(10)
        assert _gone(pids), "demo nodes outlived a SIGKILLed demo: %s" % pids
    finally:
        demo.kill()
        demo.wait(10)
        _kill_leftovers(pids)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_console_demo_killed_leaves_no_node(sig):
    """The real `colocore-tui --demo` on a pseudo-terminal, killed by a hang-up of its
    terminal or by SIGKILL."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="30")
    tui = subprocess.Popen([sys.executable, "-m", "colocore_tui.app", "--demo"], stdin=slave,
                           stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    pids = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # keep the terminal drained so the console never blocks on output
            while select.select([master], [], [], 0)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
            try:
                kids = psutil.Process(tui.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            pids = [k.pid for k in kids if "colocore" in " ".join(k.cmdline()) and
                    "run" in k.cmdline()]
            if len(pids) == 2 and all(psutil.Process(p).create_time() < time.time() - 2 for p in pids):
                break
            time.sleep(0.2)
        assert len(pids) == 2, "the console's demo did not start its pair"
        os.kill(tui.pid, sig)
        tui.wait(15)
        assert _gone(pids), "demo nodes outlived the console killed by %s: %s" % (sig.name, pids)
    finally:
        if tui.poll() is None:
            tui.kill()
            tui.wait(10)
        os.close(master)
        _kill_leftovers(pids)
