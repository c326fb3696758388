"""Capabilities and parameters: QEMU's names, order and units; x-colo only where COLO is
supported (colo_supported()). The operations are control/commands.py's; the text is
HMP's formatting of their data."""
import pytest

from colocore.control.commands import Commands
from colocore.control.hmp import format_capabilities, format_parameters
from colocore.errors import ColocoreError
from colocore.migration.outgoing import Migration
from colocore.migration.params import MigrationSettings


def _ops(colo_supported=True):
    settings = MigrationSettings(colo_supported)
    migration = Migration(None, settings, lambda name, data: None, on_colo=None)
    return Commands(None, settings, migration, None, lambda name, data: None, lambda: None)


def test_x_colo_listed_only_where_supported():
    assert "x-colo: off" in format_capabilities(_ops(True).query_migrate_capabilities())
    unsupported = _ops(False)
    assert "x-colo" not in format_capabilities(unsupported.query_migrate_capabilities())
    with pytest.raises(ColocoreError, match="COLO is not supported on this host"):
        unsupported.migrate_set_capabilities([("x-colo", True)])


def test_qemu_order_and_units():
    ops = _ops(True)
    assert [l.split(":")[0] for l in format_capabilities(
        ops.query_migrate_capabilities()).splitlines()] == \
        ["xbzrle", "compress", "events", "x-colo", "x-colo-hybrid", "return-path"]
    ops.migrate_set_parameters({"max-bandwidth": "64M"})
    assert "max-bandwidth: 67108864 bytes/second" in format_parameters(
        ops.query_migrate_parameters())
    with pytest.raises(ColocoreError, match="power of two"):
        ops.migrate_set_parameters({"xbzrle-cache-size": "3000000"})
    with pytest.raises(ColocoreError, match="between"):
        ops.migrate_set_parameters({"downtime-limit": "-5"})
    ops.migration.status = "active"
    with pytest.raises(ColocoreError, match="in progress"):
        ops.migrate_set_capabilities([("xbzrle", True)])


def test_parameters_are_set_all_or_nothing():
    ops = _ops(True)
    before = ops.query_migrate_parameters()
    with pytest.raises(ColocoreError):
        ops.migrate_set_parameters({"x-checkpoint-delay": 50, "downtime-limit": -5})
    assert ops.query_migrate_parameters() == before
