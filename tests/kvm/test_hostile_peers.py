"""Peers that lie, stall or crowd a destination (issue 11): real nodes, real sockets.

A hand-made peer (this test) speaks the wire protocol to a real `colocore run --incoming`
node: it says nothing, trickles, claims sizes it does not send, sends malformed state,
or becomes a COLO primary and then sends a hostile checkpoint. The node must refuse each
with a clear line, keep its memory bounded, and stay usable: a real primary still
protects through it, and a secondary whose primary lied can still take over from the
last state it loaded whole.
"""
import array
import json
import socket
import struct
import threading
import time

import pytest

from colocore.clients.kv import KvClient
from colocore.migration.transport import Msg, U32, U64
from colocore.tools.procs import free_port, protect, wait_until
from colocore.vmstate import format as stream, sections, snapshot
from colocore.vmstate.format import Section

MEM = 256 << 20


def _secondary(nodes, name="sec"):
    port = free_port()
    sec = nodes.start(name, ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port])
    sec.wait_monitor()
    return sec, port


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def _send(port, data, read_back=True):
    s = socket.create_connection(("127.0.0.1", port))
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""              # refused before it read everything: as it should
        s.settimeout(15)
        got = b""
        while read_back:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def _machine(**extra):
    return stream.section_bytes(Section.MACHINE, sections.encode_json(dict(mem_size=MEM, **extra)))


def _protect_through(nodes, port):
    pri = nodes.start("pri", ["--kernel", "kvstore", "-m", "256M"])
    pri.wait_monitor()
    protect(pri, "tcp:127.0.0.1:%d" % port, delay_ms=100)
    return pri


def test_silent_connections_hold_only_themselves(nodes):
    """'One silent connection to --incoming ... kept the primary's guest paused 59.7 s'."""
    sec, port = _secondary(nodes)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(stream.header()[:5])          # a slowloris: a few bytes, then nothing
    try:
        t0 = time.monotonic()
        pri = _protect_through(nodes, port)
        took = time.monotonic() - t0
        info = pri.qmp("query-migrate")
        assert info["status"] == "colo"
        # the guest was paused for the stop-and-copy only, not for a silent neighbour
        assert info["downtime"] < 4000, info
        assert took < 30
    finally:
        for s in silent + [trickle]:
            s.close()
    # the silent ones were dropped at their deadline, with a line each
    deadline = time.monotonic() + 15
    while "before it began a migration" not in sec.log_tail(80):
        assert time.monotonic() < deadline, sec.log_tail()
        time.sleep(0.1)


def test_a_destination_that_never_answers_cannot_hold_the_guest_paused(nodes):
    """A 'destination' that reads everything and never answers: the primary's guest is
    resumed after the finish-migrate bound, with a clear error."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def sink():
        conn, _ = srv.accept()
        conn.settimeout(0.5)
        while not stop.is_set():
            try:
                if not conn.recv(1 << 20):
                    break
            except TimeoutError:
                pass
        conn.close()
    t = threading.Thread(target=sink, daemon=True)
    t.start()
    try:
        pri = nodes.start("pri", ["--kernel", "kvstore", "-m", "256M"])
        pri.wait_monitor()
        kv = KvClient(pri.console)
        kv.wait_ready()
        pri.qmp("migrate", {"uri": "tcp:127.0.0.1:%d" % port})
        info = wait_until(pri, "query-migrate", lambda d: d["status"] == "failed",
                          "the migration to fail", timeout=60)
        assert "did not take the final state within" in info["error-desc"], info
        assert pri.qmp("query-status")["status"] == "running"
        assert kv.request("PING") == "PONG"
    finally:
        stop.set()
        srv.close()
        t.join(5)


@pytest.mark.parametrize("lie", ["delta-claims", "lz4-claims", "ram-claims", "device-rx-int",
                                 "device-deep", "float-mem"])
def test_size_claims_do_not_grow_memory_and_the_listener_survives(nodes, lie):
    """'Size claims make the secondary allocate far more than it receives' and
    'Exceptions escape the incoming thread'."""
    sec, port = _secondary(nodes)
    base = _rss_kib(sec.pid)
    head = stream.header() + _machine()
    if lie == "delta-claims":
        # 1 MiB of RAM_DELTA once allocated 512 MiB; four of them took RSS to 2.6 GiB
        body = struct.pack("<I", 131000) + bytes(1 << 20)
        data = head + stream.section_bytes(Section.RAM_DELTA, body) * 4
    elif lie == "lz4-claims":
        n = 1 << 18                                  # 1 GiB of pages from a few bytes
        body = struct.pack("<BBHI", 1, 0, 0, n) + array.array("I", [0] * n).tobytes() + \
            bytes(64)
        data = head + stream.section_bytes(Section.RAM, body)
    elif lie == "ram-claims":
        body = struct.pack("<BBHI", 0, 0, 0, 1 << 30)
        data = head + stream.section_bytes(Section.RAM, body + bytes(4096))
    elif lie == "device-rx-int":
        devices = {"uart": {"ier": 0, "lcr": 3, "mcr": 8, "scr": 0, "fcr": 0, "dll": 12,
                            "dlm": 0, "rx": 10 ** 9}}
        data = head + stream.section_bytes(Section.CPU, b"") + \
            stream.section_bytes(Section.DEVICES, sections.encode_json(devices)) + \
            stream.section_bytes(Section.END, b"")
    elif lie == "device-deep":
        data = head + stream.section_bytes(Section.DEVICES, b"[" * 5000 + b"]" * 5000)
    else:
        data = stream.header() + stream.section_bytes(Section.MACHINE, b'{"mem_size": 1e300}')
    _send(port, data)
    deadline = time.monotonic() + 15
    while "incoming" not in sec.log_tail(20) or ("failed" not in sec.log_tail(20) and
                                                  "dropped" not in sec.log_tail(20)):
        assert time.monotonic() < deadline, sec.log_tail()
        time.sleep(0.05)
    assert "Traceback" not in sec.log_tail(200)
    # A stranger may make a node hold at most one section (64 MiB) at a time: far below
    # what these claims would have taken.
    assert _rss_kib(sec.pid) - base < 96 * 1024, (base, _rss_kib(sec.pid))
    assert sec.hmp("info status") == "VM status: paused (inmigrate)"
    pri = _protect_through(nodes, port)
    assert pri.qmp("query-migrate")["status"] == "colo"


def _migration_stream(unit):
    """A live-migration stream (x-colo on) carrying a saved unit: what a stranger with a
    snapshot could send to a destination without TLS."""
    parts = [stream.header(), _machine(**{"x-colo": True, "kernel": unit.info.get("kernel")})]
    for pfns, data in unit.ram:
        for i in range(0, len(pfns), 1024):
            parts.append(stream.section_bytes(Section.RAM, sections.encode_ram(
                pfns[i:i + 1024], data[i * 4096:(i + 1024) * 4096], False)))
    parts.append(stream.section_bytes(Section.CPU, sections.encode_cpu(unit.cpu)))
    parts.append(stream.section_bytes(Section.DEVICES, sections.encode_devices(unit.devices)))
    parts.append(stream.section_bytes(Section.END, b""))
    return b"".join(parts)


def _expect(sock, msg):
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        assert chunk, "the secondary hung up"
        got += chunk
    (value,) = U32.unpack(got)
    assert value == msg, (value, msg)


@pytest.mark.parametrize("lie", ["devices", "vcpu", "digest", "info"])
def test_a_hostile_checkpoint_ends_colo_cleanly_and_takeover_still_works(nodes, tmp_path, lie):
    """'the COLO loop dies silently while info colo keeps saying peer: connected, no
    COLO_EXIT is sent and no failover can fire' and 'A checkpoint can be half-applied'."""
    donor = nodes.start("donor", ["--kernel", "kvstore", "-m", "256M"])
    donor.wait_monitor()
    kv = KvClient(donor.console)
    kv.wait_ready()
    assert kv.request("SET before-the-lie 1") == "OK"
    kv.close()
    snap = str(tmp_path / "donor.snap")
    donor.qmp("migrate", {"uri": "file:%s" % snap})
    wait_until(donor, "query-migrate", lambda d: d["status"] == "completed", "the save")
    donor.stop()
    unit = snapshot.read_file(snap)
    sec, port = _secondary(nodes)
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    s.sendall(_migration_stream(unit))
    _expect(s, Msg.CHECKPOINT_READY)
    wait_until(sec, "query-colo-status", lambda d: d["mode"] == "secondary", "COLO")
    s.sendall(U32.pack(Msg.CHECKPOINT_REQUEST))
    _expect(s, Msg.CHECKPOINT_REPLY)
    info = {"id": 1, "dirty": 1}
    cpu, devices, digest = dict(unit.cpu), json.loads(sections.encode_devices(unit.devices)), None
    if lie == "devices":
        devices["virtio-console"]["rx_pending"] = 10 ** 9
    elif lie == "vcpu":
        cpu["sregs"] = cpu["sregs"][:100]
    elif lie == "digest":
        digest = bytes(7)
    else:
        info = {"id": "one"}
    ram = stream.section_bytes(Section.CHECKPOINT, sections.encode_json(info)) + \
        stream.section_bytes(Section.RAM, sections.encode_ram(
            array.array("I", [0x500]), b"\xee" * 4096, False)) + \
        stream.section_bytes(Section.END, b"")
    dev = stream.section_bytes(Section.CPU, sections.encode_cpu(cpu)) + \
        stream.section_bytes(Section.DEVICES, json.dumps(devices).encode()) + \
        (stream.section_bytes(Section.CHECKPOINT, digest) if digest is not None else b"") + \
        stream.section_bytes(Section.END, b"")
    try:
        s.sendall(U32.pack(Msg.VMSTATE_SEND) + ram + U32.pack(Msg.VMSTATE_SIZE) +
                  U64.pack(len(dev)) + dev)
    except OSError:
        pass                        # it may hang up before reading it all
    st = wait_until(sec, "query-colo-status", lambda d: d["peer"] == "lost",
                    "the lie to be refused", timeout=15)
    assert st["reason"] == "error"
    assert "Traceback" not in sec.log_tail(200)
    s.close()
    # nothing of the hostile checkpoint was applied: the page is the donor's
    page = sec.hmp("xp 0x500000 16")
    assert page.startswith("0000000000500000:") and "ee ee" not in page, page
    sec.qmp("x-colo-lost-heartbeat")
    wait_until(sec, "query-colo-status", lambda d: d["failover-state"] == "completed",
               "the takeover")
    kv = KvClient(sec.console)
    kv.wait_ready()
    assert kv.request("GET before-the-lie") == "1"
    kv.close()
