"""Hostile monitor clients: QMP's framer, its caps per client, in total and on clients,
HMP's bounded input. Finding 'The QMP framer loops over every byte in Python on the
control thread (~11.6 MiB/s) with no cap on connections or buffered input ... HMP has no
bound on queued lines. JSON nested 1,000-1,024 deep raises outside the handler'."""
import json
import socket
import time

import psutil

from colocore.clients.kv import KvClient
from colocore.control import qmp as qmp_server
from colocore.control.jsonframer import MAX_MESSAGE
from colocore.control.chardev import MAX_CLIENTS


def _kvstore(nodes):
    node = nodes.start("a", ["--kernel", "kvstore", "-m", "64M"])
    node.wait_monitor()
    kv = KvClient(node.console)
    kv.wait_ready()
    return node, kv


class Raw:
    def __init__(self, path, greet=True):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        if greet:
            assert "QMP" in self.recv()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **kw):
        self.send(json.dumps(dict({"execute": name}, **kw)) + "\n")
        return self.recv()

    def closed_by_peer(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_deep_nesting_is_answered_and_the_connection_lives(nodes):
    node, kv = _kvstore(nodes)
    r = Raw(node.qmp_path)
    assert r.cmd("qmp_capabilities") == {"return": {}}
    for depth in (999, 1000, 1010, 1024):
        r.send("[" * depth + "]" * depth + "\n")
        reply = r.recv()
        assert reply["error"]["class"] == "GenericError", (depth, reply)
    r.send("[" * 1025)
    assert "nesting depth limit" in r.recv()["error"]["desc"]
    r.send("\n")
    assert r.cmd("query-status", id=7)["return"]["running"] is True
    assert kv.request("PING") == "PONG"


def test_unfinished_messages_are_capped_per_client_and_in_total(nodes):
    node, kv = _kvstore(nodes)
    proc = psutil.Process(node.pid)
    rss0 = proc.memory_info().rss
    held = []
    # 40 clients each try to hold a 1 MiB unfinished message; together they may hold at
    # most TOTAL_MAX: the ones that would pass it are told so and dropped
    chunk = b'{"execute": "x", "arguments": {"s": "' + b"a" * ((1 << 20) - 64)
    dropped = 0
    for _ in range(40):
        c = Raw(node.qmp_path)
        try:
            c.send(chunk)
        except OSError:
            pass
        held.append(c)
    time.sleep(0.5)
    for c in held:
        c.sock.settimeout(0.2)
        try:
            data = c.sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        if b"input buffers are full" in data or not data:
            dropped += 1
    assert dropped >= 40 - qmp_server.TOTAL_MAX // (1 << 20), dropped
    growth = proc.memory_info().rss - rss0
    assert growth < qmp_server.TOTAL_MAX + (48 << 20), growth >> 20
    for h in held:
        h.sock.close()
    time.sleep(0.3)
    # a message past MAX_MESSAGE is refused and the client goes on
    c = Raw(node.qmp_path)
    c.send(b'{"execute": "' + b"b" * (MAX_MESSAGE + 10) + b'"}\n')
    assert "exceeds the size limit" in c.recv()["error"]["desc"]
    assert c.cmd("qmp_capabilities") == {"return": {}}
    assert kv.request("PING") == "PONG"


def test_connections_past_the_cap_are_refused_and_logged(nodes):
    node, kv = _kvstore(nodes)
    clients = [Raw(node.qmp_path, greet=False) for _ in range(MAX_CLIENTS + 5)]
    refused = sum(1 for c in clients[MAX_CLIENTS:] if c.closed_by_peer(2))
    assert refused == 5
    assert "clients already; refusing one more" in node.log_tail()
    for c in clients:
        c.sock.close()
    assert node.qmp("query-status")["running"] is True
    assert kv.request("PING") == "PONG"


def test_hmp_input_is_bounded(nodes):
    node, kv = _kvstore(nodes)
    proc = psutil.Process(node.pid)
    s = socket.socket(socket.AF_UNIX)
    s.connect(node.monitor_path)
    s.setblocking(False)
    rss0 = proc.memory_info().rss
    # 32 MiB of commands, never reading the answers: the node stops reading this client
    # instead of queueing the lines
    line = b"info status\n" * 4096
    sent = 0
    deadline = time.monotonic() + 5
    while sent < (32 << 20) and time.monotonic() < deadline:
        try:
            sent += s.send(line)
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < (32 << 20), "the node read everything it was sent"
    assert proc.memory_info().rss - rss0 < (48 << 20)
    s.close()
    # an over-long line is answered with an error, the monitor goes on
    out = node.hmp("x" * 70000)
    assert "command line too long" in out
    assert node.hmp("info status") == "VM status: running"
    assert kv.request("PING") == "PONG"
