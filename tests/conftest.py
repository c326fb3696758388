"""Shared test set-up: KVM/root markers that skip locally but fail in CI.

`pytest.mark.kvm` needs a usable /dev/kvm, `pytest.mark.net` needs root (network
namespaces), `pytest.mark.etcd` the etcd binary (Debian's etcd-server; `make test`
installs it as root). With COLOCORE_REQUIRE_KVM=1 (what .ci/run sets) a missing
requirement is a failure, never a skip.
"""
import os
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


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process a test started is still alive: every test stops what it
    starts, by pid, also when it fails. Leftovers are killed here and named."""
    import signal
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
