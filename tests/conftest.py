"""Shared test set-up: KVM/root markers that skip locally but fail in CI.

`pytest.mark.kvm` needs a usable /dev/kvm, `pytest.mark.net` needs root (network
namespaces), `pytest.mark.etcd` the etcd binary (Debian's etcd-server; `make test`
installs it as root). With COLOCORE_REQUIRE_KVM=1 (what .ci/run sets) a missing
requirement is a failure, never a skip.
"""
import os
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REQUIRE = os.environ.get("COLOCORE_REQUIRE_KVM") == "1"


def _kvm_problem():
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (run as root or join the kvm group)"
    return None


def _root_problem():
    return None if os.geteuid() == 0 else "needs root (CAP_NET_ADMIN) for network namespaces"


def _etcd_problem():
    import shutil
    return None if shutil.which("etcd") else \
        "etcd is not installed (apt-get install etcd-server as root; make test does it)"


def pytest_runtest_setup(item):
    for marker, check in (("kvm", _kvm_problem), ("net", _root_problem), ("etcd", _etcd_problem)):
        if item.get_closest_marker(marker) is None:
            continue
        problem = check()
        if problem is None:
            continue
        if REQUIRE:
            pytest.fail("COLOCORE_REQUIRE_KVM=1 but %s" % problem, pytrace=False)
        pytest.skip(problem)


@pytest.fixture
def nodes(tmp_path):
    """A NodeSet whose processes are all stopped by pid after the test, pass or fail."""
    from colocore.tools.procs import NodeSet
    ns = NodeSet(str(tmp_path))
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def etcd_server(tmp_path):
    """A real etcd on a free loopback port, stopped by pid after the test."""
    from colocore.tools.etcd import EtcdServer
    srv = EtcdServer(str(tmp_path / "etcd-data"))
    try:
        yield srv.start()
    finally:
        srv.stop()


def pytest_collection_modifyitems(config, items):
    """Tests are sorted by what they need: tests/kvm needs KVM, tests/net needs root too."""
    for item in items:
        path = str(item.fspath)
        if os.sep + "kvm" + os.sep in path:
            item.add_marker(pytest.mark.kvm)
        if os.sep + "net" + os.sep in path:
            item.add_marker(pytest.mark.kvm)
            item.add_marker(pytest.mark.net)
        if "etcd_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.etcd)


# Every process a test starts inherits this token in its environment (nodes, etcd, clients,
# also through `ip netns exec`), so that the run can find whatever outlived it.
RUN_TOKEN = "COLOCORE_TEST_RUN=%d-%d" % (os.getpid(), int(time.time() * 1000))
os.environ["COLOCORE_TEST_RUN"] = RUN_TOKEN.split("=", 1)[1]


def _outliving():
    """(pid, command line) of the processes of this run other than pytest itself."""
    token = RUN_TOKEN.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                if token not in f.read().split(b"\0"):
                    continue
            with open("/proc/%s/stat" % entry) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        found.append((int(entry), cmd))
    return found


# colocore.tools.netlab names a test host's namespace PREFIX-PID-HOST after the process
# that created it.
_NETNS_DIR = "/run/netns"
_NETNS_NAME = re.compile(r"^[a-z]+-(\d+)-[a-z0-9]+$")


def _lab_namespaces(alive_ok):
    """Namespaces named by netlab whose creator is this process (alive_ok=False), or whose
    creator is dead (alive_ok=True: a run that was SIGKILLed could not delete them)."""
    try:
        names = os.listdir(_NETNS_DIR)
    except OSError:
        return []
    found = []
    for name in names:
        m = _NETNS_NAME.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if alive_ok:
            if not os.path.exists("/proc/%d" % pid):
                found.append(name)
        elif pid == os.getpid():
            found.append(name)
    return found


def _remove_namespaces(names):
    from pyroute2 import netns
    for name in names:
        try:
            netns.remove(name)
        except OSError:
            pass


def pytest_sessionstart(session):
    stale = _lab_namespaces(alive_ok=True)
    if stale:
        _remove_namespaces(stale)
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "removed network namespaces left by a run that died: %s" % " ".join(stale))


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process a test started is still alive, or a network namespace it
    created is still there: every test stops what it starts, by pid, and deletes what it
    creates, also when it fails. Leftovers are removed here and named."""
    import signal
    left = _lab_namespaces(alive_ok=False)
    if left:
        _remove_namespaces(left)
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "FAILED: network namespaces outlived the tests that created them (removed now): "
            "%s" % " ".join(left), red=True)
        session.exitstatus = 1
    alive = _outliving()
    if not alive:
        return
    for pid, _ in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(
        "FAILED: processes outlived the tests that started them (killed now): %s"
        % "; ".join("%d %s" % (pid, cmd[:120]) for pid, cmd in alive), red=True)
    session.exitstatus = 1
