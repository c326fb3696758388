"""`colocore monitor ADDRESS [COMMAND...]` against a real node."""
import subprocess
import sys

from colocore.clients.kv import KvClient


def _monitor(address, *command, stdin=None, timeout=30):
    p = subprocess.run([sys.executable, "-m", "colocore", "monitor", address, *command],
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _node(nodes):
    node = nodes.start("a", ["--kernel", "kvstore", "-m", "256M"])
    node.wait_monitor()
    KvClient(node.console).wait_ready()
    return node, "unix:" + node.monitor_path


def test_one_shot_commands(nodes):
    node, addr = _node(nodes)
    rc, out, err = _monitor(addr, "info", "migrate_capabilities")
    assert rc == 0, err
    assert "x-colo: off\n" in out and "(colocore)" not in out and "monitor -" not in out
    assert _monitor(addr, "migrate_set_capability", "x-colo", "on")[:2] == (0, "")
    assert "x-colo: on" in _monitor(addr, "info migrate_capabilities")[1]
    assert _monitor(addr, "info", "status")[1] == "VM status: running\n"
    rc, out, _ = _monitor(addr, "frobnicate")
    assert rc != 0 and out.startswith("unknown command")
    rc, out, _ = _monitor(addr, "migrate_set_capability", "nonsense", "on")
    assert rc != 0 and out.startswith("Error:")
    rc, out, _ = _monitor(addr, "quit")
    assert rc == 0
    assert node.proc.wait(10) == 0


def test_interactive_and_unreachable(nodes, tmp_path):
    node, addr = _node(nodes)
    rc, out, _ = _monitor(addr, stdin="stop\ninfo status\ncont\ninfo status\n")
    assert rc == 0
    assert "VM status: paused" in out and out.rstrip().endswith("(colocore)")
    assert node.hmp("info status") == "VM status: running"
    rc, out, err = _monitor("unix:%s" % (tmp_path / "nothing.sock"), "info", "status")
    assert rc == 1 and "is the node running?" in err
