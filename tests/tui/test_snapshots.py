"""The main screen pinned with fixed data (no nodes, no clock, no psutil), 80x24 and 120x40.

Update after an intended change of the look: pytest tests/tui --snapshot-update
"""
import time

import pytest

from colocore_tui.app import create_app

from fixed_data import PRIMARY, SECONDARY, feed


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_main_screen(snap_compare, size):
    app = create_app(PRIMARY, SECONDARY, watch=False)
    assert snap_compare(app, terminal_size=size, run_before=feed)


def test_failover_dialog(snap_compare):
    app = create_app(PRIMARY, SECONDARY, watch=False)
    assert snap_compare(app, terminal_size=(80, 24), run_before=feed, press=["f"])
