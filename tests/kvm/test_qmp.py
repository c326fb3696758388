"""QMP against real nodes, through the standard `qemu.qmp` client and raw sockets."""
import asyncio
import json
import os
import socket
import time

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from colocore.clients.kv import KvClient
from colocore.tools.procs import free_port, wait_for
from colocore.clients.qmp import AsyncQmpClient, QmpClient, QmpError

ALL_COMMANDS = {"qmp_capabilities", "query-version", "query-commands", "query-status", "stop",
                "cont", "quit", "query-migrate-capabilities", "migrate-set-capabilities",
                "query-migrate-parameters", "migrate-set-parameters", "migrate",
                "migrate_cancel", "query-migrate", "x-colo-lost-heartbeat",
                "query-colo-status", "human-monitor-command"}


def _kvstore(nodes, name="a"):
    node = nodes.start(name, ["--kernel", "kvstore", "-m", "256M"])
    node.wait_monitor()
    _wait_path(node.qmp_path)
    kv = KvClient(node.console)
    kv.wait_ready()
    return node, kv


def _wait_path(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "%s never appeared" % path
        time.sleep(0.01)


async def _client(node):
    c = QMPClient(node.name)
    await c.connect(node.qmp_path)
    return c


async def _next_event(listener, name, timeout=10):
    async def get():
        while True:
            ev = await listener.get()
            if ev["event"] == name:
                return ev
    return await asyncio.wait_for(get(), timeout)


def test_greeting_and_queries(nodes):
    node, kv = _kvstore(nodes)

    async def go():
        c = await _client(node)
        ver = c.greeting.QMP.version
        assert ver["qemu"]["major"] >= 7 and ver["package"].startswith("colocore")
        assert await c.execute("query-version") == ver
        names = {x["name"] for x in await c.execute("query-commands")}
        assert ALL_COMMANDS <= names
        assert await c.execute("query-status") == {"running": True, "status": "running",
                                                   "singlestep": False}
        assert await c.execute("query-migrate") == {"status": "none"}
        # QEMU's fields, then what `info colo` shows, as data
        assert await c.execute("query-colo-status") == {
            "mode": "none", "last-mode": "none", "reason": "none", "failover-state": "none",
            "checkpoint-mode": "periodic",
            "checkpoint-causes": {"periodic": 0, "mismatch": 0, "timeout": 0, "bound": 0,
                                  "request": 0},
            "peer": "none", "peer-error": None,
            "checkpoints": 0, "reverted-pages": 0, "verified": 0, "verify-mismatches": 0}
        caps = await c.execute("query-migrate-capabilities")
        assert {"capability": "x-colo", "state": False} in caps
        params = await c.execute("query-migrate-parameters")
        assert params["x-checkpoint-delay"] == 200 and params["downtime-limit"] == 300
        assert params["x-compare-timeout"] == 20
        await c.disconnect()
    asyncio.run(go())
    assert kv.request("PING") == "PONG"


def test_stop_cont_events_and_hmp(nodes):
    node, kv = _kvstore(nodes)

    async def go():
        c = await _client(node)
        with c.listener() as listener:
            assert await c.execute("stop") == {}
            ev = await _next_event(listener, "STOP")
            assert ev["data"] == {} and set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
            st = await c.execute("query-status")
            assert st["running"] is False and st["status"] == "paused"
            out = await c.execute("human-monitor-command", {"command-line": "info status"})
            assert out == "VM status: paused\r\n"
            assert await c.execute("cont") == {}
            await _next_event(listener, "RESUME")
        assert (await c.execute("query-status"))["running"] is True
        # HMP errors come back as text, as in QEMU
        out = await c.execute("human-monitor-command", {"command-line": "frobnicate"})
        assert out.startswith("unknown command: 'frobnicate'")
        out = await c.execute("human-monitor-command", {"command-line": "info migrate_capabilities"})
        assert "x-colo: off\r\n" in out
        await c.disconnect()
    asyncio.run(go())
    assert kv.request("PING") == "PONG"


def test_capabilities_and_parameters(nodes):
    node, kv = _kvstore(nodes)

    async def go():
        c = await _client(node)
        await c.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "x-colo", "state": True}]})
        caps = await c.execute("query-migrate-capabilities")
        assert {"capability": "x-colo", "state": True} in caps
        await c.execute("migrate-set-parameters", {"x-checkpoint-delay": 150, "downtime-limit": 100})
        params = await c.execute("query-migrate-parameters")
        assert params["x-checkpoint-delay"] == 150 and params["downtime-limit"] == 100
        hmp = await c.execute("human-monitor-command", {"command-line": "info migrate_parameters"})
        assert "x-checkpoint-delay: 150 ms" in hmp
        # errors, and all-or-nothing: nothing changed by a failed call
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "xbzrle", "state": True},
                                              {"capability": "nonsense", "state": True}]})
        assert e.value.error_class == "GenericError"
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "xbzrle", "state": "yes"}]})
        assert "Invalid parameter type for 'state', expected: boolean" in str(e.value)
        caps = await c.execute("query-migrate-capabilities")
        assert {"capability": "xbzrle", "state": False} in caps
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate-set-parameters", {"x-checkpoint-delay": 10, "downtime-limit": 99999})
        assert e.value.error_class == "GenericError"
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate-set-parameters", {"x-checkpoint-delay": "fast"})
        assert "Invalid parameter type for 'x-checkpoint-delay', expected: integer" in str(e.value)
        with pytest.raises(ExecuteError) as e:
            await c.execute("migrate-set-parameters", {"no-such": 1})
        assert "Parameter 'no-such' is unexpected" in str(e.value)
        assert (await c.execute("query-migrate-parameters"))["x-checkpoint-delay"] == 150
        await c.disconnect()
    asyncio.run(go())


def test_errors_keep_the_connection(nodes):
    node, kv = _kvstore(nodes)

    async def go():
        c = await _client(node)
        for cmd, args, cls, desc in [
                ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
                ("qmp_capabilities", None, "CommandNotFound", "Capabilities negotiation is already complete"),
                ("migrate", None, "GenericError", "Parameter 'uri' is missing"),
                ("migrate", {"uri": 42}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
                ("migrate", {"uri": "ftp://x"}, "GenericError", "unsupported URI"),
                ("stop", {"force": True}, "GenericError", "Parameter 'force' is unexpected"),
                ("x-colo-lost-heartbeat", None, "GenericError", "not in COLO mode"),
                ("human-monitor-command", {"command-line": 1}, "GenericError", "expected: string")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute(cmd, args)
            assert e.value.error_class == cls, (cmd, e.value)
            assert desc in e.value.error.error.desc, (cmd, e.value.error.error.desc)
        assert (await c.execute("query-status"))["running"] is True
        await c.disconnect()
    asyncio.run(go())
    assert kv.request("PING") == "PONG"


def test_migrate_to_file_events_and_query_migrate(nodes, tmp_path):
    node, kv = _kvstore(nodes)
    kv.request("SET a 1")
    snap = str(tmp_path / "vm.snap")

    async def go():
        c = await _client(node)
        with c.listener() as listener:
            assert await c.execute("migrate", {"uri": "file:" + snap}) == {}
            seen = []
            while "completed" not in seen:
                ev = await _next_event(listener, "MIGRATION", 60)
                seen.append(ev["data"]["status"])
            assert seen[0] == "setup" and "active" in seen
        info = await c.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["ram"]["transferred"] > 0 and info["ram"]["normal"] > 0
        assert {"total-time", "downtime", "setup-time"} <= set(info)
        st = await c.execute("query-status")
        assert st == {"running": False, "status": "postmigrate", "singlestep": False}
        await c.execute("migrate_cancel")          # nothing to cancel: fine, as QEMU
        await c.execute("cont")
        await c.disconnect()
    asyncio.run(go())
    assert kv.request("GET a") == "1"


def test_colo_pair_over_qmp(nodes):
    """Protect, watch checkpoints, fail over the secondary-lost way: all through QMP."""
    port = free_port()
    sec = nodes.start("secondary", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port])
    pri, kv = _kvstore(nodes, "primary")
    sec.wait_monitor()
    _wait_path(sec.qmp_path)

    async def go():
        p, s = await _client(pri), await _client(sec)
        assert (await s.execute("query-status"))["status"] == "inmigrate"
        await s.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "x-colo", "state": True}]})
        await p.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "x-colo", "state": True}]})
        await p.execute("migrate-set-parameters", {"x-checkpoint-delay": 50})
        with p.listener() as pl, s.listener() as sl:
            await p.execute("migrate", {"uri": "tcp:127.0.0.1:%d" % port})
            while (await _next_event(pl, "MIGRATION", 60))["data"]["status"] != "colo":
                pass
            while (await _next_event(sl, "MIGRATION", 60))["data"]["status"] != "colo":
                pass
            cp = await _next_event(pl, "COLO_CHECKPOINT")
            assert {"id", "pause-ms", "dirty-pages", "bytes", "compression-ratio",
                    "latency-ms"} <= set(cp["data"])
            assert (await p.execute("query-colo-status"))["mode"] == "primary"
            assert (await s.execute("query-colo-status"))["mode"] == "secondary"
            info = await p.execute("query-migrate")
            assert info["status"] == "colo" and info["x-colo"]["checkpoints"] >= 1
            # capabilities are locked while COLO runs
            with pytest.raises(ExecuteError) as e:
                await p.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "x-colo", "state": False}]})
            assert "in progress" in e.value.error.error.desc
            await asyncio.get_running_loop().run_in_executor(None, kv.request, "SET k v")
            # planned failover on the primary: it leaves COLO and goes on alone
            await p.execute("x-colo-lost-heartbeat")
            ev = await _next_event(pl, "COLO_EXIT")
            assert ev["data"] == {"mode": "primary", "reason": "request"}
            with pytest.raises(ExecuteError) as e:
                await p.execute("x-colo-lost-heartbeat")
            assert e.value.error_class == "GenericError"
            sec.kill()
        colo = await p.execute("query-colo-status")
        assert colo["mode"] == "none" and colo["last-mode"] == "primary"
        assert colo["failover-state"] == "completed"
        assert (await p.execute("query-migrate"))["status"] == "completed"
        await p.disconnect()
        with pytest.raises(EOFError):     # qemu.qmp reports the killed node at disconnect
            await s.disconnect()
    asyncio.run(go())
    assert kv.request("GET k") == "v"


def test_several_clients_all_get_events_and_quit(nodes):
    node, kv = _kvstore(nodes)

    async def go():
        clients = [await _client(node) for _ in range(3)]
        listeners = [EventListener() for _ in clients]
        for c, l in zip(clients, listeners):
            c.register_listener(l)
        await clients[0].execute("stop")
        for l in listeners:
            await _next_event(l, "STOP")
        await clients[1].execute("cont")
        for l in listeners:
            await _next_event(l, "RESUME")
        assert await clients[2].execute("quit") == {}
        ev = await _next_event(listeners[0], "SHUTDOWN")
        assert ev["data"]["reason"] == "host-qmp-quit"
        for c, l in zip(clients, listeners):
            c.remove_listener(l)
            try:
                await c.disconnect()
            except EOFError:
                pass        # the node quit first and closed the connection: expected
    asyncio.run(go())
    assert node.proc.wait(10) == 0


# ---- raw sockets: the bad input a library would never send --------------------------------

class Raw:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def recv(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "the node closed the QMP connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        return self.recv() if "event" in msg else msg

    def cmd(self, execute, arguments=None, id=None):
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        if id is not None:
            msg["id"] = id
        self.send(json.dumps(msg) + "\n")
        return self.recv()


def test_bad_input_raw(nodes):
    node, kv = _kvstore(nodes)
    r = Raw(node.qmp_path)
    assert set(r.greeting["QMP"]) == {"version", "capabilities"}
    # a command before negotiation: QEMU's exact answer, id echoed
    assert r.cmd("query-status", id=7) == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7}
    assert r.cmd("qmp_capabilities", id="x") == {"return": {}, "id": "x"}
    # malformed JSON: GenericError, connection still usable
    r.send('{"execute": "query-status", \n')
    r.send('}}\n')             # a trailing comma, then a stray brace: two errors
    for _ in range(2):
        reply = r.recv()
        assert reply["error"]["class"] == "GenericError" and "JSON parse error" in reply["error"]["desc"]
    for bad, want in [("[1, 2]", "must be a JSON object"), ("42", "must be a JSON object"),
                      ('{"id": 1}', "lacks member 'execute'"),
                      ('{"execute": 5}', "'execute' must be a string"),
                      ('{"execute": "stop", "arguments": []}', "'arguments' must be an object"),
                      ('{"execute": "stop", "bogus": 1}', "'bogus' is unexpected"),
                      ("nonsense", "JSON parse error")]:
        r.send(bad + "\n")
        reply = r.recv()
        assert reply["error"]["class"] == "GenericError", (bad, reply)
        assert want in reply["error"]["desc"], (bad, reply)
    # a message split across writes and lines, and two in one write
    r.send('{"execute":\n "query-status",')
    r.send(' "id": {"nested": [1]}}{"execute": "query-version", "id": 2}')
    a, b = r.recv(), r.recv()
    assert a["id"] == {"nested": [1]} and a["return"]["running"] is True
    assert b["id"] == 2 and "qemu" in b["return"]
    # over the size limit: an error, then the connection goes on
    r.send('{"execute": "query-status", "arguments": {"x": "' + "a" * (2 << 20) + '"}}\n')
    reply = r.recv()
    assert reply["error"]["class"] == "GenericError" and "size limit" in reply["error"]["desc"]
    assert r.cmd("query-status", id=3)["return"]["status"] == "running"
    assert kv.request("PING") == "PONG"


def test_flood_and_vanishing_clients(nodes, tmp_path):
    node, kv = _kvstore(nodes)
    r = Raw(node.qmp_path)
    r.cmd("qmp_capabilities")
    n = 3000
    r.send("".join(json.dumps({"execute": "query-status", "id": i}) + "\n" for i in range(n)))
    for i in range(n):
        reply = r.recv()
        assert reply["id"] == i and reply["return"]["running"] is True
    # clients that leave mid-command (a slow one, a migration) or after a flood unread
    snap = str(tmp_path / "vm.snap")
    for cmd in ({"execute": "human-monitor-command", "arguments": {"command-line": "migrate file:%s" % snap}},
                {"execute": "query-commands"}):
        gone = Raw(node.qmp_path)
        gone.send(json.dumps({"execute": "qmp_capabilities"}) + "\n")
        gone.send((json.dumps(cmd) + "\n") * 50)
        gone.sock.close()
    wait_for(node, "info migrate", "Migration status: completed", timeout=60)
    assert r.cmd("cont", id="c") == {"return": {}, "id": "c"}
    assert r.cmd("query-status")["return"]["running"] is True
    assert kv.request("PING") == "PONG"


def test_colocore_clients(nodes):
    """colocore's own blocking and asyncio clients (script mode, console)."""
    node, kv = _kvstore(nodes)
    events = []
    c = QmpClient("unix:" + node.qmp_path, on_event=events.append)
    assert c.execute("query-status")["running"] is True
    with pytest.raises(QmpError) as e:
        c.execute("nope")
    assert e.value.error_class == "CommandNotFound"
    c.execute("stop")
    assert c.get_event(5)["event"] == "STOP"
    c.execute("cont")
    assert c.get_event(5)["event"] == "RESUME"
    assert [e["event"] for e in events] == ["STOP", "RESUME"]
    c.close()
    c.connect("unix:" + node.qmp_path)          # reconnect
    assert c.execute("query-version")["package"].startswith("colocore")
    c.close()

    async def go():
        a = AsyncQmpClient()
        await a.connect("unix:" + node.qmp_path)
        assert (await a.execute("query-status"))["running"] is True
        await a.execute("stop")
        ev = await asyncio.wait_for(a.events.get(), 5)
        assert ev["event"] == "STOP"
        with pytest.raises(QmpError):
            await a.execute("migrate", {"uri": 1})
        await a.execute("cont")
        await a.close()
        assert not a.connected
        await a.connect("unix:" + node.qmp_path)
        assert (await a.execute("query-status"))["running"] is True
        await a.close()
    asyncio.run(go())
