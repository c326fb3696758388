"""Capabilities and parameters: QEMU's names, order and units; x-colo only where COLO is
supported (colo_supported())."""
import pytest

from colocore.errors import ColocoreError
from colocore.params import MigrationSettings, pause_mode_parameters


def test_x_colo_listed_only_where_supported():
    assert "x-colo: off" in MigrationSettings(True).capabilities_text()
    unsupported = MigrationSettings(False)
    assert "x-colo" not in unsupported.capabilities_text()
    with pytest.raises(ColocoreError, match="COLO is not supported on this host"):
        unsupported.set_capability("x-colo", True)


def test_qemu_order_and_units():
    s = MigrationSettings(True)
    assert [l.split(":")[0] for l in s.capabilities_text().splitlines()] == \
        ["xbzrle", "compress", "events", "x-colo", "return-path"]
    s.set_parameter("max-bandwidth", "64M")
    assert "max-bandwidth: 67108864 bytes/second" in s.parameters_text()
    with pytest.raises(ColocoreError, match="power of two"):
        s.set_parameter("xbzrle-cache-size", "3000000")
    with pytest.raises(ColocoreError, match="between"):
        s.set_parameter("downtime-limit", "-5")
    with pytest.raises(ColocoreError, match="in progress"):
        s.set_capability("xbzrle", True, busy=True)


def test_pause_parameters():
    s = MigrationSettings(True, (True, ""))
    text = s.parameters_text()
    assert "x-colo-pause: cow" in text and "x-colo-hot-pages: 16384 pages" in text
    assert "x-colo-precopy: 256 pages" in text
    s.set_parameter("x-colo-pause", "copy")
    assert s.parameters["x-colo-pause"] == "copy"
    with pytest.raises(ColocoreError, match="expects one of cow, copy"):
        s.set_parameter("x-colo-pause", "fast")
    s.set_parameter("x-colo-hot-pages", "0")
    assert s.parameters["x-colo-hot-pages"] == 0


def test_without_userfaultfd_the_pause_copies_and_says_why():
    s = MigrationSettings(True, (False, "userfaultfd() failed (Operation not permitted)"))
    assert "x-colo-pause: copy (no userfaultfd write-protect: userfaultfd() failed " \
        "(Operation not permitted))" in s.parameters_text()
    with pytest.raises(ColocoreError, match="needs userfaultfd write-protect"):
        s.set_parameter("x-colo-pause", "cow")


def test_pause_mode_names():
    assert pause_mode_parameters("copy") == {"x-colo-pause": "copy", "x-colo-hot-pages": 0,
                                             "x-colo-precopy": 0}
    assert pause_mode_parameters("hot+pre+cow") == {"x-colo-pause": "cow",
                                                    "x-colo-hot-pages": 16384,
                                                    "x-colo-precopy": 256}
    for bad in ("fast", "cow+hot", "hot+hot+cow", "pre"):
        with pytest.raises(ColocoreError, match="unknown pause mode"):
            pause_mode_parameters(bad)
