"""A kvstore node end to end: console service, monitor, save to a file, restore."""
import re
import time

import pytest

from colocore.clients.kv import KvClient
from colocore.tools.procs import wait_for


def _kvstore(nodes, name="a", extra=()):
    node = nodes.start(name, ["--kernel", "kvstore", "-m", "256M", *extra])
    node.wait_monitor()
    kv = KvClient(node.console)
    kv.wait_ready()
    return node, kv


def test_monitor_basics(nodes):
    node, kv = _kvstore(nodes)
    assert node.hmp("info status") == "VM status: running"
    assert "info [subcommand] -- show various information" in node.hmp("help")
    assert "status -- show the current VM status" in node.hmp("info")
    assert re.search(r"^migrate \[-d\] uri", node.hmp("help"), re.M)
    assert node.hmp("stop") == ""
    assert node.hmp("info status") == "VM status: paused"
    assert node.hmp("cont") == ""
    assert node.hmp("info status") == "VM status: running"
    assert kv.request("PING") == "PONG"
    assert node.hmp("frobnicate").startswith("unknown command: 'frobnicate'")
    assert node.hmp("info nonsense").startswith("Error: unknown info subcommand")
    assert node.hmp("migrate").startswith("Error:")
    assert node.hmp("migrate ftp://x").startswith("Error: migrate: unsupported URI")
    node.hmp("quit")
    assert node.proc.wait(10) == 0


def test_guest_keeps_serving_while_paused_requests_wait(nodes):
    node, kv = _kvstore(nodes)
    node.hmp("stop")
    kv.sock.sendall(b"SET k v\n")
    kv.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        kv.sock.recv(10)          # a paused guest answers nothing...
    node.hmp("cont")
    assert kv._readline(time.monotonic() + 5) == "OK"   # ...and answers once resumed
    assert kv.request("GET k") == "v"


def test_snapshot_restore_10000_keys(nodes, tmp_path):
    node, kv = _kvstore(nodes)
    keys = {"k%05d" % i: "v%d" % (i * 31) for i in range(10000)}
    replies = kv.pipeline(["SET %s %s" % item for item in keys.items()])
    assert replies == ["OK"] * len(keys)
    assert kv.request("COUNT") == "10000"
    snap = str(tmp_path / "vm.snap")
    assert node.hmp("migrate file:%s" % snap, timeout=120) == ""
    assert node.hmp("info status") == "VM status: paused (postmigrate)"
    assert "Migration status: completed" in node.hmp("info migrate")
    kv.close()
    node.hmp("quit")
    assert node.proc.wait(10) == 0

    restored = nodes.start("b", ["--incoming", "file:%s" % snap])
    restored.wait_monitor()
    kv = KvClient(restored.console)
    kv.wait_ready()
    replies = kv.pipeline(["GET %s" % k for k in keys])
    assert replies == list(keys.values())
    assert kv.request("COUNT") == "10000"
    assert kv.pipeline(["SET new%d x" % i for i in range(500)]) == ["OK"] * 500
    assert kv.request("COUNT") == "10500"
    assert kv.request("DEL k00000") == "OK"
    assert kv.request("GET k00000") == "NIL"


def test_snapshot_twice_and_continue_same_process(nodes, tmp_path):
    node, kv = _kvstore(nodes)
    kv.request("SET a 1")
    snap = str(tmp_path / "one.snap")
    assert node.hmp("migrate file:%s" % snap, timeout=60) == ""
    node.hmp("cont")                       # postmigrate -> running again, as in QEMU
    assert kv.request("GET a") == "1"
    assert node.hmp("migrate file:%s" % snap, timeout=60) == ""


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_bad_snapshot_rejected(nodes, tmp_path, damage):
    node, kv = _kvstore(nodes)
    kv.request("SET a 1")
    snap = str(tmp_path / "vm.snap")
    assert node.hmp("migrate file:%s" % snap, timeout=60) == ""
    node.stop()
    data = bytearray(open(snap, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[:len(data) * 2 // 3]
    elif damage == "foreign":
        data = bytearray(b"QEVM" + bytes(4096))
    else:
        data = bytearray()
    open(snap, "wb").write(bytes(data))
    bad = nodes.start("b", ["--incoming", "file:%s" % snap])
    assert bad.proc.wait(30) == 1
    log = bad.log_tail()
    expect = {"flip": "checksum", "truncate": "truncated", "foreign": "not a colocore stream",
              "empty": "is empty"}[damage]
    assert expect in log, log
    assert "Traceback" not in log


def test_pause_is_prompt_with_a_spinning_guest(nodes):
    node = nodes.start("d", ["--kernel", "dirtier", "--append", "wss=100"])
    node.wait_monitor()
    for _ in range(20):
        assert node.hmp("stop") == ""
        assert node.hmp("info status") == "VM status: paused"
        assert node.hmp("cont") == ""
    assert node.hmp("info status") == "VM status: running"


@pytest.mark.parametrize("append, message", [
    ("pattern=zigzag", "dirtier: pattern= must be hot, scan or random"),
    ("pattern=random wss=10 span=5", "dirtier: span= must be at least wss="),
    ("pattern=random span=99999999", "dirtier: span=99999999 pages does not fit in RAM"),
    ("pattern=scan interval=0", "dirtier: interval= must be at least 1 ms"),
])
def test_dirtier_refuses_bad_arguments(nodes, append, message):
    node = nodes.start("d", ["--kernel", "dirtier", "--append", append])
    node.wait_monitor()
    wait_for(node, "info status", "guest-panicked")
    assert message in node.log_tail(), node.log_tail()
