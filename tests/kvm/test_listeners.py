"""Listeners and paths of a real node: the one tcp::PORT rule, the warning of an exposed
listener without TLS, unix sockets 0600 under any umask, migrate file: that follows
nothing planted and may be repeated from postmigrate."""
import os
import stat
import subprocess
import sys

import psutil

from colocore.tools.procs import free_port, wait_until


def _listening(pid):
    return {c.laddr.port: c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_tcp_empty_host_binds_loopback_everywhere(nodes):
    """Finding '`tcp::PORT` binds the monitor, QMP and console to every interface'."""
    ports = [free_port() for _ in range(4)]
    node = nodes.start("sec", ["-m", "64M", "--incoming", "tcp::%d" % ports[0],
                               "--qmp", "tcp::%d,server=on,wait=off" % ports[1]])
    node.wait_monitor()
    a = nodes.start("a", ["--kernel", "kvstore", "--console", "tcp::%d,server=on,wait=off" % ports[3],
                          "--serial", "tcp::%d,server=on,wait=off" % ports[2]])
    a.wait_monitor()
    bound = _listening(node.pid)
    bound.update(_listening(a.pid))
    assert {p: bound.get(p) for p in ports} == {p: "127.0.0.1" for p in ports}
    assert "without TLS" not in node.log_tail() + a.log_tail()


def test_exposed_listener_without_tls_warns_once(nodes):
    ports = [free_port() for _ in range(3)]
    node = nodes.start("sec", ["-m", "64M", "--incoming", "tcp:0.0.0.0:%d" % ports[0],
                               "--qmp", "tcp:0.0.0.0:%d,server=on,wait=off" % ports[1],
                               "--serial", "tcp:127.0.0.1:%d,server=on,wait=off" % ports[2]])
    node.wait_monitor()
    log = node.log_tail(100)
    warnings = [l for l in log.splitlines() if "without TLS" in l]
    assert len(warnings) == 2, log
    assert any("--incoming listens on 0.0.0.0:%d without TLS: every host that can route to "
               "this one can connect" % ports[0] in l for l in warnings)
    assert any("--qmp listens on 0.0.0.0:%d" % ports[1] in l for l in warnings)


def test_unix_sockets_are_private_under_umask_000(nodes):
    """Finding 'Unix sockets take their mode from the umask (srwxr-xr-x, or world-writable
    under umask 000)'."""
    node = nodes.start("a", ["--kernel", "kvstore"],
                       prefix=["sh", "-c", 'umask 000; exec "$@"', "sh"])
    node.wait_monitor()
    for p in (node.monitor_path, node.console_path, node.qmp_path):
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p


def test_unix_path_that_is_not_a_socket_is_an_error_and_kept(tmp_path):
    keep = tmp_path / "mon.sock"
    keep.write_text("not a socket")
    p = subprocess.run([sys.executable, "-m", "colocore", "run", "--kernel", "kvstore",
                        "--monitor", "unix:%s,server=on,wait=off" % keep],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "exists and is not a socket" in p.stderr and keep.read_text() == "not a socket"


def test_migrate_file_refuses_planted_targets_and_repeats_from_postmigrate(nodes, tmp_path):
    """Findings '`migrate file:PATH` writes `PATH.part` following symlinks' and 'A second
    `migrate file:` from `postmigrate` is refused; QEMU allows it'."""
    node = nodes.start("a", ["--kernel", "kvstore", "-m", "64M"])
    node.wait_monitor()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "snap").symlink_to(victim)
    (tmp_path / "good.part").symlink_to(victim)       # a planted PATH.part is not followed
    for target in (tmp_path / "snap", "/dev/null", tmp_path):
        out = node.hmp("migrate file:%s" % target)
        assert out.startswith("Error: migrate file: ") and "exists and is" in out, out
        assert node.qmp("query-status")["status"] == "running"
    assert victim.read_text() == "precious" and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert node.hmp("migrate file:%s" % (tmp_path / "good")) == ""
    assert node.qmp("query-status")["status"] == "postmigrate"
    assert stat.S_IMODE(os.stat(tmp_path / "good").st_mode) == 0o600
    # QEMU allows migrating again from postmigrate
    assert node.hmp("migrate file:%s" % (tmp_path / "again")) == ""
    wait_until(node, "query-migrate", lambda d: d["status"] == "completed", "the second save")
    again = (tmp_path / "again").read_bytes()
    assert again[:8] == b"COLOCORE" and abs(len(again) - os.path.getsize(tmp_path / "good")) < 65536
    # a failed save from postmigrate leaves it in postmigrate
    assert node.hmp("migrate file:/dev/null").startswith("Error:")
    assert node.qmp("query-status")["status"] == "postmigrate"
    assert victim.read_text() == "precious"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part") and f != "good.part"]
