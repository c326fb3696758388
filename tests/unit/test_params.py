"""Capabilities and parameters: QEMU's names, order and units; x-colo only where COLO is
supported (colo_supported())."""
import pytest

from colocore.errors import ColocoreError
from colocore.params import MigrationSettings


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
