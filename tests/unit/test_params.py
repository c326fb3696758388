"""Capabilities and parameters: QEMU's names, order and units; x-colo only where COLO is
supported (colo_supported()). The operations are control/commands.py's; the text is
HMP's formatting of their data."""
import pytest

from colocore.control.commands import Commands
from colocore.control.hmp import format_capabilities, format_parameters
from colocore.errors import ColocoreError
from colocore.migration.outgoing import Migration
from colocore.migration.params import MigrationSettings, pause_mode_parameters


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


def _ops_cow(cow_support):
    settings = MigrationSettings(True, cow_support=cow_support)
    migration = Migration(None, settings, lambda name, data: None, on_colo=None)
    return Commands(None, settings, migration, None, lambda name, data: None, lambda: None)


def test_pause_parameters():
    ops = _ops_cow((True, ""))
    text = format_parameters(ops.query_migrate_parameters())
    assert "x-colo-pause: cow" in text and "x-colo-hot-pages: 16384 pages" in text
    assert "x-colo-precopy: 256 pages" in text
    ops.migrate_set_parameters({"x-colo-pause": "copy", "x-colo-hot-pages": "0"})
    params = ops.query_migrate_parameters()
    assert params["x-colo-pause"] == "copy" and params["x-colo-hot-pages"] == 0
    with pytest.raises(ColocoreError, match="expects one of cow, copy"):
        ops.migrate_set_parameters({"x-colo-pause": "fast"})


def test_without_userfaultfd_the_pause_copies_and_says_why():
    ops = _ops_cow((False, "userfaultfd() failed (Operation not permitted)"))
    assert "x-colo-pause: copy (no userfaultfd write-protect: userfaultfd() failed " \
        "(Operation not permitted))" in format_parameters(ops.query_migrate_parameters())
    with pytest.raises(ColocoreError, match="needs userfaultfd write-protect"):
        ops.migrate_set_parameters({"x-colo-pause": "cow"})


def test_pause_mode_names():
    assert pause_mode_parameters("copy") == {"x-colo-pause": "copy", "x-colo-hot-pages": 0,
                                             "x-colo-precopy": 0}
    assert pause_mode_parameters("hot+pre+cow") == {"x-colo-pause": "cow",
                                                    "x-colo-hot-pages": 16384,
                                                    "x-colo-precopy": 256}
    for bad in ("fast", "cow+hot", "hot+hot+cow", "pre"):
        with pytest.raises(ColocoreError, match="unknown pause mode"):
            pause_mode_parameters(bad)
