"""Where a node listens and what it writes (colocore/paths.py), and the --object table
(colocore/tls.py): no KVM needed."""
import os
import socket
import stat

import pytest

from colocore import paths, tls
from colocore.control.chardev import parse_chardev
from colocore.errors import ChardevError, ColocoreError
from colocore.migration.transport import parse_tcp_uri


def test_tcp_empty_host_is_loopback_for_every_listener():
    """Finding '`tcp::PORT` binds the monitor, QMP and console to every interface while
    `--incoming tcp::PORT` binds loopback': one parser, one rule."""
    for what in ("--monitor", "--qmp", "--console", "--serial"):
        assert parse_chardev("tcp::5555,server=on,wait=off", what).host == "127.0.0.1"
    assert parse_tcp_uri("tcp::5555", "--incoming") == ("127.0.0.1", 5555)
    assert parse_chardev("tcp:0.0.0.0:5555").host == "0.0.0.0"
    assert parse_tcp_uri("tcp:[::1]:5555") == ("::1", 5555)
    with pytest.raises(ChardevError, match="out of range"):
        parse_chardev("tcp::70000")
    assert paths.is_loopback("127.0.0.2") and paths.is_loopback("::1")
    assert not paths.is_loopback("0.0.0.0") and not paths.is_loopback("example.org")


def test_unix_socket_is_0600_whatever_the_umask(tmp_path):
    """Finding 'Unix sockets take their mode from the umask'."""
    old = os.umask(0)
    try:
        s = paths.bind_unix(str(tmp_path / "a.sock"), "--qmp")
        s2 = paths.bind_unix(str(tmp_path / "b.sock"), "--qmp", mode=0o660)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(tmp_path / "a.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(tmp_path / "b.sock").st_mode) == 0o660
    assert sorted(os.listdir(tmp_path)) == ["a.sock", "b.sock"]      # no private dir left
    s.close()
    s2.close()
    assert parse_chardev("unix:/x.sock,mode=0640").mode == 0o640
    with pytest.raises(ChardevError, match="octal"):
        parse_chardev("unix:/x.sock,mode=rw")


def test_unix_removes_only_a_stale_socket(tmp_path):
    """Finding '`unix:PATH` deletes whatever non-socket file is at PATH'."""
    regular = tmp_path / "file"
    regular.write_text("keep me")
    target = tmp_path / "target"
    target.write_text("keep me too")
    link = tmp_path / "link"
    link.symlink_to(target)
    (tmp_path / "dir").mkdir()
    for p in (regular, link, tmp_path / "dir"):
        with pytest.raises(ColocoreError, match="exists and is not a socket"):
            paths.bind_unix(str(p), "--monitor")
    assert regular.read_text() == "keep me" and target.read_text() == "keep me too"
    assert link.is_symlink()
    # a stale socket (nobody serves it) is replaced; a live one is refused
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    paths.bind_unix(str(tmp_path / "stale.sock"), "--monitor").close()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    with pytest.raises(ColocoreError, match="another process is serving"):
        paths.bind_unix(str(tmp_path / "live.sock"), "--monitor")
    live.close()


def test_private_temp_refuses_what_is_not_a_regular_file(tmp_path):
    """Finding '`migrate file:PATH` writes `PATH.part` following symlinks and then
    replaces PATH'."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = tmp_path / "snap"
    planted.symlink_to(victim)
    for target, kind in ((planted, "a symlink"), ("/dev/null", "a device"), (tmp_path, "a directory")):
        with pytest.raises(ColocoreError, match="exists and is %s" % kind):
            paths.open_private_temp(str(target), "migrate file:")
    assert victim.read_text() == "precious" and planted.is_symlink()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a planted PATH.part symlink is not followed: the temporary is a new file
    (tmp_path / "out.part").symlink_to(victim)
    f, tmp = paths.open_private_temp(str(tmp_path / "out"), "migrate file:")
    with f:
        f.write(b"state")
    assert os.path.dirname(tmp) == str(tmp_path)
    assert stat.S_IMODE(os.lstat(tmp).st_mode) == 0o600
    paths.commit_temp(tmp, str(tmp_path / "out"), "migrate file:")
    assert (tmp_path / "out").read_bytes() == b"state" and victim.read_text() == "precious"
    assert not os.path.exists(tmp)


def test_file_chardev_does_not_follow_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "log").symlink_to(victim)
    with pytest.raises(ColocoreError, match="symlink"):
        paths.open_append_nofollow(str(tmp_path / "log"), "--serial")
    assert victim.read_text() == "precious"
    with paths.open_append_nofollow(str(tmp_path / "real.log"), "--serial") as f:
        f.write(b"x")
    assert (tmp_path / "real.log").read_bytes() == b"x"


def test_objects_parse_with_actionable_errors(tmp_path):
    with pytest.raises(ColocoreError, match="unknown object type"):
        tls.Objects(["secret,id=s0,data=x"])
    with pytest.raises(ColocoreError, match="needs dir="):
        tls.Objects(["tls-creds-x509,id=tls0,endpoint=server"])
    with pytest.raises(ColocoreError, match="endpoint must be server or client"):
        tls.Objects(["tls-creds-x509,id=tls0,dir=%s,endpoint=both" % tmp_path])
    with pytest.raises(ColocoreError, match="cannot load .*server-cert.pem.*the directory needs "
                                            "ca-cert.pem, server-cert.pem, server-key.pem"):
        tls.Objects(["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % tmp_path])
    with pytest.raises(ColocoreError, match="64 hex digits"):
        tls.Objects(["authz-simple,id=a,identity=sha256:12"])
    objs = tls.Objects(["authz-simple,id=a,identity=CN=primary,,O=example"])
    assert objs.authz("a", "x").attributes == [("CN", "primary"), ("O", "example")]
    with pytest.raises(ColocoreError, match="no TLS credentials with id 'tls9'"):
        objs.creds("tls9", "client", "migrate")


def test_authz_matches_subject_attributes_or_a_fingerprint():
    peer = tls.Security(tls=True, authenticated=True, peer="CN=primary,O=colocore",
                        fingerprint="AB:" * 31 + "CD")
    assert tls.Authz("a", "CN=primary").allows(peer)
    assert tls.Authz("a", "O=colocore,CN=primary").allows(peer)
    assert not tls.Authz("a", "CN=primary,O=other").allows(peer)
    assert not tls.Authz("a", "CN=prim").allows(peer)
    assert tls.Authz("a", "sha256:" + "ab" * 31 + "cd").allows(peer)
    assert not tls.Authz("a", "sha256:" + "ab" * 32).allows(peer)
    unverified = tls.Security(tls=True, authenticated=False, peer="CN=primary")
    assert not tls.Authz("a", "CN=primary").allows(unverified)
