"""COLO end to end with real processes on loopback, in the debug mode that compares page
hashes of secondary and primary at every checkpoint (--colo-verify).

The invariant: every key a client saw `OK` for is readable on the secondary after it
took over, wherever in the checkpoint cycle the primary died. Every test that runs
checkpoints does so in both pause modes (the `pause_mode` fixture): the engine's default
(hot pages kept writable, pre-copy, copy-on-write after the pause) and plain copy (every
dirty page copied and re-protected inside the pause).
"""
import os
import re
import signal
import socket
import time

import pytest

from colocore.colo import faults
from colocore.clients.kv import KvClient
from colocore.tools.load import KeyWriter
from colocore.tools.procs import free_port, start_protected_pair, wait_for


def wait_for_log(node, text, timeout=10):
    deadline = time.monotonic() + timeout
    while text not in node.log_tail(60):
        assert time.monotonic() < deadline, "%r never logged; log:\n%s" % (text, node.log_tail())
        time.sleep(0.05)


@pytest.fixture(params=["hot+pre+cow", "copy"])
def pause_mode(request, nodes):
    """The primary's pause mode for start_protected_pair (see checkpoint.pause_mode)."""
    nodes.pause_mode = request.param
    return request.param


def _checkpoints(node):
    m = re.search(r"colo checkpoints: (\d+)", node.hmp("info migrate"))
    return int(m.group(1)) if m else 0


def _take_over_and_check(sec, acked, request=True):
    if request:
        assert sec.hmp("x_colo_lost_heartbeat") == ""
    wait_for(sec, "info colo", "failover state: completed", timeout=10)
    assert sec.hmp("info status") == "VM status: running"
    info = sec.hmp("info colo")
    assert "mismatches: 0" in info or "verified" not in info, info
    kv = KvClient(sec.console)
    kv.wait_ready()
    keys = list(acked)
    replies = kv.pipeline(["GET %s" % k for k in keys], window=256) if keys else []
    lost = [k for k, r in zip(keys, replies) if r != acked[k]]
    assert not lost, "%d acknowledged keys lost on the secondary, e.g. %s" % (len(lost), lost[:5])
    # and it keeps serving
    assert kv.request("SET after failover") == "OK"
    assert kv.request("GET after") == "failover"
    kv.close()


def _assert_verified(sec):
    info = sec.hmp("info colo")
    m = re.search(r"verified checkpoints: (\d+), mismatches: (\d+)", info)
    assert m, info
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0, info


def test_capabilities_and_parameters_words(nodes):
    node = nodes.start("a", ["--kernel", "kvstore"])
    node.wait_monitor()
    assert node.hmp("info migrate_capabilities") == (
        "xbzrle: off\ncompress: off\nevents: off\nx-colo: off\nx-colo-hybrid: off\n"
        "return-path: off")
    assert node.hmp("migrate_set_capability x-colo on") == ""
    assert "x-colo: on" in node.hmp("info migrate_capabilities")
    params = node.hmp("info migrate_parameters")
    for line in ("downtime-limit: 300 ms", "max-bandwidth: 134217728 bytes/second",
                 "xbzrle-cache-size: 67108864 bytes", "x-checkpoint-delay: 200 ms",
                 "x-colo-heartbeat: 0 ms", "x-compare-timeout: 20 ms"):
        assert line in params
    assert node.hmp("migrate_set_parameter x-checkpoint-delay 50") == ""
    assert "x-checkpoint-delay: 50 ms" in node.hmp("info migrate_parameters")
    # the pause: copy-on-write where this host has userfaultfd write-protect (it does)
    for line in ("x-colo-pause: cow", "x-colo-hot-pages: 16384 pages",
                 "x-colo-precopy: 256 pages"):
        assert line in params
    assert node.hmp("migrate_set_parameter x-colo-pause copy") == ""
    assert "x-colo-pause: copy" in node.hmp("info migrate_parameters")
    assert node.hmp("migrate_set_parameter x-colo-pause later") == (
        "Error: Parameter 'x-colo-pause' expects one of cow, copy, got 'later'")
    assert node.hmp("migrate_set_parameter xbzrle-cache-size 1000").startswith("Error:")
    assert node.hmp("migrate_set_parameter nope 1").startswith("Error: Parameter 'nope' not found")
    assert node.hmp("migrate_set_capability nope on").startswith("Error: Capability 'nope' not found")
    assert node.hmp("x_colo_lost_heartbeat") == "Error: VM is not in COLO mode"
    assert node.hmp("info colo").startswith("COLO mode: none")


def test_protect_then_kill_primary_at_random_moments(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    w = KeyWriter([pri.console], prefix="w", timeout=30)
    w.start()
    w.wait_acked(500)
    assert "colo pause mode: %s" % pause_mode in pri.hmp("info migrate")
    # a moment that is not aligned with the checkpoint cycle
    time.sleep(0.013 * (1 + w.count % 7))
    pri.kill(signal.SIGKILL)
    w.join(10)
    acked = dict(w.acked)
    wait_for(sec, "info colo", "reason: error", timeout=10)
    _assert_verified(sec)
    _take_over_and_check(sec, acked)


@pytest.mark.parametrize("point", faults.POINTS)
def test_primary_dies_at_each_protocol_step(nodes, point, pause_mode):
    crash_at = 4
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True,
                                    primary_env={"COLOCORE_CRASH_AT": "%s:%d" % (point, crash_at)})
    w = KeyWriter([pri.console], batch=8, prefix="w", timeout=30)
    w.start()
    pri.proc.wait(30)                      # it kills itself at the chosen step
    assert pri.proc.returncode == -signal.SIGKILL
    w.join(10)
    wait_for(sec, "info colo", "reason: error", timeout=10)
    info = sec.hmp("info colo")
    loaded = int(re.search(r"checkpoints: (\d+)", info).group(1))
    # a checkpoint cut off before vmstate-received is dropped whole; one that arrived whole
    # is applied even though the primary died before it could hear vmstate-loaded
    expected = crash_at if point in ("after-received", "after-loaded") else crash_at - 1
    assert loaded == expected, info
    _take_over_and_check(sec, dict(w.acked))


def test_secondary_dies_primary_keeps_serving(nodes, pause_mode):
    """The secondary's process dies: its end of the channel closes, so it can never serve
    a newer state; the primary leaves COLO by itself and its clients get their answers."""
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    kv = KvClient(pri.console)
    assert kv.request("SET before crash") == "OK"
    sec.kill(signal.SIGKILL)
    assert kv.pipeline(["SET k%d %d" % (i, i) for i in range(200)]) == ["OK"] * 200
    out = wait_for(pri, "info colo", "failover state: completed", timeout=10)
    assert "reason: error" in out and "last mode: primary" in out
    assert "Migration status: completed" in pri.hmp("info migrate")
    assert kv.request("GET before") == "crash"
    assert pri.hmp("info status") == "VM status: running"
    assert pri.hmp("x_colo_lost_heartbeat") == "Error: VM is not in COLO mode"
    assert "the secondary is gone" in pri.log_tail()


def test_silent_secondary_holds_output_until_the_operator_decides(nodes, pause_mode):
    """A secondary that stops answering (SIGSTOP: like a dead host or a partition) cannot
    be told from one that might still take over: the primary's guest runs on but its
    output is held until x_colo_lost_heartbeat; then the held answers arrive."""
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    kv = KvClient(pri.console, timeout=30)
    assert kv.request("SET before stop") == "OK"
    os.kill(sec.pid, signal.SIGSTOP)        # NodeProcess.kill waits for an exit
    try:
        kv.sock.sendall(b"GET before\n")
        out = wait_for(pri, "info colo", "peer: lost", timeout=20)
        assert "said nothing" in out and "failover state: none" in out
        assert pri.hmp("info status") == "VM status: running"
        kv.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            kv.sock.recv(100)                  # held: the answer may not leave yet
        assert pri.hmp("x_colo_lost_heartbeat") == ""
        wait_for(pri, "info colo", "failover state: completed")
        assert kv._readline(time.monotonic() + 10) == "stop"
    finally:
        sec.kill(signal.SIGKILL)


def test_secondary_takes_over_while_primary_lives_primary_stops(nodes, pause_mode):
    """Failover on a live pair (the operator chose the secondary): the secondary tells the
    primary, which stops its guest so that only one copy serves."""
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    kv = KvClient(pri.console)
    assert kv.request("SET shared 1") == "OK"
    assert sec.hmp("x_colo_lost_heartbeat") == ""
    wait_for(sec, "info colo", "failover state: completed")
    out = wait_for(pri, "info colo", "peer: took over", timeout=10)
    assert "COLO mode: none" in out
    assert pri.hmp("info status") == "VM status: paused"
    kv2 = KvClient(sec.console)
    kv2.wait_ready()
    assert kv2.request("GET shared") == "1"


def test_heartbeat_fails_over_by_itself(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    for n in (pri, sec):
        assert n.hmp("migrate_set_parameter x-colo-heartbeat 300") == ""
    kv = KvClient(pri.console)
    assert kv.request("SET hb 1") == "OK"
    pri.kill(signal.SIGKILL)
    wait_for(sec, "info colo", "failover state: completed", timeout=10)
    kv2 = KvClient(sec.console)
    kv2.wait_ready()
    assert kv2.request("GET hb") == "1"


def test_secondary_refuses_cont_and_migrate_while_in_colo(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    assert sec.hmp("info status") == "VM status: paused (colo)"
    assert sec.hmp("cont").startswith("Error: this is a COLO secondary")
    assert sec.hmp("migrate file:/tmp/never.snap").startswith("Error: cannot migrate")
    assert sec.hmp("info status") == "VM status: paused (colo)"
    assert "COLO mode: secondary" in sec.hmp("info colo")


def test_second_failover_request_is_an_error(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    pri.kill(signal.SIGKILL)
    assert sec.hmp("x_colo_lost_heartbeat") == ""
    second = sec.hmp("x_colo_lost_heartbeat")
    assert second in ("Error: COLO failover is already active", "Error: VM is not in COLO mode")
    wait_for(sec, "info colo", "failover state: completed")


def test_delay_change_triggers_a_checkpoint(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, delay_ms=60000, verify=True)
    before = _checkpoints(pri)
    assert pri.hmp("migrate_set_parameter x-checkpoint-delay 59000") == ""
    deadline = time.monotonic() + 5
    while _checkpoints(pri) <= before:
        assert time.monotonic() < deadline, "no checkpoint after the delay changed"
        time.sleep(0.02)


def test_xbzrle_and_compress_keep_the_copy_exact(nodes, pause_mode):
    pri, sec = start_protected_pair(nodes, kernel="dirtier", append="wss=300", delay_ms=40,
                                    verify=True, capabilities=("xbzrle", "compress"))
    deadline = time.monotonic() + 20
    while _checkpoints(pri) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _assert_verified(sec)
    info = pri.hmp("info migrate")
    assert float(re.search(r"colo compression ratio: ([\d.]+)", info).group(1)) > 2, info


@pytest.mark.parametrize("append", ["pattern=hot wss=2000", "pattern=scan wss=3000 interval=50",
                                    "pattern=random wss=500 span=8000"],
                         ids=["hot", "scan", "random"])
def test_guest_write_patterns_keep_the_copy_exact(nodes, append, pause_mode):
    """The three ways the dirtier writes (a hot working set, new pages every interval,
    random pages) under 30 ms checkpoints: --colo-verify stays clean, and the default
    mode keeps the hot working set writable."""
    pri, sec = start_protected_pair(nodes, kernel="dirtier", append=append, delay_ms=30,
                                    verify=True, capabilities=("compress",))
    deadline = time.monotonic() + 30
    while _checkpoints(pri) < 15:
        assert time.monotonic() < deadline, pri.hmp("info migrate")
        time.sleep(0.05)
    _assert_verified(sec)
    info = pri.hmp("info migrate")
    assert "colo pause mode: %s" % pause_mode in info
    hot = int(re.search(r"colo last hot pages: (\d+)", info).group(1))
    if pause_mode == "copy":
        assert hot == 0, info
    elif append.startswith("pattern=hot"):
        assert hot >= 2000, info


# A host without userfaultfd for this process, made with the kernel's own means: a mount
# namespace where /dev/userfaultfd is /dev/null, and no CAP_SYS_PTRACE (with
# vm.unprivileged_userfaultfd=0, the syscall then refuses to trap kernel-mode faults).
NO_UFFD = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
           'mount --bind /dev/null /dev/userfaultfd && exec setpriv --bounding-set=-sys_ptrace -- "$@"',
           "sh"]


@pytest.mark.net          # needs root: a mount namespace
def test_without_userfaultfd_the_pause_copies_and_says_so(nodes):
    port = free_port()
    sec = nodes.start("secondary", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port,
                                    "--colo-verify"])
    pri = nodes.start("primary", ["--kernel", "dirtier", "--append", "wss=500", "-m", "256M",
                                  "--colo-verify"], prefix=NO_UFFD)
    sec.wait_monitor()
    pri.wait_monitor()
    params = pri.hmp("info migrate_parameters")
    assert "x-colo-pause: copy (no userfaultfd write-protect: userfaultfd() failed" in params
    assert pri.hmp("migrate_set_parameter x-colo-pause cow").startswith(
        "Error: x-colo-pause cow needs userfaultfd write-protect, which is not available here")
    pri.hmp("migrate_set_capability x-colo on")
    pri.hmp("migrate_set_parameter x-checkpoint-delay 30")
    assert pri.hmp("migrate tcp:127.0.0.1:%d" % port) == ""
    wait_for(pri, "info migrate", "Migration status: colo")
    deadline = time.monotonic() + 20
    while _checkpoints(pri) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _assert_verified(sec)
    assert "colo pause mode: hot+pre+copy" in pri.hmp("info migrate")
    assert pri.log_tail(200).count("userfaultfd write-protect is not available") == 1


def test_plain_live_migration(nodes):
    port = free_port()
    dst = nodes.start("dst", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port])
    src = nodes.start("src", ["--kernel", "kvstore", "-m", "256M"])
    src.wait_monitor()
    dst.wait_monitor()
    kv = KvClient(src.console)
    assert kv.pipeline(["SET m%d %d" % (i, i) for i in range(1000)]) == ["OK"] * 1000
    kv.close()
    assert dst.hmp("info status") == "VM status: paused (inmigrate)"
    assert src.hmp("migrate tcp:127.0.0.1:%d" % port, timeout=60) == ""
    assert "Migration status: completed" in src.hmp("info migrate")
    assert src.hmp("info status") == "VM status: paused (postmigrate)"
    wait_for(dst, "info status", "VM status: running")
    kv = KvClient(dst.console)
    kv.wait_ready()
    assert kv.pipeline(["GET m%d" % i for i in range(1000)]) == [str(i) for i in range(1000)]


def test_secondary_with_wrong_memory_size(nodes):
    port = free_port()
    sec = nodes.start("sec", ["-m", "128M", "--incoming", "tcp:127.0.0.1:%d" % port])
    pri = nodes.start("pri", ["--kernel", "kvstore", "-m", "256M"])
    sec.wait_monitor()
    pri.wait_monitor()
    pri.hmp("migrate_set_capability x-colo on")
    pri.hmp("migrate tcp:127.0.0.1:%d" % port)
    out = wait_for(pri, "info migrate", "Migration status: failed")
    assert "start the secondary with -m 256M" in out
    assert pri.hmp("info status") == "VM status: running"
    kv = KvClient(pri.console)
    assert kv.request("PING") == "PONG"
    assert sec.hmp("info status") == "VM status: paused (inmigrate)"


def test_unreachable_migrate_uri(nodes):
    pri = nodes.start("pri", ["--kernel", "kvstore"])
    pri.wait_monitor()
    pri.hmp("migrate tcp:127.0.0.1:%d" % free_port())
    out = wait_for(pri, "info migrate", "Migration status: failed")
    assert "cannot reach" in out and "--incoming" in out
    assert pri.hmp("info status") == "VM status: running"
    assert pri.hmp("migrate tcp:nohost").startswith("Error:")


@pytest.mark.parametrize("garbage", ["version", "corrupt", "oversized", "foreign", "cut",
                                     "machine", "ram-page", "devices", "devices-bytes"])
def test_secondary_refuses_bad_streams_and_still_accepts_a_good_one(nodes, garbage):
    import struct
    from colocore.vmstate import format as stream
    from colocore.vmstate.format import Section
    port = free_port()
    sec = nodes.start("sec", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port])
    sec.wait_monitor()
    good = stream.header() + stream.section_bytes(Section.MACHINE, b'{"mem_size": 268435456}')
    data = {
        "version": struct.pack(">8sII", b"COLOCORE", 7, 0),
        "corrupt": good[:-1] + bytes([good[-1] ^ 1]),
        "oversized": stream.header() + struct.pack(">IQ", 2, 1 << 40),
        "foreign": b"QEVM\x00\x00\x00\x03" + bytes(64),
        "cut": good + stream.section_bytes(Section.RAM, b"x" * 100)[:50],
        # well framed, with a valid CRC, but malformed inside: the one section reader
        # refuses each the same way on every path (a DEVICES section once killed the
        # incoming thread here while snapshots refused it)
        "machine": stream.header() + stream.section_bytes(Section.MACHINE, b'{"mem_size": 2.5}'),
        "ram-page": good + stream.section_bytes(
            Section.RAM, struct.pack("<BBHI", 0, 0, 0, 1) + struct.pack("<I", 1 << 30) + bytes(4096)),
        "devices": good + stream.section_bytes(Section.DEVICES, b"{not json"),
        "devices-bytes": good + stream.section_bytes(Section.DEVICES, b'{"uart": {"__b64__": "*"}}'),
    }[garbage]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    while s.recv(4096):
        pass
    s.close()
    expect = {"version": "version 7", "corrupt": "checksum", "oversized": "claims",
              "foreign": "not a colocore stream", "cut": "truncated",
              "machine": "mem_size 2.5", "ram-page": "has page 1073741824",
              "devices": "DEVICES section is not valid JSON",
              "devices-bytes": "DEVICES section holds malformed bytes"}[garbage]
    began = garbage in ("cut", "ram-page", "devices", "devices-bytes")
    wait_for_log(sec, expect)
    # a connection that never sent a valid MACHINE section was not a migration: it is
    # dropped with a warning; one that did and then broke is a failed migration
    assert ("incoming migration failed" in sec.log_tail()) == began
    if began:
        wait_for(sec, "info migrate", "Migration status: failed")
    else:
        assert sec.hmp("info migrate") == "Migration status: none"
    assert sec.hmp("info status") == "VM status: paused (inmigrate)"
    # the secondary is still usable: a real primary protects a guest through it
    pri = nodes.start("pri", ["--kernel", "kvstore", "-m", "256M"])
    pri.wait_monitor()
    pri.hmp("migrate_set_capability x-colo on")
    pri.hmp("migrate tcp:127.0.0.1:%d" % port)
    wait_for(pri, "info migrate", "Migration status: colo")


def test_migrate_cancel_before_colo(nodes):
    port = free_port()
    sec = nodes.start("sec", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port])
    pri = nodes.start("pri", ["--kernel", "dirtier", "--append", "wss=20000", "-m", "256M"])
    sec.wait_monitor()
    pri.wait_monitor()
    pri.hmp("migrate_set_parameter max-bandwidth 4M")    # slow enough to cancel mid-way
    pri.hmp("migrate_set_capability x-colo on")
    pri.hmp("migrate tcp:127.0.0.1:%d" % port)
    wait_for(pri, "info migrate", "Migration status: active")
    assert pri.hmp("migrate_cancel") == ""
    wait_for(pri, "info migrate", "Migration status: cancelled")
    assert pri.hmp("info status") == "VM status: running"
    assert pri.hmp("info colo").startswith("COLO mode: none")


def test_reprotect_after_failover(nodes, pause_mode):
    """The survivor of a failover can be protected again by a new secondary."""
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True)
    kv = KvClient(pri.console)
    assert kv.request("SET gen 1") == "OK"
    sec.kill(signal.SIGKILL)
    wait_for(pri, "info colo", "failover state: completed")
    port = free_port()
    sec2 = nodes.start("secondary2", ["-m", "256M", "--incoming", "tcp:127.0.0.1:%d" % port,
                                      "--colo-verify"])
    sec2.wait_monitor()
    assert pri.hmp("migrate tcp:127.0.0.1:%d" % port) == ""
    wait_for(pri, "info migrate", "Migration status: colo")
    wait_for(pri, "info colo", "failover state: none")
    assert kv.request("SET gen 2") == "OK"          # output flows: checkpoints are acked
    pri.kill(signal.SIGKILL)
    _take_over_and_check(sec2, {"gen": "2"})


def test_failover_during_a_load_relaunches_after_it(nodes, pause_mode):
    """The primary dies right after vmstate-received; the operator asks for failover while
    the secondary is still loading that checkpoint: the failover waits for the load
    (relaunch) and the guest starts from that newest checkpoint."""
    pri, sec = start_protected_pair(nodes, delay_ms=30, verify=True,
                                    primary_env={"COLOCORE_CRASH_AT": "after-received:3"},
                                    secondary_env={"COLOCORE_SLOW_LOAD_MS": "1500"})
    w = KeyWriter([pri.console], batch=8, prefix="w", timeout=30)
    w.start()
    pri.proc.wait(60)
    w.join(10)
    assert sec.hmp("x_colo_lost_heartbeat") == ""
    wait_for(sec, "info colo", "failover state: completed", timeout=20)
    assert "relaunches once it is in" in sec.log_tail(60)
    info = sec.hmp("info colo")
    assert "checkpoints: 3" in info, info
    _take_over_and_check(sec, dict(w.acked), request=False)


def test_secondary_notices_a_silent_primary(nodes, pause_mode):
    """A primary that stops talking (SIGSTOP: like a dead host) is reported by the
    secondary within seconds even with a long checkpoint delay; without a heartbeat the
    secondary does not take over by itself."""
    pri, sec = start_protected_pair(nodes, delay_ms=60000, verify=True)
    os.kill(pri.pid, signal.SIGSTOP)
    try:
        out = wait_for(sec, "info colo", "peer: lost", timeout=15)
        assert "said nothing" in out and "failover state: none" in out
        assert sec.hmp("info status") == "VM status: paused (colo)"
    finally:
        pri.kill(signal.SIGKILL)
